"""The shared test kit every dataset integration runs.

Subclass `DatasetTestKit` in a test module (its name must start with `Test`), give it the dataset and a
generated source, and pytest collects the whole suite: the checked-in template matches the code, jobs
cover the template exactly once, and a backfill into a local store reads back as the source says.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import xarray as xr

from reformatters.common.binary_rounding import max_relative_rounding_error
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.publish import tmp_metadata_store
from reformatters.region_job import RegionJobFilters, append_dim_shard_length
from reformatters.summary import RunSummary
from reformatters.template_config import template_differences
from reformatters.update.drift import structure_differences


class DatasetTestKit:
    dataset: ClassVar[DynamicalDataset[Any]]
    backfill_end: ClassVar[str]
    """Exclusive end of the append dimension for the kit's backfill."""
    backfill_variables: ClassVar[tuple[str, ...]] = ()
    """Variables the kit's backfill processes (default: all)."""
    jobs_cover_end: ClassVar[str]
    """End of a longer stretch over which job coverage is checked."""
    n_workers: ClassVar[int] = 2

    # ---- what an integration provides ----
    def make_source(self, root: Path) -> str:
        """Write (or serve) a source archive for the backfill; return the source URL."""
        raise NotImplementedError

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        """What the published variable must hold (NaN where the source has no data)."""
        raise NotImplementedError

    def absolute_tolerance(self, var_name: str) -> float:
        return 0.0

    def check_summary(self, summary: RunSummary) -> None:
        """Integration-specific checks of the backfill summary (failed files counted, bytes fetched...)."""

    def kit_filters(self, variable_names: tuple[str, ...] | None = None) -> RegionJobFilters:
        return RegionJobFilters(variable_names=variable_names or self.backfill_variables)

    def check_no_structure_drift(self, store_url: str) -> None:
        """The published structure equals the template's, as the next operational update demands."""
        config = self.dataset.template_config
        with tmp_metadata_store(config.get_template(self.backfill_end)) as tmp_store:
            differences = structure_differences(
                (tmp_store / "zarr.json").read_bytes(), (Path(store_url) / "zarr.json").read_bytes(), config.append_dim
            )
        assert not differences, (
            f"after a backfill the store's structure differs from the template (an update would refuse to run): "
            f"{differences}; keep each variable's encoding in update_template_with_results"
        )

    # ---- the suite ----
    def test_reads_write_every_value_of_a_field(self, tmp_path: Path) -> None:
        """`read_data_into` may get a buffer holding another field: a value it leaves alone would be published."""
        from reformatters.pipeline.kernels import download_one

        source_url = self.make_source(tmp_path / "source")
        config = self.dataset.template_config
        template = config.get_template(self.backfill_end)
        jobs = self.dataset.region_job_class.get_jobs(
            template, config.append_dim, config.data_vars, self.kit_filters(), source_url=source_url
        )
        job = jobs[0].for_workers()
        sentinel = np.float32(-3.0e38)  # no dataset's value: a -3e38 left over means an unwritten point
        read = 0
        for var in job.data_vars:
            coords = job.generate_source_file_coords(job.template_ds.isel({config.append_dim: slice(0, 1)}), [var])
            for coord in coords[:4]:
                outcome = download_one(job, coord, [var])
                if outcome.payload is None:
                    continue
                location = coord.out_loc()
                shape = [n for dim, n in job.template_ds[var.name].sizes.items() if dim not in location]
                out = np.full(shape, sentinel, dtype=np.float32)
                try:
                    job.read_data_into(coord, var, outcome.payload, out)
                except Exception:  # noqa: BLE001 - unreadable files are the backfill test's business
                    continue
                left = int(np.count_nonzero(out == sentinel))
                assert left == 0, (
                    f"{var.name}: read_data_into left {left} of {out.size} values of {coord.get_url()} unwritten; "
                    "write NaN where the source has no value (out may hold the last field read)"
                )
                read += 1
        assert read, "no field could be read from the kit's source: nothing was checked"

    def test_template_matches_code(self, tmp_path: Path) -> None:
        config = self.dataset.template_config
        rendered = config.update_template(templates_dir=tmp_path)
        differences = template_differences(config.template_path, rendered)
        assert not differences, (
            f"the checked-in template of {config.dataset_id} differs from the code: {differences}; "
            f"run `reformatters update-template {config.dataset_id}` and review the diff"
        )

    def test_template_expands_lazily(self) -> None:
        config = self.dataset.template_config
        template = config.get_template(self.jobs_cover_end)
        for name in template.data_vars:
            assert template[name].chunks is not None, f"{name} must be a lazy (dask) array"
        expected = config.append_dim_coordinates(self.jobs_cover_end)
        np.testing.assert_array_equal(template.get_index(config.append_dim), expected)

    def test_jobs_cover_template_exactly_once(self) -> None:
        config = self.dataset.template_config
        template = config.get_template(self.jobs_cover_end)
        jobs = self.dataset.region_job_class.get_jobs(template, config.append_dim, config.data_vars)
        length = template.sizes[config.append_dim]
        covered: Counter[tuple[str, int]] = Counter()
        for job in jobs:
            shard = append_dim_shard_length(job.data_vars, template, config.append_dim)
            assert job.region.start % shard == 0, f"{job.describe()} does not start on a shard boundary"
            assert len(job.data_vars) <= job.max_vars_per_job
            for var in job.data_vars:
                for position in range(job.region.start, job.region.stop):
                    covered[(var.name, position)] += 1
        expected = {(v.name, p) for v in config.data_vars for p in range(length)}
        assert set(covered) == expected
        assert set(covered.values()) == {1}

    def test_backfill_reads_back_as_the_source_says(self, tmp_path: Path) -> None:
        source_url = self.make_source(tmp_path / "source")
        store_url = str(tmp_path / "store.zarr")
        summary = self.dataset.backfill(
            self.backfill_end,
            cluster="local",
            n_workers=self.n_workers,
            store_url=store_url,
            source_url=source_url,
            filters=self.kit_filters(),
            summary_path=tmp_path / "summary.json",
            show_progress=False,
        )
        assert (tmp_path / "summary.json").exists()
        self.check_no_structure_drift(store_url)
        published = xr.open_zarr(store_url, decode_timedelta=True)
        names = self.backfill_variables or tuple(v.name for v in self.dataset.template_config.data_vars)
        for name in names:
            var = self.dataset.template_config.data_var(name)
            expected = self.expected_values(name, published)
            actual = published[name].values
            np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{name}: NaN positions")
            bits = var.internal_attrs.keep_mantissa_bits
            rtol = max_relative_rounding_error(bits) if isinstance(bits, int) else 0.0
            np.testing.assert_allclose(
                actual, expected, rtol=rtol * 1.0001, atol=self.absolute_tolerance(name), err_msg=name
            )
        self.check_summary(summary)
