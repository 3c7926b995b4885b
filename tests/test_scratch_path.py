"""The scratch path (`reformatters.pipeline.scratch`): variable-regions assembled in a worker-local file.

The example dataset's archive is served on loopback and backfilled twice on one LocalCluster of two worker
processes, in memory and through the scratch, into two stores that must hold the same bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.region_job import ExampleRegionJob

from reformatters.cluster import open_client
from reformatters.pipeline.scratch import (
    SCRATCH_DIR_ENVIRON,
    SCRATCH_PREFIX,
    MappedPagesRelease,
    _mapped_region,
    remove_dead_scratch,
    rss_mapped_bytes,
)
from reformatters.region_job import RegionJobFilters
from reformatters.summary import RunSummary
from reformatters.testing.archive_server import ArchiveServer
from reformatters.update.pause import PAUSE_ENV, PAUSE_FILE_ENV, PAUSE_ONCE_ENV, PAUSE_SKIP_ENV

INITS = pd.date_range("2024-01-01", periods=4, freq="6h")
MISSING = [(INITS[1], 3)]
CORRUPT = [(INITS[2], 0)]


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    with open_client("local", n_workers=2) as client:
        yield str(client.scheduler_info()["address"])


def store_objects(store: Path) -> dict[str, bytes]:
    """Every object of a store but the run's own records under `_internal/`."""
    return {
        str(path.relative_to(store)): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and not str(path.relative_to(store)).startswith("_internal")
    }


