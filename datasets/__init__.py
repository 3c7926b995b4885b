"""Dataset integrations, installed as the import package `reformatters_datasets`.

Each folder is one provider/model/variant; `all_datasets()` is what `reformatters list` shows.
"""

from __future__ import annotations

from typing import Any


def all_datasets() -> list[Any]:
    from .example.dataset import ExampleDataset
    from .noaa.gfs.forecast.dataset import GfsForecastDataset
    from .noaa.hrrr.forecast_48_hour.dataset import HrrrForecast48HourDataset

    return [GfsForecastDataset(), HrrrForecast48HourDataset(), ExampleDataset()]
