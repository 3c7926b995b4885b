from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, Validator

from .region_job import GfsForecastRegionJob
from .template_config import gfs_forecast_template_config
from .validators import IngestedLeadsHaveData

# f384 lands about 5 h 35 min after init; the update runs at minute 38 of hours 05, 11, 17, 23 UTC.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=5, minutes=50)


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
