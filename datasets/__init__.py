"""Dataset integrations, installed as the import package `reformatters_datasets`.

Each folder is one provider/model/variant. `DATASETS` lists what `reformatters list` shows.
"""

from __future__ import annotations

from typing import Any


def all_datasets() -> list[Any]:
    from .example.dataset import ExampleDataset

    datasets: list[Any] = [ExampleDataset()]
    try:
        from .noaa.gfs.forecast.dataset import GfsForecastDataset
    except ImportError:
        pass
    else:
        datasets.append(GfsForecastDataset())
    return datasets
