"""The work each task does. Plain functions of their inputs: no Dask in here, so each is testable alone."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJob, SourceFileCoord, SourceFileStatus

log = logging.getLogger("reformatters.pipeline")

_threads_configured = False


def limit_library_threads() -> None:
    """One thread for zarr's and Blosc's own pools: Dask's workers are the parallelism."""
    global _threads_configured
    if _threads_configured:
        return
    import numcodecs.blosc
    import zarr

    numcodecs.blosc.set_nthreads(1)
    numcodecs.blosc.use_threads = False
    zarr.config.set({"threading.max_workers": 1})
    _threads_configured = True


@dataclass(frozen=True)
class DownloadOutcome:
    coord: SourceFileCoord
    payload: bytes | Mapping[str, bytes] | None
    failure: str | None
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class ReadOutcome:
    var_name: str
    coords: list[SourceFileCoord]
    fields: list[npt.NDArray[np.float32] | None]
    bytes_fetched: int


@dataclass(frozen=True)
class EncodedVariable:
    var_name: str
    objects: dict[str, bytes]
    results: list[SourceFileCoord]
    bytes_fetched: int


@dataclass(frozen=True)
class VariableResult:
    var_name: str
    results: list[SourceFileCoord]
    bytes_fetched: int
    bytes_written: int
    objects_written: int
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, status: SourceFileStatus) -> int:
        return sum(1 for c in self.results if c.status == status)


def _payload_size(payload: bytes | Mapping[str, bytes]) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(v) for v in payload.values())


def download_kernel(job: RegionJob[Any, Any], coord: SourceFileCoord, group: Sequence[Any]) -> DownloadOutcome:
    started = time.perf_counter()
    try:
        payload = job.download_file(coord, group)
        if isinstance(payload, Path):
            # Bytes travel through Dask, so the read may run on any worker; the file goes at once.
            downloaded_path = payload
            try:
                payload = downloaded_path.read_bytes()
            finally:
                downloaded_path.unlink(missing_ok=True)
    except Exception as error:  # noqa: BLE001 - one bad file never sinks a run
        reason = f"{type(error).__name__}: {error}"
        log.warning("download failed %s: %s", _url_of(coord), reason)
        return DownloadOutcome(coord, None, reason, 0, time.perf_counter() - started)
    return DownloadOutcome(coord, payload, None, _payload_size(payload), time.perf_counter() - started)


def _url_of(coord: SourceFileCoord) -> str:
    try:
        return coord.get_url()
    except Exception:  # noqa: BLE001
        return repr(coord)


def read_kernel(
    job: RegionJob[Any, Any], data_var: Any, downloads: Sequence[DownloadOutcome], count_bytes: bool
) -> ReadOutcome:
    coords: list[SourceFileCoord] = []
    fields: list[npt.NDArray[np.float32] | None] = []
    fetched = 0
    for outcome in downloads:
        if outcome.payload is None:
            coords.append(outcome.coord.with_status(SourceFileStatus.DownloadFailed, outcome.failure))
            fields.append(None)
            continue
        if count_bytes:
            fetched += outcome.nbytes
        try:
            values = np.asarray(job.read_data(outcome.coord, data_var, outcome.payload), dtype=np.float32)
        except Exception as error:  # noqa: BLE001 - one bad file never sinks a run
            reason = f"{type(error).__name__}: {error}"
            log.warning("read failed %s %s: %s", _url_of(outcome.coord), data_var.name, reason)
            coords.append(outcome.coord.with_status(SourceFileStatus.ReadFailed, reason))
            fields.append(None)
            continue
        coords.append(outcome.coord.with_status(SourceFileStatus.Succeeded))
        fields.append(values)
    return ReadOutcome(data_var.name, coords, fields, fetched)


class RegionBufferPool:
    """Variable-region buffers reused across encodes within a worker process.

    A GFS variable-region is ~0.9 GB. Fresh memory costs a page fault per 4 KiB page, which here took
    1.9 s per variable-region against 0.05 s to refill a reused buffer with NaN. At most `keep` idle buffers
    per shape stay allocated, so a worker holds one variable-region between encodes, never more.
    """

    def __init__(self, keep: int = 1) -> None:
        self._keep = keep
        self._idle: dict[tuple[tuple[int, ...], str], list[npt.NDArray[Any]]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any, fill: float) -> npt.NDArray[Any]:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            idle = self._idle.get(key)
            buffer = idle.pop() if idle else None
        if buffer is None:
            return np.full(shape, fill, dtype=dtype)
        buffer.fill(fill)
        return buffer

    def give_back(self, buffer: npt.NDArray[Any]) -> None:
        key = (buffer.shape, buffer.dtype.str)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._keep:
                idle.append(buffer)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())


REGION_BUFFERS = RegionBufferPool()


