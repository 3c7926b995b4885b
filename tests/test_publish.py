"""The publisher's parts without a cluster: waiting for the lease, and merging coordinates with the published."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.publish import StoreNotWritableError, hold_lease, merge_with_published
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
