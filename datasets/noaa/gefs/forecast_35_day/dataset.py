"""`noaa-gefs-forecast-35-day`: template, region job and storage brought together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.deploy.models import (
    BackfillSizing,
    ContainerResources,
    CronJobSpec,
    OperationalResources,
    Quantities,
)
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, Validator

from .region_job import GefsForecast35DayRegionJob
from .template_config import gefs_forecast_35_day_template_config
from .validators import RecentNaNsPerMember

# The 00z run's leads to 384 h are on the bucket about 6 h after init, its extension about 21 h later; a daily
# update at 06:45 UTC appends today's init and completes yesterday's.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=7)


def _resources(cpu: str, memory: str, storage_request: str, storage_limit: str) -> ContainerResources:
    return ContainerResources(
        requests=Quantities(cpu=cpu, memory=memory, ephemeral_storage=storage_request),
        limits=Quantities(cpu=cpu, memory=memory, ephemeral_storage=storage_limit),
    )


# Not benchmarked: sized from the variable-region, 31 members x 181 leads x 721 x 1440 float32 (23.3 GB), with
# the ratio the GFS benchmark measured between a worker's peak RSS and its variable-region (1.61 / 0.868 GB,
# rounded up to 1.9). One LocalCluster worker per update pod gets 80 % of 60 GiB (51.5 GB).
OPERATIONAL_RESOURCES = OperationalResources(
    # Daily at 06:45 UTC: today's 00z init to 384 h, and yesterday's extension to 840 h.
    update=CronJobSpec(
        schedule="45 6 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=20 * 3600,
        backoff_limit=1,
        workers=1,
        resources=_resources("2", "60Gi", "4Gi", "24Gi"),
        scratch_size_limit="20Gi",
    ),
    validation=CronJobSpec(
        schedule="45 7 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=3600,
        resources=_resources("1", "4Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="48GiB",
        resources=_resources("2", "52Gi", "4Gi", "24Gi"),
        scratch_size_limit="20Gi",
    ),
)


class GefsForecast35DayDataset(DynamicalDataset[GefsForecast35DayRegionJob]):
    description = "NOAA GEFS 31-member ensemble forecast, 0-840 h, 0.25 degree (0.5 degree past 240 h, resampled)."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", gefs_forecast_35_day_template_config())
        kwargs.setdefault("region_job_class", GefsForecast35DayRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay=MAX_PUBLICATION_DELAY),
            RecentNaNsPerMember(threshold=0.05, positions=2),
            ExpectedShards(positions=2),
        )

    def operational_resources(self) -> OperationalResources:
        return OPERATIONAL_RESOURCES
