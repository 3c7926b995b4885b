"""The work each task does. Plain functions of their inputs: no Dask in here, so each is testable alone."""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import xarray as xr

from reformatters.common.arrays import holds_only_nan
from reformatters.common.binary_rounding import round_float32_inplace
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.published_fields import PublishedShard, keep_published_fields
from reformatters.pipeline.region_layout import RegionLayout
from reformatters.pipeline.shard_encoding import ShardEncoder, padded_shape
from reformatters.pipeline.source_results import SourceFileResults
from reformatters.region_job import FieldShapeError, RegionJob, SourceFileCoord, SourceFileStatus
from reformatters.replicas import REPLICAS_WRITTEN, ReplicaUpload
from reformatters.sources.download import FetchedIndexes, declare_host_request_caps, prefetch_indexes, seed_indexes
from reformatters.sources.errors import SOURCE_FILE_FAILURES

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
    not_found: bool = False  # the source has no such file (yet)

    def failed_coord(self) -> SourceFileCoord:
        return self.coord.with_status(SourceFileStatus.DownloadFailed, self.failure, not_found=self.not_found)


@dataclass(frozen=True)
class ReadOutcome:
    var_name: str
    coords: list[SourceFileCoord]
    fields: list[npt.NDArray[np.float32] | None]
    bytes_fetched: int
    decodes: int = 0  # messages handed to the decoder


@dataclass(frozen=True)
class EncodedVariable:
    var_name: str
    objects: dict[str, bytes]
    results: Sequence[SourceFileCoord]
    bytes_fetched: int
    kept_published_fields: int = 0  # fields the run had no values for, kept from the published shards
    decodes: int = 0  # messages handed to the decoder for this variable
    extra: dict[str, Any] = field(default_factory=dict)  # reported in `VariableResult.extra`
    upload_threads: int = 8  # objects uploaded at once to a remote store (each held in memory while it goes)


@dataclass(frozen=True)
class VariableResult:
    var_name: str
    results: Sequence[SourceFileCoord]
    bytes_fetched: int
    bytes_written: int
    objects_written: int
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    decodes: int = 0  # messages handed to the decoder: one per field read, whatever the graph's shape
    fork: Any = None  # an Icechunk store's fork holding the uploads, merged and committed with its region

    def count(self, status: SourceFileStatus) -> int:
        return sum(1 for c in self.results if c.status == status)


def _payload_size(payload: bytes | Mapping[str, bytes]) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(v) for v in payload.values())


def index_kernel(job: RegionJob[Any, Any], coords: Sequence[SourceFileCoord]) -> FetchedIndexes:
    """The inventories of a batch of source files (`RegionJob.source_index_url`), for every download of the batch."""
    declare_host_request_caps(job.source_request_caps())
    return prefetch_indexes([url for coord in coords if (url := job.source_index_url(coord)) is not None])


def download_kernel(
    job: RegionJob[Any, Any],
    coords: Sequence[SourceFileCoord],
    group: Sequence[Any],
    indexes: FetchedIndexes | None = None,
) -> list[DownloadOutcome]:
    """Download a batch of source files one after another (`RegionJob.download_batch_size` of them)."""
    declare_host_request_caps(job.source_request_caps())
    if indexes is not None:
        seed_indexes(indexes)
    if group:
        encoding = group[0].encoding
        REGION_BUFFERS.warm(region_buffer_shape(job, group[0], encoding.shards or encoding.chunks), np.float32, np.nan)
    return [download_one(job, coord, group) for coord in coords]


def download_one(job: RegionJob[Any, Any], coord: SourceFileCoord, group: Sequence[Any]) -> DownloadOutcome:
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
    except SOURCE_FILE_FAILURES as error:  # one bad file never sinks a run; any other error is a bug
        reason = f"{type(error).__name__}: {error}"
        # Per file at debug: a backfill meets thousands of files not published (yet); the summary counts them.
        log.debug("download failed %s: %s", _url_of(coord), reason)
        not_found = isinstance(error, FileNotFoundError)
        return DownloadOutcome(coord, None, reason, 0, time.perf_counter() - started, not_found)
    return DownloadOutcome(coord, payload, None, _payload_size(payload), time.perf_counter() - started)


def _url_of(coord: SourceFileCoord) -> str:
    try:
        return coord.get_url()
    except Exception:  # noqa: BLE001
        return repr(coord)


def round_to_keep_bits(values: npt.NDArray[np.float32], data_var: Any) -> None:
    """Binary rounding to the variable's `keep_mantissa_bits`, in place (nothing for 'no-rounding')."""
    keep = data_var.internal_attrs.keep_mantissa_bits
    if isinstance(keep, int):
        round_float32_inplace(values, keep)


