"""`noaa-gefs-forecast-35-day`: template, region job and storage brought together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, Validator

from .region_job import GefsForecast35DayRegionJob
from .template_config import gefs_forecast_35_day_template_config
from .validators import RecentNaNsPerMember

# The 00z run's leads to 384 h are on the bucket about 6 h after init, its extension about 21 h later; a daily
# update at 06:45 UTC appends today's init and completes yesterday's.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=7)


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