def assemble_variable(
    job: RegionJob[Any, Any], data_var: Any, reads: Sequence[ReadOutcome]
) -> tuple[xr.DataArray, list[SourceFileCoord]]:
    """The processing region of one variable, NaN where no file delivered a field.

    The values come from `REGION_BUFFERS`; give them back once nothing refers to them.
    """
    template = job.template_ds[data_var.name]
    values = REGION_BUFFERS.take(template.shape, np.float32, np.nan)
    indexes = {dim: template.get_index(dim) for dim in template.dims}
    results: list[SourceFileCoord] = []
    for read in reads:
        for coord, field_values in zip(read.coords, read.fields, strict=True):
            location = coord.out_loc()
            unknown = set(location) - set(template.dims)
            if unknown:
                raise ValueError(f"{type(coord).__name__}.out_loc() names dims {unknown} not in {template.dims}")
            position = tuple(
                indexes[dim].get_loc(location[dim]) if dim in location else slice(None) for dim in template.dims
            )
            results.append(coord)
            if field_values is None:
                continue
            target = values[position]
            if field_values.shape != target.shape:
                raise ValueError(
                    f"{data_var.name}: read_data returned shape {field_values.shape} for {coord.get_url()}, "
                    f"the template expects {target.shape}"
                )
            values[position] = field_values
    data_array = xr.DataArray(values, coords=template.coords, dims=template.dims, name=data_var.name)
    return data_array, results


def _shard_ranges(length: int, write_unit: int, start: int, stop: int) -> list[int]:
    return list(range(start // write_unit, -(-stop // write_unit)))


def encode_variable_kernel(
    job: RegionJob[Any, Any],
    data_var: Any,
    reads: Sequence[ReadOutcome],
    var_metadata: bytes,
    final_store: ObjectStore,
) -> EncodedVariable:
    """Transform one variable-region and encode its whole shards in memory, ready to upload."""
    limit_library_threads()
    data_array, results = assemble_variable(job, data_var, reads)
    try:
        return _encode_assembled(job, data_var, data_array, results, reads, var_metadata, final_store)
    finally:
        # Encoded chunks are copies: the buffer is free once the shards are encoded (or the encode failed).
        REGION_BUFFERS.give_back(data_array.values)


def _encode_assembled(
    job: RegionJob[Any, Any],
    data_var: Any,
    data_array: xr.DataArray,
    results: list[SourceFileCoord],
    reads: Sequence[ReadOutcome],
    var_metadata: bytes,
    final_store: ObjectStore,
) -> EncodedVariable:
    import zarr
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    job.apply_data_transformations(data_array, data_var)

    processing = job.get_processing_region()
    region = job.region
    axis = data_array.dims.index(job.append_dim)
    offset = region.start - processing.start
    cut = [slice(None)] * data_array.ndim
    cut[axis] = slice(offset, offset + (region.stop - region.start))
    region_values = data_array.values[tuple(cut)]
    in_region = set(job.template_ds.get_index(job.append_dim)[offset : offset + region.stop - region.start])
    results = [c for c in results if c.out_loc().get(job.append_dim) in in_region]

    buffer = default_buffer_prototype().buffer
    store_dict: dict[str, Any] = {
        "zarr.json": buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'),
        f"{data_var.name}/zarr.json": buffer.from_bytes(var_metadata),
    }
    memory_store = zarr.storage.MemoryStore(store_dict=store_dict)
    array = zarr.open_array(memory_store, path=data_var.name, mode="r+")
    write_unit = array.shards or array.chunks
    full_length = array.shape[axis]
    if region.stop > full_length:
        raise ValueError(
            f"{data_var.name}: region {region} runs past the array's {job.append_dim} length {full_length}"
        )

    # A shard covered only in part is merged into its published content (design invariant 2).
    shard_grid = [range(-(-n // u)) for n, u in zip(array.shape, write_unit, strict=True)]
    touched = _shard_ranges(full_length, write_unit[axis], region.start, region.stop)
    for index in touched:
        shard_start = index * write_unit[axis]
        shard_stop = min(shard_start + write_unit[axis], full_length)
        if region.start <= shard_start and region.stop >= shard_stop:
            continue
        grid = list(shard_grid)
        grid[axis] = range(index, index + 1)
        for shard_index in itertools.product(*grid):
            key = f"{data_var.name}/c/" + "/".join(map(str, shard_index))
            published = final_store.get(key)
            if published is not None:
                store_dict[key] = buffer.from_bytes(published)

    selection = [slice(None)] * array.ndim
    selection[axis] = slice(region.start, region.stop)
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.open_array(memory_store, path=data_var.name, mode="r+")
        array[tuple(selection)] = region_values

    prefix = f"{data_var.name}/c/"
    objects = {key: value.to_bytes() for key, value in store_dict.items() if key.startswith(prefix)}
    return EncodedVariable(data_var.name, objects, results, sum(r.bytes_fetched for r in reads))


def upload_kernel(encoded: EncodedVariable, final_store: ObjectStore) -> VariableResult:
    """Copy chunk data, never metadata, into the final store. Each object is written whole."""
    items = sorted(encoded.objects.items())
    if final_store.is_local:
        for key, data in items:
            final_store.put(key, data)
    else:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda item: final_store.put(*item), items))
    return VariableResult(
        var_name=encoded.var_name,
        results=encoded.results,
        bytes_fetched=encoded.bytes_fetched,
        bytes_written=sum(len(d) for _, d in items),
        objects_written=len(items),
    )
