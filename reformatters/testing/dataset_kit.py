"""The shared test kit every dataset integration runs.

Subclass `DatasetTestKit` in a test module (its name must start with `Test`), give it the dataset and a
generated source, and pytest collects the whole suite: the checked-in template matches the code, jobs
cover the template exactly once, a backfill into a local store reads back as the source says (and, with
`-m slow`, the same backfill into an Icechunk repository holds the same objects), and backfills
into a live store (a slice in the middle, a subset of variables, an end before the published end) change no
object and no coordinate value they had no reason to change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr

from reformatters.common.binary_rounding import max_relative_rounding_error
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.publish import tmp_metadata_store
from reformatters.region_job import RegionJobFilters, append_dim_shard_length
from reformatters.summary import RunSummary
from reformatters.template_config import template_differences
from reformatters.testing.icechunk_checks import differences_from_plain
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
    live_store_end: ClassVar[str | None] = None
    """Exclusive end of the live-store checks' first backfill: at least three regions (default: backfill_end)."""
    live_store_variables: ClassVar[tuple[str, ...]] = ()
    """Variables of the live-store checks (default: backfill_variables); at least two."""
    update_backfill_end: ClassVar[str | None] = None
    """Exclusive end of the first backfill of the backfill-then-updates check (None: the check is skipped)."""
    update_nows: ClassVar[tuple[str, ...]] = ()
    """`now` of each operational update after that backfill; the last one's template must reach `backfill_end`."""

    # ---- what an integration provides ----
    def make_source(self, root: Path) -> str:
        """Write (or serve) a source archive for the backfill; return the source URL."""
        raise NotImplementedError

    def make_live_store_source(self, root: Path) -> str:
        """The source of the live-store checks, up to `live_store_end` (default: `make_source`)."""
        return self.make_source(root)

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

    @pytest.mark.slow  # two backfills of the dataset
    def test_icechunk_backfill_holds_the_plain_stores_objects(self, tmp_path: Path) -> None:
        """The kit's backfill into an Icechunk repository and into a plain store (one LocalCluster for both): each
        array's `zarr.json`, every coordinate chunk and every shard object are the same bytes."""
        source_url = self.make_source(tmp_path / "source")
        stores = {name: str(tmp_path / name) for name in ("store.zarr", "store.icechunk")}
        with _kit_cluster(self.n_workers) as address:
            for store_url in stores.values():
                self.dataset.backfill(
                    self.backfill_end,
                    cluster=address,
                    store_url=store_url,
                    source_url=source_url,
                    filters=self.kit_filters(),
                    show_progress=False,
                )
        plain, icechunk = (self.dataset.store(url) for url in stores.values())
        assert differences_from_plain(icechunk, plain) == []

    def test_backfill_then_updates_equals_one_backfill(self, tmp_path: Path) -> None:
        """A backfill up to `update_backfill_end` followed by operational updates at each of `update_nows` publishes
        the same objects, byte for byte, as one backfill up to `backfill_end`."""
        if self.update_backfill_end is None or not self.update_nows:
            pytest.skip(f"{type(self).__name__} sets no update_backfill_end and update_nows")
        config = self.dataset.template_config
        last_update = config.append_dim_coordinates(pd.Timestamp(self.update_nows[-1]) + config.append_dim_frequency)
        assert last_update.equals(config.append_dim_coordinates(self.backfill_end)), (
            f"the last update's template ends at {last_update[-1]}, the backfill's before {self.backfill_end}: "
            "choose the last of update_nows so that both end at the same position"
        )
        source_url = self.make_source(tmp_path / "source")
        whole, stepped = tmp_path / "whole.zarr", tmp_path / "stepped.zarr"
        ends = {}
        with _kit_cluster(self.n_workers) as address:
            for store, end in ((whole, self.backfill_end), (stepped, self.update_backfill_end)):
                self.dataset.backfill(
                    end,
                    cluster=address,
                    store_url=str(store),
                    source_url=source_url,
                    filters=self.kit_filters(),
                    show_progress=False,
                )
            for now in self.update_nows:
                self.dataset.update(
                    cluster=address,
                    store_url=str(stepped),
                    source_url=source_url,
                    now=pd.Timestamp(now),
                    show_progress=False,
                )
                ends[now] = self.dataset.open_published(str(stepped)).sizes[config.append_dim]
        assert len(set(ends.values())) > 1, f"the updates appended nothing: {config.append_dim} lengths {ends}"
        got, want = _store_state(stepped), _store_state(whole)
        assert sorted(got) == sorted(want), (
            f"objects differ: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
        )
        different = [key for key in want if got[key][0] != want[key][0]]
        assert not different, f"backfill + updates and one backfill differ in {different}"

    # ---- live-store checks: one publisher whatever the run ----
    def test_backfills_into_a_live_store_change_only_what_they_ran(self, tmp_path: Path) -> None:
        """Backfills of a slice in the middle, of a subset of variables and up to an end before the published end,
        into a published store: every object outside `_internal/` keeps its bytes and is not rewritten (the
        source is unchanged, so nothing differs), every coordinate value stays (derived ones included)."""

        config = self.dataset.template_config
        end = self.live_store_end or self.backfill_end
        variables = self.live_store_variables or self.backfill_variables or tuple(v.name for v in config.data_vars)
        source_url = self.make_live_store_source(tmp_path / "source")
        store = tmp_path / "live.zarr"
        template = config.get_template(end)
        jobs = self.dataset.region_job_class.get_jobs(
            template, config.append_dim, config.data_vars, self.kit_filters(variables)
        )
        regions = sorted({(job.region.start, job.region.stop) for job in jobs})
        assert len(regions) >= 3, f"the live-store checks need at least three regions up to {end}, got {regions}"
        assert len(variables) >= 2, "the live-store checks need at least two variables"
        labels = template.get_index(config.append_dim)
        middle = regions[len(regions) // 2]
        earlier_end = (
            labels[regions[-1][0] + (regions[-1][1] - regions[-1][0]) // 2]
            if (regions[-1][1] - regions[-1][0] > 1)
            else labels[regions[-1][0]]
        )
        runs = {
            "a slice in the middle": (end, RegionJobFilters(contains=(labels[middle[0]],), variable_names=variables)),
            "a subset of variables": (end, RegionJobFilters(variable_names=variables[:1])),
            "an end before the published end": (earlier_end, RegionJobFilters(variable_names=variables)),
        }
        with _kit_cluster(self.n_workers) as address:
            self.dataset.backfill(
                end,
                cluster=address,
                store_url=str(store),
                source_url=source_url,
                filters=self.kit_filters(variables),
                show_progress=False,
            )
            before = _store_state(store)
            coords_before = _append_dim_coords(store, config.append_dim)
            assert coords_before, "the published store has no coordinate along the append dimension to check"
            for what, (run_end, filters) in runs.items():
                summary = self.dataset.backfill(
                    run_end,
                    cluster=address,
                    store_url=str(store),
                    source_url=source_url,
                    filters=filters,
                    show_progress=False,
                    lease_wait_seconds=0,
                )
                assert summary.regions_done == summary.regions_total > 0, f"{what}: no region ran"
                after = _store_state(store)
                assert sorted(after) == sorted(before), (
                    f"{what}: objects appeared or vanished: {sorted(set(after) ^ set(before))}"
                )
                changed = [key for key in before if after[key][0] != before[key][0]]
                assert not changed, f"{what}: the bytes of {changed} changed"
                rewritten = [key for key in before if after[key][1] != before[key][1]]
                assert not rewritten, f"{what}: {rewritten} were rewritten with the same bytes"
                coords_after = _append_dim_coords(store, config.append_dim)
                for name, values in coords_before.items():
                    np.testing.assert_array_equal(coords_after[name], values, err_msg=f"{what}: coordinate {name}")


@contextmanager
def _kit_cluster(n_workers: int) -> Iterator[str]:
    """One LocalCluster for several runs (each run connects to it as a remote cluster): its address."""
    from reformatters.cluster import open_client

    with open_client("local", n_workers=n_workers) as client:
        yield str(client.scheduler_info()["address"])


def _store_state(store: Path) -> dict[str, tuple[bytes, int]]:
    """Every object outside `_internal/` with its bytes and modification time."""
    return {
        str(path.relative_to(store)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(store.rglob("*"))
        if path.is_file() and not str(path.relative_to(store)).startswith("_internal") and ".tmp-" not in path.name
    }


def _append_dim_coords(store: Path, append_dim: str) -> dict[str, npt.NDArray[Any]]:
    published = xr.open_zarr(store, decode_timedelta=True)
    return {str(name): coord.values for name, coord in published.coords.items() if append_dim in coord.dims}
