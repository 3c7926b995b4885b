from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, Validator

from .region_job import HrrrForecast48HourRegionJob
from .template_config import hrrr_forecast_48_hour_template_config
from .validators import IngestedLeadsHaveData

# f48 of the wrfsfc files lands about 1 h 50 min after init; an update at minute 55 of hours 01, 07, 13 and 19 UTC
# catches complete runs, and the next one must have published the run before this delay has passed.
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=2, minutes=30)


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