def assert_decoded_once(summary: RunSummary) -> None:
    for name, entry in summary.variables.items():
        assert entry.decodes == entry.files_ok + entry.files_read_failed, (name, entry)
        assert entry.decodes > 0, name


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_example_scratch_store_is_the_in_memory_store(
    tmp_path: Path, cluster_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source.generate_source(tmp_path / "source", INITS, missing=MISSING, corrupt=CORRUPT)
    dataset = ExampleDataset()
    scratch = tmp_path / "scratch"
    with ArchiveServer(tmp_path / "source") as server:

        def backfill(store: Path, scratch_dir: Path | None) -> RunSummary:
            return dataset.backfill(
                "2024-01-02T00:00",
                cluster=cluster_address,
                store_url=str(store),
                source_url=server.url,
                show_progress=False,
                scratch_dir=None if scratch_dir is None else str(scratch_dir),
            )

        in_memory = backfill(tmp_path / "memory.zarr", None)
        monkeypatch.setattr(ExampleRegionJob, "scratch_region_bytes", 0)
        through_scratch = backfill(tmp_path / "scratch.zarr", scratch)

    memory_objects = store_objects(tmp_path / "memory.zarr")
    scratch_objects = store_objects(tmp_path / "scratch.zarr")
    assert sorted(scratch_objects) == sorted(memory_objects)
    assert any("/c/" in key for key in memory_objects)
    for key, data in memory_objects.items():
        assert scratch_objects[key] == data, key
    # Both variables went through the scratch (temperature chunk by chunk, precipitation row-major for its
    # transform), and nothing is left of it.
    for name in ("temperature_2m", "precipitation_surface"):
        assert through_scratch.variables[name].scratch_bytes > 0, name
        assert in_memory.variables[name].scratch_bytes == 0, name
        assert through_scratch.variables[name].files_read_failed == 1
    assert scratch.is_dir() and list(scratch.iterdir()) == []
    assert_decoded_once(in_memory)
    assert_decoded_once(through_scratch)
    assert through_scratch.decodes == in_memory.decodes == 2 * (len(INITS) * len(source.LEAD_HOURS) - 1)


def test_scratch_of_dead_processes_is_removed_at_worker_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = tmp_path / f"{SCRATCH_PREFIX}{dead_pid()}"
    (dead / "temperature_2m-x").mkdir(parents=True)
    (dead / "temperature_2m-x" / "region.f32").write_bytes(b"\0" * 4096)
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}"
    alive.mkdir()
    unrelated = tmp_path / f"{SCRATCH_PREFIX}notapid"
    unrelated.mkdir()
    monkeypatch.setenv(SCRATCH_DIR_ENVIRON, str(tmp_path))
    with open_client("local", n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert not dead.exists()
    assert alive.is_dir() and unrelated.is_dir()


def test_a_scratch_task_whose_worker_dies_is_redone_whole_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker SIGKILLed in the middle of a scratch task (fields already in its scratch file): Dask runs the task
    again on a live worker, which downloads and decodes the whole variable-region again; the store is the in-memory
    run's, byte for byte, and the dead worker's scratch is removed (its restarted successor cleans up at start)."""
    source.generate_source(tmp_path / "source", INITS)
    dataset = ExampleDataset()
    scratch = tmp_path / "scratch"
    marker = tmp_path / "paused"
    with ArchiveServer(tmp_path / "source") as server:
        common = {"store_url": "", "source_url": server.url, "show_progress": False}
        reference = dataset.backfill(
            "2024-01-02T00:00", cluster="local", n_workers=2, **{**common, "store_url": str(tmp_path / "memory.zarr")}
        )
        in_memory_requests = dict(server.requests)
        server.reset_counters()
        monkeypatch.setattr(ExampleRegionJob, "scratch_region_bytes", 0)
        # Workers inherit these: the first to have decoded four fields into its scratch file parks there; the others
        # pass.
        monkeypatch.setenv(SCRATCH_DIR_ENVIRON, str(scratch))
        monkeypatch.setenv(PAUSE_ENV, "scratch-field")
        monkeypatch.setenv(PAUSE_SKIP_ENV, "3")
        monkeypatch.setenv(PAUSE_FILE_ENV, str(marker))
        monkeypatch.setenv(PAUSE_ONCE_ENV, "1")
        killed: list[int] = []

        def kill_the_paused_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                text = marker.read_text() if marker.exists() else ""
                if text.endswith("\n"):
                    pid = int(text.split()[1])
                    dead_scratch.extend(scratch.glob(f"{SCRATCH_PREFIX}{pid}/*/region.f32"))
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
                time.sleep(0.01)

        dead_scratch: list[Path] = []
        killer = threading.Thread(target=kill_the_paused_worker, daemon=True)
        killer.start()
        through_scratch = dataset.backfill(
            "2024-01-02T00:00",
            cluster="local",
            n_workers=2,
            scratch_dir=str(scratch),
            **{**common, "store_url": str(tmp_path / "scratch.zarr")},
        )
        killer.join(timeout=5)
        scratch_requests = dict(server.requests)
    assert killed and killed[0] != os.getpid(), "no worker paused in its scratch task"
    assert dead_scratch, "the killed task had no scratch file yet"
    memory_objects = store_objects(tmp_path / "memory.zarr")
    scratch_objects = store_objects(tmp_path / "scratch.zarr")
    assert sorted(scratch_objects) == sorted(memory_objects)
    for key, data in memory_objects.items():
        assert scratch_objects[key] == data, key
    # Each scratch task fetches its variable's files (two variables: twice each file the in-memory run fetched
    # once); the four files the killed task had decoded were fetched once more: its variable-region redone.
    refetched = [key for key in in_memory_requests if scratch_requests.get(key, 0) > 2 * in_memory_requests[key]]
    assert len(refetched) >= 4, (sorted(in_memory_requests.items()), sorted(scratch_requests.items()))
    assert_decoded_once(through_scratch)
    assert through_scratch.decodes == reference.decodes
    assert not any(path.exists() for path in dead_scratch)
    assert not list(scratch.glob(f"{SCRATCH_PREFIX}*")), list(scratch.iterdir())


def test_remove_dead_scratch_keeps_running_processes(tmp_path: Path) -> None:
    dead = tmp_path / f"{SCRATCH_PREFIX}{dead_pid()}"
    dead.mkdir()
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}"
    alive.mkdir()
    assert remove_dead_scratch(tmp_path) == [dead]
    assert alive.is_dir() and not dead.exists()


def test_update_and_backfill_over_a_published_store_through_the_scratch_equal_the_in_memory_runs(
    tmp_path: Path, cluster_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update whose first region covers half a shard (merged into the published shard chunk by chunk) and a
    backfill of a published shard with a file gone (the gate keeps the published field): the same bytes both ways,
    and the published fields are kept."""
    inits = pd.date_range("2024-01-01", periods=7, freq="6h")
    root = source.generate_source(tmp_path / "source", inits)
    dataset = ExampleDataset()
    base = tmp_path / "base.zarr"
    dataset.backfill(inits[4], cluster=cluster_address, store_url=str(base), source_url=str(root), show_progress=False)
    # Gone after the base backfill: the re-ingested init 3 (a partial shard) and init 0 (a whole shard) lack a lead.
    for init, hour in [(inits[3], 2), (inits[0], 1)]:
        (root / source.relative_path(init, hour)).unlink()
    summaries: dict[str, list[RunSummary]] = {}
    for mode in ("memory", "scratch"):
        if mode == "scratch":
            monkeypatch.setattr(ExampleRegionJob, "scratch_region_bytes", 0)
        store = tmp_path / f"{mode}.zarr"
        shutil.copytree(base, store)
        scratch_dir = str(tmp_path / "scratch") if mode == "scratch" else None
        common = {"cluster": cluster_address, "store_url": str(store), "source_url": str(root), "show_progress": False}
        update = dataset.update(now=inits[-1], scratch_dir=scratch_dir, **common)
        backfill = dataset.backfill(
            inits[2], filters=RegionJobFilters.parse(end=inits[1]), scratch_dir=scratch_dir, **common
        )
        summaries[mode] = [update, backfill]
    memory_objects = store_objects(tmp_path / "memory.zarr")
    scratch_objects = store_objects(tmp_path / "scratch.zarr")
    assert sorted(scratch_objects) == sorted(memory_objects)
    for key, data in memory_objects.items():
        assert scratch_objects[key] == data, key
    assert list((tmp_path / "scratch").iterdir()) == []
    for summary in summaries["scratch"]:
        assert summary.variables["temperature_2m"].scratch_bytes > 0
        assert summary.variables["temperature_2m"].files_not_found == 1
        assert_decoded_once(summary)
    published = xr.open_zarr(tmp_path / "scratch.zarr", decode_timedelta=True)["temperature_2m"]
    for init, hour in [(inits[3], 2), (inits[0], 1)]:
        np.testing.assert_allclose(
            published.sel(init_time=init).isel(lead_time=hour).values, source.temperature(init, hour), rtol=1e-3
        )


@pytest.mark.parametrize(("index_location", "start"), [("end", 5), ("start", 5), ("end", 6)])
def test_partial_shard_merged_chunk_by_chunk_is_zarrs_merge(tmp_path: Path, index_location: str, start: int) -> None:
    """Edge chunks, absent published chunks, chunks the region does not touch (kept as stored), a slab of the
    region without values over a published field and one over nothing: `merge_partial_shards_by_chunk` writes
    zarr's bytes and keeps the same published fields."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    from reformatters.common.storage import ObjectStore
    from reformatters.pipeline.kernels import ShardPlan, _merge_partial_shards, merge_partial_shards_by_chunk
    from reformatters.pipeline.shard_encoding import ShardEncoder

    shape, shards, chunks = (7, 3, 10, 13), (4, 3, 8, 8), (2, 3, 4, 4)
    rng = np.random.default_rng(4)
    published_values = rng.normal(280, 10, shape).astype(np.float32)
    published_values[:, :, 4:8, 8:] = np.nan  # whole chunks of only fill: left out of the published shards
    published_values[6, 2] = np.nan  # a published field that is all NaN
    array = zarr.open_group(str(tmp_path), mode="w").create_array(
        "var",
        shape=shape,
        chunks=shards,
        dtype="float32",
        fill_value=float("nan"),
        serializer=ShardingCodec(
            chunk_shape=chunks,
            codecs=[BytesCodec(), BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()],
            index_location=index_location,
        ),
        compressors=None,
    )
    array[...] = published_values
    var_metadata = (tmp_path / "var" / "zarr.json").read_bytes()
    store = ObjectStore(str(tmp_path))
    region = slice(start, 7)
    values = rng.normal(250, 5, (7 - start, *shape[1:])).astype(np.float32)
    has_values = np.ones((7 - start, 3), dtype=bool)
    for slab in [(5 - start, 1), (6 - start, 2)]:  # over a published field, and over the published all-NaN one
        if slab[0] < 0:
            continue
        has_values[slab] = False
        values[slab] = np.nan
    encoder = ShardEncoder(var_metadata)
    plan = ShardPlan(shape, 0, [], [1])
    expected, expected_kept = _merge_partial_shards("var", values, has_values, [1], region, 0, var_metadata, store)
    merged: dict[str, bytes] = {}
    kept = merge_partial_shards_by_chunk(encoder, "var", values, has_values, plan, region, store, merged.__setitem__)
    assert kept == expected_kept == (1 if start == 5 else 0)
    assert sorted(merged) == sorted(expected) and len(merged) == 4
    for key, data in expected.items():
        assert merged[key] == data, key
    # Written chunk by chunk into files (the scratch path's way, the index reserved first when it leads): the same.
    files: dict[str, io.BytesIO] = {}

    @contextmanager
    def stream(key: str) -> Iterator[BinaryIO]:
        files[key] = io.BytesIO()
        yield files[key]

    streamed_kept = merge_partial_shards_by_chunk(
        encoder, "var", values, has_values, plan, region, store, merged.__setitem__, stream
    )
    assert streamed_kept == kept
    assert {key: out.getvalue() for key, out in files.items()} == expected


def _fill_mapped(path: Path, fields: int, limit: int | None) -> tuple[int, int]:
    """Write `fields` 4 MiB fields through a scratch mapping (released every `limit` bytes of growth, or never);
    the process's peak growth of mapped resident memory while it did, and the releases made."""
    buffer, mapped = _mapped_region(path, (fields, 1024, 1024))
    release = MappedPagesRelease(mapped, limit=limit or 1 << 62, interval=0.001)
    with release:
        for index in range(fields):
            buffer[index] = np.float32(index)
            release.check()
    del buffer
    release.drop_mapping()
    mapped.close()
    return release.peak - release.start, release.releases


def test_scratch_mapping_stays_bounded_and_keeps_what_was_written(tmp_path: Path) -> None:
    """Dask's memory monitor counts a scratch file's resident mapped pages as the worker's memory: filling 256 MiB
    through the mapping grows it by about that much, unless the pages are flushed and dropped as they grow."""
    fields, limit = 64, 32 << 20
    unbounded, _ = _fill_mapped(tmp_path / "unbounded.f32", fields, None)
    bounded, releases = _fill_mapped(tmp_path / "bounded.f32", fields, limit)
    assert unbounded > 200 << 20, f"the mapping grew by {unbounded >> 20} MiB only: nothing to bound here"
    assert releases >= 4
    assert bounded < limit + (16 << 20), f"the mapping grew by {bounded >> 20} MiB with a {limit >> 20} MiB limit"
    written = np.fromfile(tmp_path / "bounded.f32", dtype=np.float32).reshape(fields, -1)
    assert (written == np.arange(fields, dtype=np.float32)[:, None]).all(), "a released page lost what was written"
    assert rss_mapped_bytes() > 0
