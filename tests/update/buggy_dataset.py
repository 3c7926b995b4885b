"""The example dataset with a bug in a hook (an AttributeError at one file), for the failure-policy tests; the
CLI finds it through REFORMATTERS_EXTRA_DATASETS=tests.update.buggy_dataset:BuggyExampleDataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.region_job import ExampleRegionJob, ExampleSourceFileCoord
from reformatters_datasets.example.template_config import ExampleDataVar

BUGGY_INIT = pd.Timestamp("2024-01-01T12:00")
BUGGY_LEAD_HOURS = 2


class BuggyRegionJob(ExampleRegionJob):
    def read_data(
        self, coord: ExampleSourceFileCoord, data_var: ExampleDataVar, payload: bytes | Mapping[str, bytes]
    ) -> npt.NDArray[np.float32]:
        if coord.init_time == BUGGY_INIT and coord.lead_hours == BUGGY_LEAD_HOURS:
            return coord.values_of_the_field  # type: ignore[attr-defined,no-any-return]
        return super().read_data(coord, data_var, payload)


class BuggyExampleDataset(ExampleDataset):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("region_job_class", BuggyRegionJob)
        super().__init__(**kwargs)
