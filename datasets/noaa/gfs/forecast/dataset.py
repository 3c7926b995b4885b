from __future__ import annotations

from typing import Any

from reformatters.dynamical_dataset import DynamicalDataset

from .region_job import GfsForecastRegionJob
from .template_config import gfs_forecast_template_config


class GfsForecastDataset(DynamicalDataset[GfsForecastRegionJob]):
    description = "NOAA GFS 0.25 degree global forecast, 0-384 h."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", gfs_forecast_template_config())
        kwargs.setdefault("region_job_class", GfsForecastRegionJob)
        super().__init__(**kwargs)
