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

from .region_job import GfsForecastRegionJob
from .template_config import gfs_forecast_template_config
from .validators import IngestedLeadsHaveData

# f384 lands about 5 h 35 min after init; the update runs at minute 38 of hours 05, 11, 17, 23 UTC.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=5, minutes=50)


# Sized from the benchmark (README, "Benchmark"): a worker encodes one variable-region at a time (209 leads x
# 721 x 1440 float32, 868 MB) and peaked at 1.29-1.61 GB RSS. The update's LocalCluster gets 80 % of the pod's
# memory split between its workers (reformatters.cluster.local_cluster_size): 7 GiB and 2 workers give each
# 3.0 GB, the driver the rest. CPU: one core per worker (one thread encodes while the other downloads).
OPERATIONAL_RESOURCES = OperationalResources(
    # f384 lands about 5 h 35 min after init: minute 38 of hours 05, 11, 17, 23 UTC; done before the next run.
    update=CronJobSpec(
        schedule="38 5,11,17,23 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=5 * 3600,
        backoff_limit=1,
        workers=2,
        resources=ContainerResources.of("2", "7Gi", "2Gi", "6Gi"),
        scratch_size_limit="5Gi",  # Dask spills here before it pauses
    ),
    # One hour after each update: the update had time to publish, the next has not started.
    validation=CronJobSpec(
        schedule="38 0,6,12,18 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=3600,
        resources=ContainerResources.of("1", "2Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="3GiB",
        resources=ContainerResources.of("2", "3584Mi", "2Gi", "6Gi"),
        scratch_size_limit="5Gi",
    ),
)


class GfsForecastDataset(DynamicalDataset[GfsForecastRegionJob]):
    description = "NOAA GFS 0.25 degree global forecast, 0-384 h."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", gfs_forecast_template_config())
        kwargs.setdefault("region_job_class", GfsForecastRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay=MAX_PUBLICATION_DELAY),
            IngestedLeadsHaveData(threshold=0.05, positions=2),
            ExpectedShards(positions=2),
        )

    def operational_resources(self) -> OperationalResources:
        return OPERATIONAL_RESOURCES
