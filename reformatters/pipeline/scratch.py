"""The scratch path: a variable-region larger than a worker's memory, assembled in a worker-local file.

Chosen per variable-region when the graph is built: `RegionJob.scratch_region_bytes` names the size (the
shard-padded float32 buffer) from which a variable-region takes this path (None, the default: never; 0: always).
One task per variable-region then does everything the in-memory graph spreads over download, shard-write and
upload tasks:

- downloads its variable's source files, `RegionJob.scratch_download_window` at a time, so only that many
  messages are in memory;
- decodes each message once, straight into a memory-mapped file under `<scratch dir>/reformatters-scratch-<pid>/`
  (`--scratch-dir`, default the worker's temporary directory), laid out as the in-memory buffer would be
  (`RegionLayout`: chunk by chunk where it can, row-major where a transform or a partial shard needs the region as
  one array);
- applies the transform hook to the memory-mapped region (a hook that allocates region-sized temporaries still
  costs that memory), then encodes one shard at a time from inner chunks read out of the file, the upload gate
  filling slabs from the published shard chunk by chunk, and a shard the region covers only in part (an update
  of a long-sharded dataset) merged into its published content one inner chunk at a time
  (`kernels.merge_partial_shards_by_chunk`); each shard is written chunk by chunk to a file beside the region;
- uploads the shard files with the run's upload step, and removes its files.

The objects written are the in-memory path's, byte for byte. The region's pages are file-backed: the kernel may
evict them, so the worker's anonymous memory holds the download window, one field and one encoded chunk while
the region is decoded and encoded (each shard is written to its file chunk by chunk), and the source files'
outcomes packed (`pipeline.source_results`); uploads read each shard file memory-mapped (a local store copies it
from the page cache, a remote one gets it in parts of `ObjectStore.put_file`): whatever the member count and the
shard size.

Disk: the file is sparse. Fields read take their slabs; a slab no file delivered stays a hole (the encoder and
the partial-shard merge write fill for it without reading it). A variable with a transform keeps its holes when
the dataset has `RegionJob.apply_data_transformations_sparse` (the hook is told which fields were written and
returns which hold values after it); otherwise its whole region is filled with NaN first, as the hook reads every
value. Each variable's task downloads its own messages: a source without per-variable downloads
(`download_per_variable = False`) is fetched once per variable.

The scratch is local to the worker: a retried task, on this worker or another, redoes its whole variable-region
from the downloads. A worker that dies leaves its scratch behind; the next worker to start on the machine
(`pipeline.worker_setup`), and the next scratch task under the same directory, remove the scratch of every pid
that no longer runs.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import numpy.typing as npt
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import (
    AssembledVariable,
    DownloadOutcome,
    EncodedVariable,
    ShardPlan,
    VariableResult,
    choose_layout,
    download_one,
    encode_assembled,
    in_region,
    limit_library_threads,
    read_one_into,
    region_buffer_shape,
    round_to_keep_bits,
    slabs_holding_data,
    upload_kernel,
)
from reformatters.pipeline.region_layout import RegionLayout
from reformatters.pipeline.shard_encoding import ShardEncoder
from reformatters.pipeline.source_results import packed
from reformatters.region_job import FieldShapeError, RegionJob, SourceFileCoord
from reformatters.sources.download import declare_host_request_caps
from reformatters.update.pause import pause_at

log = logging.getLogger("reformatters.pipeline")

SCRATCH_PREFIX = "reformatters-scratch-"
SCRATCH_DIR_ENVIRON = "REFORMATTERS_SCRATCH_DIR"  # also cleaned at worker start, beside the temporary directory


def uses_scratch(job: RegionJob[Any, Any], data_var: Any) -> bool:
    """Whether this variable-region takes the scratch path (`RegionJob.scratch_region_bytes`)."""
    threshold = job.scratch_region_bytes
    if threshold is None:
        return False
    return region_nbytes(job, data_var) >= threshold


def region_nbytes(job: RegionJob[Any, Any], data_var: Any) -> int:
    """The bytes of the variable-region's shard-padded float32 buffer (the job's template may be the whole one)."""
    encoding = data_var.encoding
    job = job.for_workers()
    shape = region_buffer_shape(job, data_var, encoding.shards or encoding.chunks)
    return int(np.prod(shape, dtype=np.int64)) * 4


def scratch_base(scratch_dir: str | None) -> Path:
    return Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir())


_process_dirs_lock = threading.Lock()
_process_dirs_in_use: dict[Path, int] = {}


@contextmanager
def task_scratch_dir(scratch_dir: str | None, name: str) -> Iterator[Path]:
    """A fresh directory for one task under this process's scratch directory `<scratch_dir>/reformatters-scratch-
    <pid>` (dead processes' scratch removed first); both are gone once the process's last scratch task ends."""
    base = scratch_base(scratch_dir)
    process_dir = base / f"{SCRATCH_PREFIX}{os.getpid()}"
    with _process_dirs_lock:
        if not _process_dirs_in_use.get(process_dir):
            remove_dead_scratch(base)
            process_dir.mkdir(parents=True, exist_ok=True)
        _process_dirs_in_use[process_dir] = _process_dirs_in_use.get(process_dir, 0) + 1
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=process_dir))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        with _process_dirs_lock:
            _process_dirs_in_use[process_dir] -= 1
            if not _process_dirs_in_use[process_dir]:
                del _process_dirs_in_use[process_dir]
                with suppress(OSError):
                    process_dir.rmdir()


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_dead_scratch(base: Path) -> list[Path]:
    """Remove the scratch directories under `base` whose process no longer runs; returns them."""
    removed: list[Path] = []
    try:
        entries = list(base.glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(SCRATCH_PREFIX) :]
        if not pid_text.isdigit() or not entry.is_dir() or pid_running(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed the scratch of process %s, which no longer runs: %s", pid_text, entry)
        removed.append(entry)
    return removed


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon: not the page cache of memory-mapped files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class AnonPeak:
    """The highest RssAnon of this process while the context is open, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self.start = 0
        self.peak = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> AnonPeak:
        self.start = self.peak = rss_anon_bytes()
        self._thread = threading.Thread(target=self._sample, name="rss-anon-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_anon_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def rss_mapped_bytes() -> int:
    """This process's resident pages of mapped files and shared memory (RssFile + RssShmem): what a scratch file's
    mapping adds to the RSS Dask's worker memory monitor compares with the worker's limit."""
    total = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssFile:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


RELEASE_MAPPED_BYTES = 256 << 20


class MappedPagesRelease:
    """Keeps a scratch file's mapping from growing the worker's RSS while the context is open.

    Dask's worker memory monitor counts the resident pages of a memory-mapped file as the worker's memory (RSS),
    so filling or encoding a variable-region larger than the worker's limit would get the worker paused, then
    restarted. Every `interval` seconds this looks at the process's mapped resident memory; once it has grown by
    `limit` bytes since the last release, the mapping is flushed to its file (msync: nothing written is lost) and
    its pages are dropped from the process (MADV_DONTNEED: a shared file mapping reads them back from the page cache
    or the file when touched again). The peak seen is kept for the run summary."""

    def __init__(self, mapped: mmap.mmap, limit: int = RELEASE_MAPPED_BYTES, interval: float = 0.01) -> None:
        self._mapped = mapped
        self._limit = limit
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.start = 0
        self.peak = 0
        self.releases = 0

    def __enter__(self) -> MappedPagesRelease:
        self.start = self.peak = self._baseline = rss_mapped_bytes()
        self._thread = threading.Thread(target=self._watch, name="scratch-page-release", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def check(self) -> None:
        """Release the mapping's pages if the process's mapped memory grew by `limit` since the last release."""
        with self._lock:
            mapped = rss_mapped_bytes()
            self.peak = max(self.peak, mapped)
            if mapped - self._baseline >= self._limit:
                self.release()
                self._baseline = rss_mapped_bytes()

    def release(self) -> None:
        if self._mapped is None or self._mapped.closed:
            return
        self._mapped.flush()
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mapped.madvise(mmap.MADV_DONTNEED)
        self.releases += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_mapped_bytes())

    def drop_mapping(self) -> None:
        """Forget the mapping, so the caller's last reference unmaps it."""
        self._mapped = None  # type: ignore[assignment]


class ScratchObjects(Mapping[str, bytes]):
    """Encoded objects kept in files of a scratch directory: each is read only when it is asked for."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._paths: dict[str, Path] = {}
        self.nbytes = 0

    def put(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """A new file for the object `key`, written as the encoder goes."""
        path = self._directory / f"object-{len(self._paths)}"
        with path.open("w+b") as out:
            yield out
            self.nbytes += out.tell() if out.seek(0, os.SEEK_END) is not None else 0
        self._paths[key] = path

    def __getitem__(self, key: str) -> bytes:
        """The object's bytes, memory-mapped from its file (page cache, not anonymous memory, for a local store's
        digest and copy; a remote store's client copies them)."""
        path = self._paths[key]
        with path.open("rb") as file:
            if path.stat().st_size == 0:
                return b""
            mapped: Any = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            return cast(bytes, mapped)

    def file(self, key: str) -> Path:
        """The file holding the object `key` (a remote store's upload streams it from there)."""
        return self._paths[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _downloads(job: RegionJob[Any, Any], data_var: Any, coords: Sequence[SourceFileCoord]) -> Iterator[DownloadOutcome]:
    """The variable's downloads in order, at most `job.scratch_download_window` fetched ahead."""
    window = max(1, job.scratch_download_window)
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="scratch-download") as pool:
        pending: deque[Future[DownloadOutcome]] = deque()
        try:
            for coord in coords:
                if len(pending) >= window:
                    yield pending.popleft().result()
                pending.append(pool.submit(download_one, job, coord, [data_var]))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def scratch_variable_kernel(
    job: RegionJob[Any, Any],
    data_var: Any,
    coords: Sequence[SourceFileCoord],
    var_metadata: bytes,
    final_store: ObjectStore,
    upload: Callable[[EncodedVariable, ObjectStore], VariableResult] = upload_kernel,
) -> VariableResult:
    """Download, decode, transform, encode and upload one variable-region through a worker-local scratch file."""
    limit_library_threads()
    declare_host_request_caps(job.source_request_caps())  # here: the download threads it starts see no worker
    with AnonPeak() as peak, task_scratch_dir(job.scratch_dir, data_var.name) as directory:
        encoded, region_bytes = _encode_in_scratch(job, data_var, coords, var_metadata, final_store, directory)
        assert isinstance(encoded.objects, ScratchObjects)
        scratch_bytes = region_bytes + encoded.objects.nbytes
        result = upload(encoded, final_store)
    extra = {
        **result.extra,
        "scratch_bytes": scratch_bytes,
        "peak_rss_anon_bytes": peak.peak,
        "rss_anon_growth_bytes": peak.peak - peak.start,
    }
    return VariableResult(
        var_name=result.var_name,
        results=result.results,
        bytes_fetched=result.bytes_fetched,
        bytes_written=result.bytes_written,
        objects_written=result.objects_written,
        skipped=result.skipped,
        extra=extra,
        decodes=result.decodes,
    )


_padded_field = threading.local()


def _padded_scratch_field(shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """This thread's slab-sized field, NaN outside the part each read writes whole."""
    values: npt.NDArray[np.float32] | None = getattr(_padded_field, "values", None)
    if values is None or values.shape != shape:
        values = np.full(shape, np.nan, dtype=np.float32)
        _padded_field.values = values
    return values


def slab_position(position: tuple[Any, ...]) -> tuple[int, ...]:
    """A whole field's leading-dim indexes (chunk-major layouts are chosen only where every coord names them)."""
    return tuple(int(index) for index in position[:-2])


def _encode_in_scratch(
    job: RegionJob[Any, Any],
    data_var: Any,
    coords: Sequence[SourceFileCoord],
    var_metadata: bytes,
    final_store: ObjectStore,
    directory: Path,
) -> tuple[EncodedVariable, int]:
    encoder = ShardEncoder(var_metadata)
    plan = ShardPlan.of(job, data_var, encoder, var_metadata)
    layout = choose_layout(job, data_var, encoder, coords, bool(plan.partial))
    region_path = directory / "region.f32"
    buffer, mapped = _mapped_region(region_path, layout.memory_shape)
    release = MappedPagesRelease(mapped, job.scratch_release_bytes).__enter__()
    try:
        template = job.template_ds[data_var.name]
        field_shape = (template.shape[-2], template.shape[-1])
        rows_view = None if layout.chunk_major else buffer[tuple(slice(0, n) for n in template.shape)]
        indexes = {dim: template.get_index(dim) for dim in template.dims}
        delivered = np.zeros(layout.slab_grid, dtype=bool)
        written = np.zeros(layout.slab_grid, dtype=bool)
        results = packed(coords).fresh()
        decodes = 0
        fetched = 0
        for index, outcome in enumerate(_downloads(job, data_var, results)):
            location = outcome.coord.out_loc()
            unknown = set(location) - set(template.dims)
            if unknown:
                raise ValueError(
                    f"{type(outcome.coord).__name__}.out_loc() names dims {unknown} not in {template.dims}"
                )
            position = tuple(
                indexes[dim].get_loc(location[dim]) if dim in location else slice(None) for dim in template.dims
            )
            decodes += outcome.payload is not None
            if rows_view is None:
                slab_values = _padded_scratch_field(layout.field_shape)
                field_values = slab_values[: field_shape[0], : field_shape[1]]
                coord, read = read_one_into(job, data_var, outcome, field_values)
                if read:
                    FieldShapeError.check(data_var.name, coord.get_url(), field_values.shape, field_shape)
                    layout.write_field(buffer, slab_position(position), slab_values)
            else:
                coord, read = read_one_into(job, data_var, outcome, rows_view[(*position, ...)])
            results.record(index, coord)
            release.check()
            fetched += outcome.nbytes if outcome.payload is not None else 0
            pause_at("scratch-field")  # tests kill a worker here, fields in its scratch file
            if read:
                written[position[:-2]] = True
                if all(isinstance(index, slice) for index in position[-2:]):
                    delivered[position[:-2]] = True
        unsharded = encoder.shard_shape == encoder.chunk_shape  # each chunk an object, encoded whatever it holds
        transforms = job.transforms_region(data_var)
        sparse = transforms and job.has_sparse_transform()
        everything = (transforms and not sparse) or unsharded
        _fill_what_is_read(buffer, layout, written, field_shape, everything=everything, touched=release.check)
        assembled = AssembledVariable(job, data_var, layout, buffer, results, delivered, written, decodes)
        if transforms:
            data_array = xr.DataArray(
                assembled.region_values(), coords=template.coords, dims=template.dims, name=data_var.name
            )
            region = assembled.region_values()
            in_template = tuple(slice(0, n) for n in region.shape[:-2])
            if sparse:
                holding = job.apply_data_transformations_sparse(data_array, data_var, written[in_template].copy())
                if holding.shape != region.shape[:-2] or holding.dtype != np.bool_:
                    raise ValueError(
                        f"{type(job).__name__}.apply_data_transformations_sparse returned {holding.dtype} "
                        f"{holding.shape}; expected bool over the data array's leading dims {region.shape[:-2]}"
                    )
                holding_data = np.zeros_like(written)
                holding_data[in_template] = holding
                # Fields the hook wrote where no file did: their padding is read with them.
                _fill_padding(buffer, layout, holding_data & ~written, field_shape, release.check)
            else:
                job.apply_data_transformations(data_array, data_var)
                holding_data = slabs_holding_data(buffer, delivered)
            for slab in zip(*np.nonzero(holding_data[in_template]), strict=True):
                round_to_keep_bits(region[slab], data_var)
                release.check()
        else:
            holding_data = written.copy()
        objects = ScratchObjects(directory)
        kept = encode_assembled(
            job,
            data_var,
            assembled,
            holding_data,
            encoder,
            plan,
            var_metadata,
            final_store,
            objects.put,
            partial_by_chunk=True,
            unwritten_unread=True,
            stream=objects.writer,
            chunk_read=release.check,
        )
    finally:
        release.__exit__()
        release.drop_mapping()
        del buffer, mapped
        region_bytes = region_path.stat().st_blocks * 512  # what the file took on disk, not its (sparse) length
        # Emptied while it has a name: the last unmapping of an unlinked file frees its scattered pages and blocks
        # one by one (measured 1.2 ms per page here: 25 s for 20k pages, against 0.1 s truncated first). Nothing
        # reads the mapping any more.
        os.truncate(region_path, 0)
        region_path.unlink(missing_ok=True)
    encoded = EncodedVariable(
        data_var.name,
        objects,  # type: ignore[arg-type]
        in_region(job, results),
        fetched,
        kept,
        decodes,
        extra={
            "peak_rss_mapped_bytes": release.peak,
            "rss_mapped_growth_bytes": release.peak - release.start,
            "mapped_page_releases": release.releases,
        },
        upload_threads=1,  # each object is read whole from its file to be put
    )
    return encoded, region_bytes


def _mapped_region(path: Path, shape: tuple[int, ...]) -> tuple[npt.NDArray[np.float32], mmap.mmap]:
    """A new sparse file of `shape` float32, memory-mapped: only pages written take disk. Random access advised:
    a write to a page not yet cached would otherwise read around it (32 pages zero-filled into the page cache for a
    field's slab, ~1 ms per fault measured, the unmapping as slow again)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    with path.open("w+b") as file:
        file.truncate(nbytes)
        mapped = mmap.mmap(file.fileno(), nbytes)
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype=np.float32, buffer=mapped), mapped


def _fill_what_is_read(
    buffer: npt.NDArray[np.float32],
    layout: RegionLayout,
    written: npt.NDArray[np.bool_],
    field_shape: tuple[int, int],
    *,
    everything: bool,
    touched: Callable[[], None] | None = None,
) -> None:
    """NaN into the parts of the scratch file something reads that no field wrote: the padding of the fields
    (row-major: an edge chunk copies its slabs whole), and, if `everything` (a transform hook that reads the
    whole region, or chunks encoded as they lie), every slab without a field. The encoder never reads a slab
    without a field (`unwritten_unread`), nor does the partial-shard merge; the rest stays a hole."""
    _fill_padding(buffer, layout, written, field_shape, touched)
    if everything:
        nan = float(np.nan)
        for slab in zip(*np.nonzero(~written), strict=True):
            layout.fill_slab(buffer, slab, nan)
            if touched is not None:
                touched()


def _fill_padding(
    buffer: npt.NDArray[np.float32],
    layout: RegionLayout,
    slabs: npt.NDArray[np.bool_],
    field_shape: tuple[int, int],
    touched: Callable[[], None] | None = None,
) -> None:
    """NaN into the shard padding beside the fields of `slabs` (row-major; chunk-major fields are written with
    their padding). `touched` is called after each slab (the padding columns touch a page of every row)."""
    if layout.chunk_major:
        return
    nan = float(np.nan)
    rows, columns = field_shape
    for slab in zip(*np.nonzero(slabs), strict=True):
        buffer[(*slab, slice(rows, None))] = nan
        buffer[(*slab, slice(0, rows), slice(columns, None))] = nan
        if touched is not None:
            touched()
