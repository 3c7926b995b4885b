from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, RecentNaNs, Validator

from .region_job import ExampleRegionJob
from .template_config import example_template_config


class ExampleDataset(DynamicalDataset[ExampleRegionJob]):
    description = "A small generated forecast used by the framework's own tests."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", example_template_config())
        kwargs.setdefault("region_job_class", ExampleRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay="6h"),
            # Precipitation is a rate over the hour ending at valid_time: lead 0 is always NaN (1/6).
            RecentNaNs(threshold=0.3, positions=2, sample=256),
            ExpectedShards(positions=4),
        )
