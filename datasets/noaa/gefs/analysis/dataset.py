"""`noaa-gefs-analysis`: template, region job and storage brought together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.deploy.models import OperationalResources
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, RecentNaNs, Validator

from ..forecast_35_day.dataset import OPERATIONAL_RESOURCES as FORECAST_RESOURCES
from .region_job import GefsAnalysisRegionJob
from .template_config import gefs_analysis_template_config

# A run's first leads are on the bucket about 4 h after its init. An update at minute 30 of hours 04, 10, 16 and 22
# UTC appends the run's lead 0 and 3 h; just before the next one the newest step is 7.5 h old.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=9)

# The GEFS forecast's backfill sizing (a scratch volume for one 12 GB variable-region per worker and its shards); the
# update appends a few steps every 6 h, each variable-region through the scratch path and merged into its shard.
OPERATIONAL_RESOURCES = FORECAST_RESOURCES.model_copy(
    update={
        "update": FORECAST_RESOURCES.update.model_copy(
            update={
                "schedule": "30 4,10,16,22 * * *",
                "starting_deadline_seconds": 1800,
                "active_deadline_seconds": 5 * 3600,
            }
        ),
        "validation": FORECAST_RESOURCES.validation.model_copy(
            update={"schedule": "0 5,11,17,23 * * *", "starting_deadline_seconds": 1800}
        ),
    }
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
