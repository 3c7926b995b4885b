from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.region_job import SourceFileStatus
from reformatters.summary import RunSummary
from reformatters.testing.dataset_kit import DatasetTestKit

INITS = pd.date_range("2024-01-01", periods=4, freq="6h")
MISSING = [(INITS[1], 3)]
CORRUPT = [(INITS[2], 0)]


def expected_example_values(var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
    """The published values the example source implies, NaN where a file is missing or unreadable."""
    unavailable = {(pd.Timestamp(t), h) for t, h in [*MISSING, *CORRUPT]}
    shape = published[var_name].shape
    expected = np.full(shape, np.nan, dtype=np.float32)
    for i, init in enumerate(published.init_time.to_index()):
        for j, lead in enumerate(published.lead_time.to_index()):
            hour = int(lead.total_seconds() // 3600)
            if (init, hour) in unavailable:
                continue
            if var_name == "temperature_2m":
                expected[i, j] = source.temperature(init, hour)
            # Accumulations start at the init time, so lead 1 needs no earlier file.
            elif hour == 1 or (hour > 1 and (init, hour - 1) not in unavailable):
                expected[i, j] = source.precipitation_rate(init, hour)
    return expected


class TestExampleDataset(DatasetTestKit):
    dataset = ExampleDataset()
    backfill_end = "2024-01-02T00:00"
    jobs_cover_end = "2024-03-01T00:00"

    def make_source(self, root: Path) -> str:
        source.generate_source(root, INITS, missing=MISSING, corrupt=CORRUPT)
        return str(root)

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        return expected_example_values(var_name, published)

    def absolute_tolerance(self, var_name: str) -> float:
        # Deaccumulation differences of float32 accumulations: a few ulps of A(h) over 3600 s.
        return 2e-8 if var_name == "precipitation_surface" else 0.0

    def check_summary(self, summary: RunSummary) -> None:
        for name in ("temperature_2m", "precipitation_surface"):
            entry = summary.variables[name]
            assert entry.files_not_found == 1
            assert entry.files_download_failed == 0
            assert entry.files_read_failed == 1
            assert entry.files_ok == len(INITS) * len(source.LEAD_HOURS) - 2
        assert summary.regions_done == summary.regions_total == 2
        assert summary.published_append_dim_end == INITS[-1].isoformat()


def test_status_enum_names_match_design() -> None:
    assert {s.name for s in SourceFileStatus} == {"Processing", "DownloadFailed", "ReadFailed", "Succeeded"}
