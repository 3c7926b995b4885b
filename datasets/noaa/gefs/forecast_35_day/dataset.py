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
)
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, RecentNaNsPerMember, Validator

from .region_job import GefsForecast35DayRegionJob
from .template_config import gefs_forecast_35_day_template_config

# The 00z run's leads to 384 h are on the bucket about 6 h after init, its extension about 21 h later; a daily
# update at 06:45 UTC appends today's init and completes yesterday's.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=7)


# Variable-regions (31 members x 181 leads x 721 x 1440 float32; 26.2 GB padded to whole shards) take the scratch
# path: a worker holds a bounded window of fields (peak anonymous memory ~0.18 GB per worker in
# benchmarks/gefs_scratch.py, whatever the member count) while the region lives in a file on the pod's scratch
# volume, beside the shard files it encodes (smaller: compressed). Memory is for page cache and the process; the
# scratch volume holds one variable-region per worker and its shards.
OPERATIONAL_RESOURCES = OperationalResources(
    # Daily at 06:45 UTC: today's 00z init to 384 h, and yesterday's extension to 840 h.
    update=CronJobSpec(
        schedule="45 6 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=20 * 3600,
        backoff_limit=1,
        workers=1,
        resources=ContainerResources.of("2", "8Gi", "32Gi", "48Gi"),
        scratch_size_limit="44Gi",
    ),
    validation=CronJobSpec(
        schedule="45 7 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=3600,
        resources=ContainerResources.of("1", "4Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="6GiB",
        resources=ContainerResources.of("2", "8Gi", "32Gi", "48Gi"),
        scratch_size_limit="44Gi",
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
