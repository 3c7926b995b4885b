"""The publisher's parts without a cluster: waiting for the lease, and merging coordinates with the published."""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.publish import Publisher, StoreNotWritableError, hold_lease, merge_with_published
from reformatters.region_job import ForecastSourceFileCoord, SourceFileCoord, SourceFileStatus
from reformatters.registry import get_dataset
from reformatters.update.lease import LEASE_KEY, LeaseHeldError, UpdateLease, read_lease


def test_a_backfill_waits_for_the_lease_and_gives_up_after_its_wait(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store.zarr")
    other = UpdateLease(store)
    other.acquire()
    with pytest.raises(LeaseHeldError, match=r"Waited 1 s for it \(--lease-wait\)"), hold_lease(store, wait_seconds=1):
        pass
    assert store.exists(LEASE_KEY), "the other publisher's lease stays"

    release = threading.Timer(1.0, other.release)
    release.start()
    started = time.monotonic()
    with hold_lease(store, wait_seconds=60) as lease:
        waited = time.monotonic() - started
        lease.verify()
    release.join()
    assert waited >= 0.9, "the lease was held until the other publisher released it"
    released = read_lease(store)
    assert released is not None and released.released, "the lease is released at the end of the block"


def test_an_update_does_not_wait(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store.zarr")
    with UpdateLease(store), pytest.raises(LeaseHeldError, match="another publisher is writing"), hold_lease(store):
        pass


def test_a_store_that_cannot_be_written_fails_before_anything_else(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    unwritable = ObjectStore(tmp_path / "a-file" / "store.zarr")
    with pytest.raises(StoreNotWritableError, match="cannot write to the store"), hold_lease(unwritable):
        pass


def _coords(length: int, ingested_hours: list[float]) -> xr.Dataset:
    init = pd.date_range("2024-01-01", periods=length, freq="6h")
    ingested = np.array([np.timedelta64("NaT") if np.isnan(h) else np.timedelta64(int(h), "h") for h in ingested_hours])
    return xr.Dataset(
        coords={"init_time": init, "ingested_forecast_length": ("init_time", ingested.astype("timedelta64[ns]"))}
    )


def test_coordinates_come_from_the_run_only_where_it_covered_every_variable() -> None:
    nan = float("nan")
    template = _coords(5, [nan] * 5)
    published = _coords(4, [5, 5, 5, 3])
    # The run's hook: positions 1 and 3 reprocessed (3 with every variable, 1 with only some), 4 is new.
    updated = _coords(5, [nan, 2, nan, 5, 4])
    covered_by_all = np.array([False, False, False, True, False])
    merged = merge_with_published(updated, template, published, "init_time", covered_by_all)
    hours = (merged["ingested_forecast_length"].values / np.timedelta64(1, "h")).tolist()
    assert hours == [5, 5, 5, 5, 4]


def test_the_append_dimension_never_gets_shorter() -> None:
    nan = float("nan")
    template = _coords(5, [nan] * 5)
    published = _coords(4, [5, 5, 5, 5])
    updated = _coords(2, [1, 1])  # a run that ends early (a slice, or an end before the published end)
    merged = merge_with_published(updated, template, published, "init_time", np.ones(5, dtype=bool))
    assert merged.sizes["init_time"] == 4
    hours = (merged["ingested_forecast_length"].values / np.timedelta64(1, "h")).tolist()
    assert hours == [1, 1, 5, 5]


def test_metadata_is_written_without_the_cluster_a_run_is_closing(tmp_path: Path) -> None:
    """A run whose every source file was missing publishes a dataset of length 0, and xarray loads zero-size dask
    arrays when it writes metadata. That happens in this process: the run publishes while its workers shut down,
    and a task sent to that cluster is cancelled (a `FutureCancelledError` at the end of a good run)."""
    import dask.array
    from distributed import Client, LocalCluster

    from reformatters.publish import tmp_metadata_store

    ds = xr.Dataset(
        {"v": (("init_time", "x"), dask.array.zeros((0, 3), chunks=(1, 3), dtype="float32"))},
        coords={"init_time": pd.DatetimeIndex([]), "x": np.arange(3)},
    )
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        transitions_before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        with tmp_metadata_store(ds) as tmp_store:
            written = xr.open_zarr(tmp_store)
            assert written["v"].shape == (0, 3)
        transitions_after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert transitions_after == transitions_before, "the metadata write sent tasks to the cluster"


class _Coord(ForecastSourceFileCoord):
    def get_url(self) -> str:
        return f"{self.source_url}/{self.init_time:%Y%m%d%H}/f{self.lead_hours:03d}"


def _region_results(
    template: xr.Dataset,
    region: slice,
    var_names: list[str],
    rng: np.random.Generator,
    *,
    arrived: bool = True,
    shorter: int = 0,
) -> dict[str, list[SourceFileCoord]]:
    """Each file of the region for each variable: each init's run reaches a lead of its own (none for some inits,
    all of them if not `arrived`), `shorter` leads less for these variables; files before it are ok or, now and
    then, failed."""
    inits = template.get_index("init_time")[region]
    leads = template.get_index("lead_time")[:12]
    reached = {init: (init.value // 21_600_000_000_000) * 5 % (len(leads) + 1) if arrived else 0 for init in inits}
    results: dict[str, list[SourceFileCoord]] = {}
    for name in var_names:
        coords: list[SourceFileCoord] = []
        for init in inits:
            for number, lead in enumerate(leads):
                coord = _Coord(source_url="src", init_time=init, lead_time=lead)
                if number >= reached[init] - shorter:
                    coords.append(coord.with_status(SourceFileStatus.DownloadFailed, "404", not_found=True))
                elif rng.random() < 0.1:
                    coords.append(coord.with_status(SourceFileStatus.ReadFailed, "bad message"))
                else:
                    coords.append(coord.with_status(SourceFileStatus.Succeeded))
        results[name] = coords
    return results


def _publisher(template: xr.Dataset, job_class: Any, var_names: list[str], tmp_path: Path) -> Publisher:
    store = ObjectStore(tmp_path / "store.zarr")
    return Publisher(
        job_class=job_class,
        template_ds=template,
        append_dim="init_time",
        final_store=store,
        lease=UpdateLease(store),
        data_var_names=var_names,
        published_ds=None,
    )


def test_results_folded_region_by_region_publish_what_the_hook_makes_of_all_of_them(tmp_path: Path) -> None:
    """The publisher keeps no file outcomes, only what `update_template_with_results` makes of each region; the
    coordinates it publishes equal the hook's on the whole run's results (GFS: `ingested_forecast_length`, the
    trim to the last init with data). Regions arrive out of order and in two variable groups each."""
    dataset = get_dataset("noaa-gfs-forecast")
    config = dataset.template_config
    template = config.get_template(pd.Timestamp(config.append_dim_start) + pd.Timedelta("6h") * 30)
    var_names = [v.name for v in config.data_vars]
    groups = [var_names[: len(var_names) // 2], var_names[len(var_names) // 2 :]]
    rng = np.random.default_rng(7)
    regions = [slice(p, p + 1) for p in range(0, 27)] + [slice(27, 29)]  # the last init's data never arrives
    publisher = _publisher(template, dataset.region_job_class, var_names, tmp_path)
    everything: dict[str, list[SourceFileCoord]] = {}
    for region in rng.permutation(len(regions)):
        for number, group in enumerate(groups):
            # The later group reaches fewer leads: the hook must see the whole region's results, not its last group's.
            results = _region_results(
                template, regions[region], group, rng, arrived=region < len(regions) - 1, shorter=3 * number
            )
            publisher.add(regions[region], results, complete=number == len(groups) - 1)
            for name, coords in results.items():
                everything.setdefault(name, []).extend(coords)
    assert publisher.pending_regions() == []

    folded, run_length = publisher.merged()

    whole = dataset.region_job_class.update_template_with_results(template, "init_time", everything)
    ran = np.zeros(template.sizes["init_time"], dtype=bool)
    ran[:29] = True
    expected = merge_with_published(whole, template, None, "init_time", ran)
    assert run_length == whole.sizes["init_time"] < 29
    xr.testing.assert_identical(folded.coords.to_dataset(), expected.coords.to_dataset())
    ingested = folded["ingested_forecast_length"].values[:run_length]
    assert np.isnat(ingested).any() and len(np.unique(ingested[~np.isnat(ingested)])) > 5, ingested


def test_the_publishers_memory_does_not_grow_with_the_files_of_the_run(tmp_path: Path) -> None:
    """2,000 regions of results added: what the publisher keeps is a tiny fraction of the results' own size."""
    dataset = get_dataset("example")
    config = dataset.template_config
    template = config.get_template(pd.Timestamp(config.append_dim_start) + pd.Timedelta("6h") * 4000)
    var_names = [v.name for v in config.data_vars]
    regions = [slice(p, p + 2) for p in range(0, 4000, 2)]
    rng = np.random.default_rng(1)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [_region_results(template, region, var_names, rng) for region in regions]
        results_size = tracemalloc.get_traced_memory()[0] - before
        del kept
        publisher = _publisher(template, dataset.region_job_class, var_names, tmp_path)
        before = tracemalloc.get_traced_memory()[0]
        for region in regions:
            publisher.add(region, _region_results(template, region, var_names, rng))
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert publisher.merged()[1] > 3900
    assert results_size > 10_000_000, results_size
    assert retained < results_size / 100, (retained, results_size)
