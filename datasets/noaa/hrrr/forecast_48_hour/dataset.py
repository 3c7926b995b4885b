from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.deploy.models import (
    BackfillSizing,
    ContainerResources,
    CronJobSpec,
    OperationalResources,
)
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, Validator

from .region_job import HrrrForecast48HourRegionJob
from .template_config import hrrr_forecast_48_hour_template_config
from .validators import IngestedLeadsHaveData

# f48 of the wrfsfc files lands about 1 h 50 min after init; an update at minute 55 of hours 01, 07, 13 and 19 UTC
# catches complete runs, and the next one must have published the run before this delay has passed.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=2, minutes=30)


# A variable-region is 49 leads x 1059 x 1799 float32 (373 MB), 0.43 of GFS's; the benchmark's HRRR runs peaked
# at 683-791 MB RSS per worker (README, "Benchmark"). 4 GiB and 2 workers give each LocalCluster worker 1.7 GB.
OPERATIONAL_RESOURCES = OperationalResources(
    update=CronJobSpec(
        schedule="55 1,7,13,19 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=5 * 3600,
        backoff_limit=1,
        workers=2,
        resources=ContainerResources.of("2", "4Gi", "1Gi", "4Gi"),
        scratch_size_limit="3Gi",
    ),
    validation=CronJobSpec(
        schedule="55 2,8,14,20 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=3600,
        resources=ContainerResources.of("1", "2Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="1536MiB",
        resources=ContainerResources.of("2", "2Gi", "1Gi", "4Gi"),
        scratch_size_limit="3Gi",
    ),
)


class HrrrForecast48HourDataset(DynamicalDataset[HrrrForecast48HourRegionJob]):
    description = "NOAA HRRR 3 km CONUS forecast, 00/06/12/18z runs, 0-48 h."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", hrrr_forecast_48_hour_template_config())
        kwargs.setdefault("region_job_class", HrrrForecast48HourRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay=MAX_PUBLICATION_DELAY),
            IngestedLeadsHaveData(threshold=0.05, positions=2),
            ExpectedShards(positions=2),
        )

    def operational_resources(self) -> OperationalResources:
        return OPERATIONAL_RESOURCES