def read_one(
    job: RegionJob[Any, Any], data_var: Any, outcome: DownloadOutcome
) -> tuple[SourceFileCoord, npt.NDArray[np.float32] | None]:
    """One variable's field from one download, with the coord's status; None where there is no field."""
    if outcome.payload is None:
        return outcome.failed_coord(), None
    try:
        values = np.asarray(job.read_data(outcome.coord, data_var, outcome.payload), dtype=np.float32)
        if not job.transforms_region(data_var):
            round_to_keep_bits(values, data_var)
    except SOURCE_FILE_FAILURES as error:  # a bug in the dataset's code (anything else) fails the task
        return _read_failed(outcome, data_var, error), None
    return outcome.coord.with_status(SourceFileStatus.Succeeded), values


def read_one_into(
    job: RegionJob[Any, Any], data_var: Any, outcome: DownloadOutcome, out: npt.NDArray[np.float32]
) -> tuple[SourceFileCoord, bool]:
    """`read_one` decoding straight into `out` (NaN-filled); the coord with its status, and whether it read."""
    if outcome.payload is None:
        return outcome.failed_coord(), False
    try:
        job.read_data_into(outcome.coord, data_var, outcome.payload, out)
        if not job.transforms_region(data_var):
            round_to_keep_bits(out, data_var)
    except SOURCE_FILE_FAILURES as error:  # a bug in the dataset's code (anything else) fails the task
        out[...] = np.nan  # whatever a failed decode left there is not data
        return _read_failed(outcome, data_var, error), False
    return outcome.coord.with_status(SourceFileStatus.Succeeded), True


def _read_failed(outcome: DownloadOutcome, data_var: Any, error: Exception) -> SourceFileCoord:
    reason = f"{type(error).__name__}: {error}"
    log.warning("read failed %s %s: %s", _url_of(outcome.coord), data_var.name, reason)
    return outcome.coord.with_status(SourceFileStatus.ReadFailed, reason)


def read_kernel(
    job: RegionJob[Any, Any], data_var: Any, download_batches: Sequence[Sequence[DownloadOutcome]], count_bytes: bool
) -> ReadOutcome:
    """Decode one variable from some download batches (the graph shape with separate read tasks)."""
    downloads = [outcome for batch in download_batches for outcome in batch]
    coords: list[SourceFileCoord] = []
    fields: list[npt.NDArray[np.float32] | None] = []
    for outcome in downloads:
        coord, values = read_one(job, data_var, outcome)
        coords.append(coord)
        fields.append(values)
    decodes = sum(1 for outcome in downloads if outcome.payload is not None)
    return ReadOutcome(data_var.name, coords, fields, _fetched(downloads) if count_bytes else 0, decodes)


def _fetched(downloads: Sequence[DownloadOutcome]) -> int:
    return sum(d.nbytes for d in downloads if d.payload is not None)


class RegionBufferPool:
    """Variable-region buffers reused across encodes within a worker process.

    A GFS variable-region is ~0.9 GB. Fresh memory costs a page fault per 4 KiB page: 1.5-2.5 s for the first
    variable-region a worker allocates on this project's test machines (a VM backing guest memory lazily),
    0.05 s to refill a reused buffer with NaN. At most `keep` buffers stay idle, whatever their shape, so a
    worker holds one variable-region between encodes, never more. `warm` allocates the first one in the
    background while the downloads run, so no shard write waits for it. A buffer given back with the map of
    its 2-D slabs that may hold values is refilled there only (most of a region is often missing fields).
    Buffers of the same size serve either `RegionLayout`: the refill follows the layout the buffer was used in.
    """

    def __init__(self, keep: int = 1) -> None:
        self._keep = keep
        self._idle: list[_IdleBuffer] = []
        self._in_use = 0
        self._warming: threading.Thread | None = None
        self._lock = threading.Lock()

    def take(self, layout: RegionLayout | tuple[int, ...], dtype: Any, fill: float) -> npt.NDArray[Any]:
        """A buffer of `layout.memory_shape` (a plain shape means row-major) holding only `fill`."""
        layout = _as_layout(layout)
        with self._lock:
            warming = self._warming
        if warming is not None:
            warming.join()
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(layout.memory_shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            self._in_use += 1
            idle = next((b for b in self._idle if (b.buffer.nbytes, b.buffer.dtype) == (nbytes, dtype)), None)
            if idle is not None:
                self._idle.remove(idle)
        if idle is None:
            return fresh_buffer(layout.memory_shape, dtype, fill)
        buffer = idle.buffer
        if idle.dirty_slabs is None or not idle.dirty_slabs.shape or not _same_fill(idle.fill, fill):
            buffer.fill(fill)
        else:
            for index in zip(*np.nonzero(idle.dirty_slabs), strict=True):
                idle.layout.fill_slab(buffer, tuple(int(i) for i in index), fill)
        return buffer.reshape(layout.memory_shape)

    def give_back(
        self,
        buffer: npt.NDArray[Any],
        fill: float | None = None,
        dirty_slabs: npt.NDArray[np.bool_] | None = None,
        layout: RegionLayout | None = None,
    ) -> None:
        """Return `buffer` to the pool. With its `fill` and `dirty_slabs` (over its layout's leading dims: the 2-D
        slabs that may hold anything but `fill`), the next `take` refills only those; otherwise all of it.
        `layout`: how the buffer was used (default: row-major over its shape)."""
        layout = layout or RegionLayout.rows(buffer.shape)
        if buffer.shape != layout.memory_shape:
            raise ValueError(f"a buffer of shape {buffer.shape} given back for a layout of {layout.memory_shape}")
        if dirty_slabs is not None and dirty_slabs.shape != layout.slab_grid:
            raise ValueError(f"dirty_slabs of shape {dirty_slabs.shape} for a buffer of shape {layout.shape}")
        idle = _IdleBuffer(buffer, layout, fill, None if fill is None else dirty_slabs)
        with self._lock:
            self._in_use = max(0, self._in_use - 1)
            self._idle.append(idle)
            del self._idle[: max(0, len(self._idle) - self._keep)]

    def warm(self, layout: RegionLayout | tuple[int, ...], dtype: Any, fill: float) -> bool:
        """Start allocating a buffer in the background if this worker has none at all; True if started."""
        layout = _as_layout(layout)
        with self._lock:
            if self._idle or self._in_use or self._warming is not None or self._keep < 1:
                return False
            self._warming = threading.Thread(
                target=self._allocate, args=(layout, dtype, fill), name="region-buffer-warm", daemon=True
            )
            self._warming.start()
            return True

    def _allocate(self, layout: RegionLayout, dtype: Any, fill: float) -> None:
        try:
            buffer = fresh_buffer(layout.memory_shape, dtype, fill)
            with self._lock:
                self._idle.append(_IdleBuffer(buffer, layout, fill, np.zeros(layout.slab_grid, dtype=bool)))
                del self._idle[: max(0, len(self._idle) - self._keep)]
        finally:
            with self._lock:
                self._warming = None

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)


