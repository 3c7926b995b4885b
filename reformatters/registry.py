"""Which datasets exist: the integrations under `datasets/` (import package `reformatters_datasets`)."""

from __future__ import annotations

from typing import Any

from reformatters.dynamical_dataset import DynamicalDataset


def all_datasets() -> list[DynamicalDataset[Any]]:
    import reformatters_datasets

    return list(reformatters_datasets.all_datasets())


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_dataset(dataset_id: str) -> DynamicalDataset[Any]:
    datasets = {d.dataset_id: d for d in all_datasets()}
    if dataset_id not in datasets:
        raise UnknownDatasetError(
            f"unknown dataset {dataset_id!r}; known datasets: {', '.join(sorted(datasets))} (see `reformatters list`)"
        )
    return datasets[dataset_id]
