"""`noaa-gefs-analysis`: template, region job and storage brought together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.deploy.models import BackfillSizing, ContainerResources, CronJobSpec, OperationalResources
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, RecentNaNs, Validator

from .region_job import GefsAnalysisRegionJob
from .template_config import gefs_analysis_template_config

# A run's first leads are on the bucket about 4 h after its init. An update at minute 30 of hours 04, 10, 16 and 22
# UTC appends the run's lead 0 and 3 h; just before the next one the newest step is 7.5 h old.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=9)

# A variable-region (2880 steps x 721 x 1440 float32, 12 GB) takes the scratch path: the region lives in a file on
# the pod's scratch volume, its mapped pages released as it fills (`pipeline.scratch.MappedPagesRelease`), so a
# worker's memory holds a window of fields and one encoded chunk. An update's region is a few steps, merged into
# the published shard.
OPERATIONAL_RESOURCES = OperationalResources(
    update=CronJobSpec(
        schedule="30 4,10,16,22 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=3 * 3600,
        backoff_limit=1,
        workers=1,
        resources=ContainerResources.of("2", "8Gi", "16Gi", "24Gi"),
        scratch_size_limit="20Gi",
    ),
    validation=CronJobSpec(
        schedule="0 5,11,17,23 * * *",
        starting_deadline_seconds=1800,
        active_deadline_seconds=1800,
        resources=ContainerResources.of("1", "2Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="6GiB",
        resources=ContainerResources.of("2", "8Gi", "16Gi", "32Gi"),
        scratch_size_limit="28Gi",
    ),
)


class GefsAnalysisDataset(DynamicalDataset[GefsAnalysisRegionJob]):
    description = "NOAA GEFS analysis: 3-hourly from the shortest leads of successive c00 runs, 0.25 degree."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", gefs_analysis_template_config())
        kwargs.setdefault("region_job_class", GefsAnalysisRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay=MAX_PUBLICATION_DELAY),
            RecentNaNs(threshold=0.05, positions=4),
            ExpectedShards(positions=4),
        )

    def operational_resources(self) -> OperationalResources:
        return OPERATIONAL_RESOURCES