def _as_layout(layout: RegionLayout | tuple[int, ...]) -> RegionLayout:
    return layout if isinstance(layout, RegionLayout) else RegionLayout.rows(layout)


@dataclass(frozen=True)
class _IdleBuffer:
    buffer: npt.NDArray[Any]
    layout: RegionLayout  # how its last user laid values out: where `dirty_slabs` are
    fill: float | None  # what the buffer holds outside dirty_slabs; None: unknown, refill all of it
    dirty_slabs: npt.NDArray[np.bool_] | None


def _same_fill(held: float | None, wanted: float) -> bool:
    return held is not None and (held == wanted or (np.isnan(held) and np.isnan(wanted)))


def fresh_buffer(shape: tuple[int, ...], dtype: Any, fill: float) -> npt.NDArray[Any]:
    """A new array filled with `fill`, in anonymous memory the kernel populates up front.

    Measured per GFS variable-region (0.9 GB) on a 2-core VM: numpy's allocator asks for transparent huge pages,
    and faulting those in took 0.1-2.3 s, ordinary pages faulted in one at a time 0.8-3.0 s (worse while the
    worker's download threads allocate too), pages populated by the kernel in one call (MAP_POPULATE) 0.5 s.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # Linux only
    memory = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=flags)
    buffer = np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)
    buffer.fill(fill)
    return buffer


def region_buffer_shape(job: RegionJob[Any, Any], data_var: Any, shards: Sequence[int] | None) -> tuple[int, ...]:
    """The processing region's shape for `data_var`, padded to whole `shards` except along the append dim,
    where a shard clipped by the array's end gets room for its padding."""
    template = job.template_ds[data_var.name]
    if shards is None:
        return tuple(template.shape)
    axis = template.dims.index(job.append_dim)
    shape = list(padded_shape(template.shape, shards, skip_axes=(axis,)))
    processing = job.processing_region()
    shape[axis] = max(shape[axis], -(-job.region.stop // shards[axis]) * shards[axis] - processing.start)
    return tuple(shape)


REGION_BUFFERS = RegionBufferPool()


# What a shard-write task decodes from: read tasks' outcomes, or download batches (decoded in the task).
VariableInputs = Sequence[ReadOutcome] | Sequence[Sequence[DownloadOutcome]]


@dataclass(frozen=True)
class AssembledVariable:
    """One variable over the processing region, inside a buffer padded to the shard grid."""

    job: RegionJob[Any, Any]
    data_var: Any
    layout: RegionLayout
    buffer: npt.NDArray[np.float32]  # position 0 along the append dim is the processing region's start
    results: Sequence[SourceFileCoord]
    delivered: npt.NDArray[np.bool_]  # over the layout's leading dims: slabs that received a whole field
    written: npt.NDArray[np.bool_]  # over the layout's leading dims: slabs a read wrote any value into
    decodes: int = 0  # messages this assembly handed to the decoder

    def region_values(self) -> npt.NDArray[np.float32]:
        """The processing region's values, a view of the buffer (row-major only: `choose_layout` picks row-major
        wherever the region is needed as one array)."""
        if self.layout.chunk_major:
            raise ValueError("a chunk-major buffer has no view of the region: assemble it row-major")
        template_shape = self.job.template_ds[self.data_var.name].shape
        return self.buffer[tuple(slice(0, n) for n in template_shape)]

    def data_array(self) -> xr.DataArray:
        """The region as the transform hook gets it: a view of the buffer, with the template's coords."""
        template = self.job.template_ds[self.data_var.name]
        return xr.DataArray(self.region_values(), coords=template.coords, dims=template.dims, name=self.data_var.name)


def choose_layout(
    job: RegionJob[Any, Any],
    data_var: Any,
    encoder: ShardEncoder,
    coords: Sequence[SourceFileCoord],
    partial_shards: bool,
) -> RegionLayout:
    """Chunk-major when only decoded fields go into the region (no transform hook, no partial shard merged from
    the region's values, one whole field per source coord) and the buffer holds the array's chunks whole;
    row-major otherwise."""
    shape = region_buffer_shape(job, data_var, encoder.shard_shape)
    rows = RegionLayout.rows(shape)
    chunks = encoder.chunk_shape
    template = job.template_ds[data_var.name]
    axis = template.dims.index(job.append_dim)
    if job.transforms_region(data_var) or partial_shards or len(shape) < 3:
        return rows
    if any(n % c for n, c in zip(shape, chunks, strict=True)) or job.processing_region().start % chunks[axis]:
        return rows
    leading = set(template.dims[:-2])
    if any(set(coord.out_loc()) != leading for coord in coords):
        return rows
    return RegionLayout.chunked(shape, chunks)


def _input_coords(inputs: VariableInputs) -> list[SourceFileCoord]:
    return [
        coord
        for item in inputs
        for coord in (item.coords if isinstance(item, ReadOutcome) else [outcome.coord for outcome in item])
    ]


_field_scratch = threading.local()


def _scratch_field(shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """This thread's field to decode into before a chunk-major buffer takes it. It holds the last field read
    (`read_data_into` writes every value; the kit checks each dataset does): no refill, 0.7 ms a GFS field."""
    field_values: npt.NDArray[np.float32] | None = getattr(_field_scratch, "values", None)
    if field_values is None or field_values.shape != shape:
        field_values = np.full(shape, np.nan, dtype=np.float32)
        _field_scratch.values = field_values
    return field_values


def assemble_variable(
    job: RegionJob[Any, Any], data_var: Any, inputs: VariableInputs, layout: RegionLayout
) -> AssembledVariable:
    """The processing region of one variable, NaN where no file delivered a field.

    `inputs` are read tasks' outcomes, or download batches, decoded here one field at a time (straight into a
    row-major buffer; through a field of scratch into a chunk-major one). The buffer comes from
    `REGION_BUFFERS`; give it back once nothing refers to it.
    """
    template = job.template_ds[data_var.name]
    buffer = REGION_BUFFERS.take(layout, np.float32, np.nan)
    rows_view = None if layout.chunk_major else buffer[tuple(slice(0, n) for n in template.shape)]
    field_shape = (template.shape[-2], template.shape[-1])
    indexes = {dim: template.get_index(dim) for dim in template.dims}
    results: list[SourceFileCoord] = []
    delivered = np.zeros(layout.slab_grid, dtype=bool)
    written = np.zeros(layout.slab_grid, dtype=bool)
    decodes = 0

    def locate(coord: SourceFileCoord) -> tuple[Any, ...]:
        location = coord.out_loc()
        unknown = set(location) - set(template.dims)
        if unknown:
            raise ValueError(f"{type(coord).__name__}.out_loc() names dims {unknown} not in {template.dims}")
        return tuple(indexes[dim].get_loc(location[dim]) if dim in location else slice(None) for dim in template.dims)

    def mark_read(position: tuple[Any, ...]) -> None:
        written[position[:-2]] = True
        if all(isinstance(index, slice) for index in position[-2:]):
            delivered[position[:-2]] = True

    try:
        for item in inputs:
            if isinstance(item, ReadOutcome):
                for coord, field_values in zip(item.coords, item.fields, strict=True):
                    position = locate(coord)
                    results.append(coord)
                    if field_values is None:
                        continue
                    if rows_view is None:
                        FieldShapeError.check(data_var.name, coord.get_url(), field_values.shape, field_shape)
                        layout.write_field(buffer, position[:-2], field_values)
                    else:
                        target = rows_view[(*position, ...)]
                        FieldShapeError.check(data_var.name, coord.get_url(), field_values.shape, target.shape)
                        target[...] = field_values
                    mark_read(position)
            else:
                for outcome in item:
                    position = locate(outcome.coord)
                    decodes += outcome.payload is not None
                    if rows_view is None:
                        scratch = _scratch_field(field_shape)
                        coord, read = read_one_into(job, data_var, outcome, scratch)
                        if read:
                            layout.write_field(buffer, position[:-2], scratch)
                    else:
                        # The trailing Ellipsis keeps even a single point a view of the buffer.
                        coord, read = read_one_into(job, data_var, outcome, rows_view[(*position, ...)])
                    results.append(coord)
                    if read:
                        mark_read(position)
    except BaseException:
        REGION_BUFFERS.give_back(buffer, layout=layout)
        raise
    return AssembledVariable(job, data_var, layout, buffer, results, delivered, written, decodes)


def encode_variable_kernel(
    job: RegionJob[Any, Any],
    data_var: Any,
    inputs: VariableInputs,
    var_metadata: bytes,
    final_store: ObjectStore,
    count_download_bytes: bool = False,
    *,
    chunk_major: bool = True,
) -> EncodedVariable:
    """Assemble one variable-region (decoding downloads if given them), transform it, encode its shards.
    `chunk_major=False` keeps the buffer row-major even where chunk-major would do (to compare the two)."""
    limit_library_threads()
    encoder = ShardEncoder(var_metadata)
    plan = ShardPlan.of(job, data_var, encoder, var_metadata)
    coords = _input_coords(inputs)
    layout = choose_layout(job, data_var, encoder, coords, bool(plan.partial))
    if not chunk_major:
        layout = RegionLayout.rows(layout.shape)
    assembled = assemble_variable(job, data_var, inputs, layout)
    reads = [r for r in inputs if isinstance(r, ReadOutcome)]
    downloads = [d for batch in inputs if not isinstance(batch, ReadOutcome) for d in batch]
    fetched = sum(r.bytes_fetched for r in reads) + (_fetched(downloads) if count_download_bytes else 0)
    decodes = sum(r.decodes for r in reads) + assembled.decodes
    # Encoded chunks are copies: the buffer is free once the shards are encoded (or the encode failed).
    try:
        if job.transforms_region(data_var):
            data_array = assembled.data_array()
            job.apply_data_transformations(data_array, data_var)
            holding_data = slabs_holding_data(assembled.buffer, assembled.delivered)
            # Only slabs holding values: a forecast's region is often mostly leads not published (yet).
            region = data_array.values
            for slab in zip(*np.nonzero(holding_data[tuple(slice(0, n) for n in region.shape[:-2])]), strict=True):
                round_to_keep_bits(region[slab], data_var)
        else:
            holding_data = assembled.written.copy()  # only the reads wrote into the buffer
        encoded: dict[str, bytes] = {}
        kept = encode_assembled(
            job, data_var, assembled, holding_data, encoder, plan, var_metadata, final_store, encoded.__setitem__
        )
    except BaseException:
        REGION_BUFFERS.give_back(assembled.buffer, layout=layout)
        raise
    REGION_BUFFERS.give_back(assembled.buffer, float(np.nan), dirty_slabs=holding_data, layout=layout)
    return EncodedVariable(data_var.name, encoded, in_region(job, assembled.results), fetched, kept, decodes)


def slabs_holding_data(padded: npt.NDArray[np.float32], delivered: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Over `padded`'s leading dims: which 2-D slabs (padding included) hold anything but NaN after the
    transforms. Delivered fields are taken to (no scan); the others are scanned, a transform may have filled
    them. Each undelivered slab is one contiguous field of the padded buffer: the cheapest scan there is."""
    holding = delivered.copy()
    for index in zip(*np.nonzero(~delivered), strict=True):
        holding[index] = not holds_only_nan(padded[index])
    return holding


@dataclass(frozen=True)
class ShardPlan:
    """The shards a region job writes for one variable, counted along the append dim."""

    array_shape: tuple[int, ...]
    axis: int
    whole: list[int]  # shards the region covers whole: encoded from the region alone
    partial: list[int]  # shards covered in part: merged into their published content

    @classmethod
    def of(cls, job: RegionJob[Any, Any], data_var: Any, encoder: ShardEncoder, var_metadata: bytes) -> ShardPlan:
        region = job.region
        axis = job.template_ds[data_var.name].dims.index(job.append_dim)
        array_shape = tuple(json.loads(var_metadata)["shape"])
        full_length = array_shape[axis]
        if region.stop > full_length:
            raise ValueError(
                f"{data_var.name}: region {region} runs past the array's {job.append_dim} length {full_length}"
            )
        unit = encoder.shard_shape[axis]
        whole: list[int] = []
        partial: list[int] = []
        for index in range(region.start // unit, -(-region.stop // unit)):
            shard_start = index * unit
            covered = region.start <= shard_start and region.stop >= min(shard_start + unit, full_length)
            (whole if covered else partial).append(index)
        return cls(array_shape, axis, whole, partial)


def in_region(job: RegionJob[Any, Any], results: Sequence[SourceFileCoord]) -> Sequence[SourceFileCoord]:
    """The results of the region itself, not of the processing region's extra positions."""
    processing = job.processing_region()
    region = job.region
    offset = region.start - processing.start
    in_region = set(job.template_ds.get_index(job.append_dim)[offset : offset + region.stop - region.start])
    if isinstance(results, SourceFileResults):
        return results.where(lambda c: c.out_loc().get(job.append_dim) in in_region)
    return [c for c in results if c.out_loc().get(job.append_dim) in in_region]


def encode_assembled(
    job: RegionJob[Any, Any],
    data_var: Any,
    assembled: AssembledVariable,
    holding_data: npt.NDArray[np.bool_],
    encoder: ShardEncoder,
    plan: ShardPlan,
    var_metadata: bytes,
    final_store: ObjectStore,
    sink: Callable[[str, bytes], None],
    *,
    partial_by_chunk: bool = False,
    unwritten_unread: bool = False,
    stream: ShardStream | None = None,
    chunk_read: Callable[[], None] | None = None,
) -> int:
    """Encode the shard objects of one variable-region, handing each to `sink(key, bytes)` as it is done;
    returns how many fields they keep from the published shards (`holding_data` is updated where they do).
    `partial_by_chunk`: partial shards are merged one inner chunk at a time (`merge_partial_shards_by_chunk`), not
    through zarr with the shard in memory. `unwritten_unread`: slabs without values are never read, only written
    as fill into the copy of their chunk (the scratch path leaves them holes).
    `stream(key)`: a file each shard is written into chunk by chunk instead of going to `sink` whole.
    `chunk_read()` is called before each inner chunk of a whole shard is taken from the buffer (the one before it has
    been read by then): the scratch path looks at its mapping's resident pages there."""
    processing = job.processing_region()
    region = job.region
    axis = plan.axis
    shard_grid = [range(-(-n // s)) for n, s in zip(plan.array_shape, encoder.shard_shape, strict=True)]
    layout = assembled.layout
    kept = 0
    for index in plan.whole:
        grid = list(shard_grid)
        grid[axis] = range(index, index + 1)
        for shard_index in itertools.product(*grid):
            # The shard's first position in the buffer, which starts at the processing region's start.
            origin = [i * s for i, s in zip(shard_index, encoder.shard_shape, strict=True)]
            origin[axis] -= processing.start
            slabs = tuple(slice(o, o + s) for o, s in zip(origin[:-2], encoder.shard_shape[:-2], strict=True))
            key = f"{data_var.name}/c/" + "/".join(map(str, shard_index))
            slab_map = holding_data[slabs]  # a view: slabs given published fields are marked in holding_data
            published = PublishedShard(final_store, key, encoder)
            if layout.chunk_major:
                first_chunk = [o // c for o, c in zip(origin, encoder.chunk_shape, strict=True)]

                def chunk_at(within: tuple[int, ...], first: list[int] = first_chunk) -> npt.NDArray[np.float32]:
                    if chunk_read is not None:
                        chunk_read()
                    return layout.chunk(assembled.buffer, [f + w for f, w in zip(first, within, strict=True)])

                kept += keep_published_fields(encoder, published, chunk_at, slab_map)
                if stream is not None:
                    with stream(key) as out:
                        encoder.write_chunks(out, chunk_at, slab_map, others_unread=unwritten_unread)
                else:
                    sink(key, encoder.encode_chunks(chunk_at, slab_map, others_unread=unwritten_unread))
            else:
                block = tuple(slice(o, o + s) for o, s in zip(origin, encoder.shard_shape, strict=True))
                shard = assembled.buffer[block]

                def shard_chunk(within: tuple[int, ...], shard: npt.NDArray[np.float32] = shard) -> npt.NDArray[Any]:
                    if chunk_read is not None:
                        chunk_read()
                    return shard[
                        tuple(slice(i * c, (i + 1) * c) for i, c in zip(within, encoder.chunk_shape, strict=True))
                    ]

                kept += keep_published_fields(encoder, published, shard_chunk, slab_map)
                if stream is not None:
                    with stream(key) as out:
                        encoder.write_chunks(out, shard_chunk, slab_map, others_unread=unwritten_unread)
                else:
                    sink(key, encoder.encode(shard, slab_map, others_hold_fill=True))
    if plan.partial:
        offset = region.start - processing.start
        values = assembled.region_values()
        cut = [slice(None)] * values.ndim
        cut[axis] = slice(offset, offset + (region.stop - region.start))
        in_template = tuple(slice(0, n) for n in values.shape[:-2])
        if partial_by_chunk:
            return kept + merge_partial_shards_by_chunk(
                encoder,
                data_var.name,
                values[tuple(cut)],
                holding_data[in_template][tuple(cut[:-2])],
                plan,
                region,
                final_store,
                sink,
                stream,
            )
        merged, merged_kept = _merge_partial_shards(
            data_var.name,
            values[tuple(cut)],
            holding_data[in_template][tuple(cut[:-2])],
            plan.partial,
            region,
            axis,
            var_metadata,
            final_store,
        )
        for key, data in merged.items():
            sink(key, data)
        kept += merged_kept
    return kept


def _merge_partial_shards(
    var_name: str,
    region_values: npt.NDArray[np.float32],
    region_has_values: npt.NDArray[np.bool_],
    partial: Sequence[int],
    region: slice,
    axis: int,
    var_metadata: bytes,
    final_store: ObjectStore,
) -> tuple[dict[str, bytes], int]:
    """Shards the region covers only in part along the append dim, merged into their published content
    (design invariant 2), and how many published fields they keep: a slab of the region without values
    (`region_has_values`, over the region's leading dims) keeps the published field. Updates of datasets with
    long shards come here; whole shards never do."""
    import zarr
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer
    store_dict: dict[str, Any] = {
        "zarr.json": buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'),
        f"{var_name}/zarr.json": buffer.from_bytes(var_metadata),
    }
    array = zarr.open_array(zarr.storage.MemoryStore(store_dict=store_dict), path=var_name, mode="r+")
    unit = array.shards[axis]  # type: ignore[index]
    shard_grid = [range(-(-n // s)) for n, s in zip(array.shape, array.shards, strict=True)]  # type: ignore[arg-type]
    prefix = f"{var_name}/c/"
    for index in partial:
        grid = list(shard_grid)
        grid[axis] = range(index, index + 1)
        for shard_index in itertools.product(*grid):
            key = prefix + "/".join(map(str, shard_index))
            published = final_store.get(key)
            if published is not None:
                store_dict[key] = buffer.from_bytes(published)
    kept = 0
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.open_array(zarr.storage.MemoryStore(store_dict=store_dict), path=var_name, mode="r+")
        for index in partial:
            start = max(region.start, index * unit)
            stop = min(region.stop, (index + 1) * unit)
            selection = [slice(None)] * array.ndim
            selection[axis] = slice(start, stop)
            values = [slice(None)] * array.ndim
            values[axis] = slice(start - region.start, stop - region.start)
            new = region_values[tuple(values)]
            missing = ~region_has_values[tuple(values[:-2])]
            if missing.any():
                new = np.array(new, copy=True)
                current = np.asarray(array[tuple(selection)])
                for slab in zip(*np.nonzero(missing), strict=True):
                    if not holds_only_nan(current[slab]):
                        new[slab] = current[slab]
                        kept += 1
            array[tuple(selection)] = new
    return {key: value.to_bytes() for key, value in store_dict.items() if key.startswith(prefix)}, kept


def merge_partial_shards_by_chunk(
    encoder: ShardEncoder,
    var_name: str,
    region_values: npt.NDArray[np.float32],
    region_has_values: npt.NDArray[np.bool_],
    plan: ShardPlan,
    region: slice,
    final_store: ObjectStore,
    sink: Callable[[str, bytes], None],
    stream: ShardStream | None = None,
) -> int:
    """`_merge_partial_shards`, one inner chunk at a time, handing each shard to `sink` as it is done (or writing
    it chunk by chunk into `stream(key)`): the same
    bytes zarr writes (inner chunks the region touches re-encoded from the published chunk with the region's
    fields over it, the others kept as stored), with only one shard's encoded chunks and one decoded chunk in
    memory. Returns how many published fields were kept (slabs of the region without values)."""
    from zarr.core.indexing import morton_order_iter

    axis = plan.axis
    array_shape = plan.array_shape
    shard_shape, chunk_shape = encoder.shard_shape, encoder.chunk_shape
    unit = shard_shape[axis]
    shard_grid = [range(-(-n // s)) for n, s in zip(array_shape, shard_shape, strict=True)]
    kept: set[tuple[int, ...]] = set()
    for index in plan.partial:
        start = max(region.start, index * unit)
        stop = min(region.stop, (index + 1) * unit)
        grid = list(shard_grid)
        grid[axis] = range(index, index + 1)
        for shard_index in itertools.product(*grid):
            key = f"{var_name}/c/" + "/".join(map(str, shard_index))
            published = PublishedShard(final_store, key, encoder)

            def shard_chunks(
                shard_index: tuple[int, ...] = shard_index,
                published: PublishedShard = published,
                window: tuple[int, int] = (start, stop),
            ) -> Iterator[tuple[tuple[int, ...], Any]]:
                """The shard's encoded chunks in zarr's (Morton) order, None where absent."""
                for chunk_coords in morton_order_iter(encoder.chunks_per_shard):
                    yield chunk_coords, merged_chunk(shard_index, published, window, chunk_coords)

            def merged_chunk(
                shard_index: tuple[int, ...],
                published: PublishedShard,
                window: tuple[int, int],
                chunk_coords: tuple[int, ...],
            ) -> Any:
                start, stop = window
                low = [
                    s * i + c * k
                    for s, i, c, k in zip(shard_shape, shard_index, chunk_shape, chunk_coords, strict=True)
                ]
                high = [lo + c for lo, c in zip(low, chunk_shape, strict=True)]
                touched = all(lo < n for lo, n in zip(low, array_shape, strict=True)) and (
                    low[axis] < stop and high[axis] > start
                )
                if not touched:
                    stored = published.chunk_bytes(chunk_coords)
                    return None if stored is None else encoder.stored_chunk(stored)
                current = published.chunk(chunk_coords)
                values = (
                    np.full(chunk_shape, encoder.fill_value, dtype=encoder.dtype)
                    if current is None
                    else np.array(current, dtype=encoder.dtype, copy=True)
                )
                bounds = [(lo, min(hi, n)) for lo, hi, n in zip(low, high, array_shape, strict=True)]
                bounds[axis] = (max(low[axis], start), min(high[axis], stop))
                in_chunk = tuple(slice(b - lo, e - lo) for (b, e), lo in zip(bounds, low, strict=True))
                in_region = [slice(b, e) for b, e in bounds]
                in_region[axis] = slice(bounds[axis][0] - region.start, bounds[axis][1] - region.start)
                has_values = region_has_values[tuple(in_region[:-2])]
                target = values[in_chunk]
                target[has_values] = region_values[tuple(in_region)][has_values]
                if current is not None:
                    leading_origin = [b for b, _ in bounds[:-2]]
                    for slab in zip(*np.nonzero(~has_values), strict=True):
                        if not holds_only_nan(target[slab]):
                            kept.add(tuple(o + int(i) for o, i in zip(leading_origin, slab, strict=True)))
                return encoder.encode_chunk(values)

            if stream is not None:
                with stream(key) as out:
                    encoder.write_shard(out, shard_chunks())
            else:
                sink(key, encoder.join_shard({c: e for c, e in shard_chunks() if e is not None}))
    return len(kept)


ShardStream = Callable[[str], AbstractContextManager[BinaryIO]]


def upload_kernel(
    encoded: EncodedVariable, final_store: ObjectStore, replicas: Sequence[ReplicaUpload] = ()
) -> VariableResult:
    """Copy chunk data, never metadata, into the final store, then into each of `replicas` (their fences checked
    first). Each object is written whole; an object whose stored bytes are the same (judged by digest, never
    downloaded) is left alone: fewer replaced objects, fewer readers caught between two versions of a shard."""
    written = _put_objects(encoded, final_store)
    for replica in replicas:
        try:
            if replica.fence is not None:
                replica.fence.check()
            _put_objects(encoded, replica.store)
        except Exception as error:
            raise replica.failed(f"variable {encoded.var_name}", error) from error
    extra: dict[str, Any] = {**encoded.extra, "objects_unchanged": written.count(None)}
    if replicas:
        extra[REPLICAS_WRITTEN] = [replica.name for replica in replicas]
    if encoded.kept_published_fields:
        extra["kept_published_fields"] = encoded.kept_published_fields
    return VariableResult(
        var_name=encoded.var_name,
        results=encoded.results,
        bytes_fetched=encoded.bytes_fetched,
        bytes_written=sum(n for n in written if n is not None),
        objects_written=sum(1 for n in written if n is not None),
        extra=extra,
        decodes=encoded.decodes,
    )


def _put_objects(encoded: EncodedVariable, store: ObjectStore) -> list[int | None]:
    """Write each of `encoded.objects` unless `store` holds the same bytes: per object, the bytes written or None."""

    def put_if_changed(key: str) -> int | None:
        """The object's bytes are fetched here: `encoded.objects` may hold them in files (the scratch path), so
        only those in flight are in memory."""
        data = encoded.objects[key]
        if store.holds(key, data):
            return None
        file_of: Callable[[str], Path] | None = getattr(encoded.objects, "file", None)
        if file_of is not None and not store.is_local:
            store.put_file(key, file_of(key))  # streamed in parts, not copied into memory whole
        else:
            store.put(key, data)
        return len(data)

    keys = sorted(encoded.objects)
    if store.is_local:
        return [put_if_changed(key) for key in keys]
    with ThreadPoolExecutor(max_workers=max(1, encoded.upload_threads)) as pool:
        return list(pool.map(put_if_changed, keys))
