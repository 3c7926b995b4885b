from __future__ import annotations

from typing import Any

from reformatters.dynamical_dataset import DynamicalDataset

from .region_job import ExampleRegionJob
from .template_config import example_template_config


class ExampleDataset(DynamicalDataset[ExampleRegionJob]):
    description = "A small generated forecast used by the framework's own tests."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", example_template_config())
        kwargs.setdefault("region_job_class", ExampleRegionJob)
        super().__init__(**kwargs)
