"""Shared fixtures: a real S3 server, and the example dataset's source with the values it implies."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr

from reformatters.common.binary_rounding import max_relative_rounding_error
from reformatters.registry import EXTRA_DATASETS_ENV
from reformatters.summary import RunSummary
from reformatters.testing.object_store_server import S3Server, s3_server

EXAMPLE_DATASET = "reformatters_datasets.example.dataset:ExampleDataset"


def pytest_configure(config: pytest.Config) -> None:
    """Register the test-only `example` dataset for this process and every process the tests start.

    No entry point declares it, so an installed wheel never lists it; worker processes (LocalCluster,
    `dask worker`) and CLI subprocesses inherit the variable.
    """
    registered = os.environ.get(EXTRA_DATASETS_ENV, "").replace(",", " ").split()
    if EXAMPLE_DATASET not in registered:
        os.environ[EXTRA_DATASETS_ENV] = " ".join([*registered, EXAMPLE_DATASET])


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3-compatible server (SeaweedFS, else moto) on 127.0.0.1 for the session, bucket `bucket` created.

    Tests share the bucket, so each writes under its own key; `with s3.environment():` sets the AWS_*
    variables for this process and the worker processes it starts afterwards.
    """
    with s3_server(bucket="bucket") as server:
        yield server


@dataclass(frozen=True)
class ExampleSource:
    """A generated example archive and what a backfill of it must publish."""

    url: str
    init_times: pd.DatetimeIndex
    missing: frozenset[tuple[pd.Timestamp, int]]
    corrupt: frozenset[tuple[pd.Timestamp, int]]

    @property
    def unavailable(self) -> frozenset[tuple[pd.Timestamp, int]]:
        return self.missing | self.corrupt

    def expected(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        from reformatters_datasets.example import source

        expected = np.full(published[var_name].shape, np.nan, dtype=np.float32)
        for i, init in enumerate(published.init_time.to_index()):
            for j, lead in enumerate(published.lead_time.to_index()):
                hour = int(lead.total_seconds() // 3600)
                if (init, hour) in self.unavailable:
                    continue
                if var_name == "temperature_2m":
                    expected[i, j] = source.temperature(init, hour)
                # Rate over (h-1, h]: NaN at lead 0; lead 1 needs no earlier file (accumulation starts at 0);
                # later leads need the previous file too.
                elif hour == 1 or (hour > 1 and (init, hour - 1) not in self.unavailable):
                    expected[i, j] = source.precipitation_rate(init, hour)
        return expected

    def check_published(self, published: xr.Dataset, var_names: Iterable[str] | None = None) -> None:
        """Every value within the binary-rounding tolerance of the source; NaN exactly where files failed."""
        from reformatters_datasets.example.template_config import example_template_config

        config = example_template_config()
        np.testing.assert_array_equal(published.init_time.values, self.init_times.values)
        for name in var_names or [v.name for v in config.data_vars]:
            bits = config.data_var(name).internal_attrs.keep_mantissa_bits
            assert isinstance(bits, int)
            expected = self.expected(name, published)
            actual = published[name].values
            np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{name}: NaN positions")
            # Deaccumulated rates: a few float32 ulps of A(h) over 3600 s on top of the rounding.
            atol = 2e-8 if name == "precipitation_surface" else 0.0
            rtol = max_relative_rounding_error(bits) * 1.0001
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)

    def check_summary(
        self, summary: RunSummary, var_names: Iterable[str] = ("temperature_2m", "precipitation_surface")
    ) -> None:
        from reformatters_datasets.example import source

        total = len(self.init_times) * len(source.LEAD_HOURS)
        for name in var_names:
            entry = summary.variables[name]
            assert entry.files_not_found == len(self.missing), name
            assert entry.files_download_failed == 0, name
            assert entry.files_read_failed == len(self.corrupt), name
            assert entry.files_ok == total - len(self.missing) - len(self.corrupt), name
        assert summary.regions_done == summary.regions_total


@pytest.fixture
def example_source(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: `example_source(init_times, missing=[(t, lead)], corrupt=[...])` -> ExampleSource."""
    from reformatters_datasets.example import source

    def make(
        init_times: pd.DatetimeIndex,
        missing: Iterable[tuple[pd.Timestamp, int]] = (),
        corrupt: Iterable[tuple[pd.Timestamp, int]] = (),
        root: Path | None = None,
    ) -> ExampleSource:
        missing_set = frozenset((pd.Timestamp(t), int(h)) for t, h in missing)
        corrupt_set = frozenset((pd.Timestamp(t), int(h)) for t, h in corrupt)
        directory = root or tmp_path / "example-source"
        source.generate_source(directory, init_times, missing=missing_set, corrupt=corrupt_set)
        return ExampleSource(str(directory), pd.DatetimeIndex(init_times), missing_set, corrupt_set)

    return make
