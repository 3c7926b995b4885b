"""Which datasets exist: every entry point of the group `reformatters.datasets`, plus `REFORMATTERS_EXTRA_DATASETS`.

An entry point names a `DynamicalDataset` subclass or another callable that returns one dataset or several,
or a dataset object itself. This project's own integrations (import package `reformatters_datasets`) are
declared in its pyproject.toml like any other distribution's. Entry points come from the installed
metadata: a new one is seen after the distribution declaring it is installed again (`pip install -e .`).

`REFORMATTERS_EXTRA_DATASETS` adds datasets that no installed distribution declares: whitespace- or
comma-separated `module:attribute` references, loaded like entry points. The tests register the `example`
dataset this way; being an environment variable, it also reaches the worker processes they start.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel

from reformatters.dynamical_dataset import DynamicalDataset

log = logging.getLogger("reformatters.registry")

ENTRY_POINT_GROUP = "reformatters.datasets"
EXTRA_DATASETS_ENV = "REFORMATTERS_EXTRA_DATASETS"


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class DatasetRegistrationError(RuntimeError):
    """Two sources declare the same dataset id, or a source declares something that is not a dataset."""


@dataclass(frozen=True)
class DatasetSource:
    """One place a dataset is declared: an entry point, or an entry of `REFORMATTERS_EXTRA_DATASETS`."""

    value: str  # module:attribute
    description: str  # how messages name this source

    def load(self) -> Any:
        module_name, _, attribute = self.value.partition(":")
        obj: Any = importlib.import_module(module_name.strip())
        for part in attribute.strip().split(".") if attribute.strip() else []:
            obj = getattr(obj, part)
        return obj


def dataset_sources() -> list[DatasetSource]:
    sources = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        of = f" of {dist.name} {dist.version}" if dist is not None else ""
        description = f"entry point '{entry_point.name} = {entry_point.value}'{of} (group {ENTRY_POINT_GROUP})"
        sources.append(DatasetSource(entry_point.value, description))
    for reference in os.environ.get(EXTRA_DATASETS_ENV, "").replace(",", " ").split():
        sources.append(DatasetSource(reference, f"'{reference}' in ${EXTRA_DATASETS_ENV}"))
    return sources


def datasets_of(source: DatasetSource, loaded: Any) -> list[DynamicalDataset[Any]]:
    """The datasets an entry point's object stands for: the object itself, or what calling it returns."""
    produced = loaded() if callable(loaded) and not isinstance(loaded, DynamicalDataset) else loaded
    several = isinstance(produced, Iterable) and not isinstance(produced, str | bytes | Mapping | BaseModel)
    datasets = list(produced) if several else [produced]
    wrong = [item for item in datasets if not isinstance(item, DynamicalDataset)]
    if wrong or not datasets:
        found = f"{type(wrong[0]).__name__} {wrong[0]!r}" if wrong else "no dataset at all"
        raise DatasetRegistrationError(
            f"{source.description} must name a DynamicalDataset subclass, a callable returning one dataset or a "
            f"list of them, or a dataset object; it gave {found}"
        )
    return datasets


def all_datasets() -> list[DynamicalDataset[Any]]:
    """Every registered dataset, by dataset id.

    A source that fails to import or to build its datasets is logged as a warning and skipped, so one broken
    plugin does not take the others down; a dataset id declared by two sources is an error.
    """
    found: dict[str, tuple[DynamicalDataset[Any], DatasetSource]] = {}
    for source in dataset_sources():
        try:
            datasets = datasets_of(source, source.load())
        except Exception as error:  # noqa: BLE001 - a broken plugin is reported and skipped, whatever it raised
            log.warning(
                "dataset plugin %s failed to load and is skipped: %s: %s",
                source.description,
                type(error).__name__,
                error,
            )
            continue
        for dataset in datasets:
            if dataset.dataset_id in found:
                first = found[dataset.dataset_id][1]
                raise DatasetRegistrationError(
                    f"dataset id {dataset.dataset_id!r} is declared twice: by {first.description} and by "
                    f"{source.description}; uninstall one of them or give one of the datasets another id"
                )
            found[dataset.dataset_id] = (dataset, source)
    return [found[dataset_id][0] for dataset_id in sorted(found)]


def get_dataset(dataset_id: str) -> DynamicalDataset[Any]:
    datasets = {d.dataset_id: d for d in all_datasets()}
    if dataset_id not in datasets:
        raise UnknownDatasetError(
            f"unknown dataset {dataset_id!r}; known datasets: {', '.join(sorted(datasets))} (see `reformatters list`)"
        )
    return datasets[dataset_id]
