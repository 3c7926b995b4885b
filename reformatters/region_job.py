"""How one region of a dataset is produced: the hooks a dataset author implements.

A region job is one shard-aligned slice of the append dimension x one group of data variables.
Hooks are plain functions of their inputs (no Dask inside): the graph builder in
`reformatters.graph` turns a job into tasks, so every hook is testable without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr
from pydantic import Field

from reformatters.common.config_models import DataVar, FrozenModel
from reformatters.common.time_utils import parse_utc

DataVarT = TypeVar("DataVarT", bound=DataVar[Any])


class FieldShapeError(ValueError):
    """`read_data` returned values of another shape than the template has there: a bug in the dataset's code,
    so it fails the task instead of counting as one unreadable file."""

    @classmethod
    def check(cls, var_name: str, url: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
        if shape != expected:
            raise cls(f"{var_name}: read_data returned shape {shape} for {url}, the template expects {expected}")


class SourceFileStatus(StrEnum):
    Processing = "processing"
    DownloadFailed = "download_failed"
    ReadFailed = "read_failed"
    Succeeded = "succeeded"


class SourceFileCoord(FrozenModel):
    """One source file, or one byte-range subset of it, and what became of it for one variable."""

    status: SourceFileStatus = SourceFileStatus.Processing
    status_reason: str | None = None
    # DownloadFailed because the source has no such file (yet): the normal state of leads not published, not an error.
    not_found: bool = False

    def get_url(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement get_url()")

    def out_loc(self) -> Mapping[str, Any]:
        """Coordinate labels (dim name -> label) of the position this file fills in the output."""
        raise NotImplementedError(f"{type(self).__name__} must implement out_loc()")

    def with_status(self, status: SourceFileStatus, reason: str | None = None, *, not_found: bool = False) -> Self:
        return self.model_copy(update={"status": status, "status_reason": reason, "not_found": not_found})


class ForecastSourceFileCoord(SourceFileCoord):
    """One source file per (init_time, lead_time) under a source root: the layout of most forecast archives."""

    source_url: str
    init_time: pd.Timestamp
    lead_time: pd.Timedelta

    @property
    def lead_hours(self) -> int:
        return int(self.lead_time.total_seconds() // 3600)

    def out_loc(self) -> Mapping[str, Any]:
        return {"init_time": self.init_time, "lead_time": self.lead_time}

    @classmethod
    def for_each_init_and_lead(cls, processing_region_ds: xr.Dataset, source_url: str) -> list[Self]:
        return [
            cls(source_url=source_url, init_time=init_time, lead_time=lead_time)
            for init_time in processing_region_ds["init_time"].to_index()
            for lead_time in processing_region_ds["lead_time"].to_index()
        ]


class EnsembleForecastSourceFileCoord(ForecastSourceFileCoord):
    """One source file per (init_time, ensemble member, lead_time): ensemble forecasts published one file per member.

    The dataset has an `ensemble_member` dimension labelled with the member number; each file fills one field."""

    ensemble_member: int

    def out_loc(self) -> Mapping[str, Any]:
        return {"init_time": self.init_time, "ensemble_member": self.ensemble_member, "lead_time": self.lead_time}


SourceFileCoordT = TypeVar("SourceFileCoordT", bound=SourceFileCoord)

# What download_file hands to read_data: the bytes of the file (or of the messages fetched from it,
# keyed by variable name). A Path on the worker's disk is read into bytes and deleted by the framework,
# so bytes always travel through Dask and never depend on which worker runs the read.
DownloadPayload = bytes | Mapping[str, bytes] | Path
ProcessResults = Mapping[str, Sequence[SourceFileCoord]]


class RegionJobFilters(FrozenModel):
    """Which regions and variables to process. Filters select whole regions."""

    start: pd.Timestamp | None = None  # inclusive
    end: pd.Timestamp | None = None  # exclusive
    contains: tuple[pd.Timestamp, ...] = ()
    variable_names: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        start: str | None = None,
        end: str | None = None,
        contains: Iterable[str] = (),
        variable_names: Iterable[str] = (),
    ) -> RegionJobFilters:
        return cls(
            start=parse_utc(start) if start else None,
            end=parse_utc(end) if end else None,
            contains=tuple(parse_utc(c) for c in contains),
            variable_names=tuple(n.strip() for n in variable_names if n.strip()),
        )


class RegionJob(FrozenModel, Generic[DataVarT, SourceFileCoordT]):
    """One shard-aligned slice of the append dimension x one group of data variables.

    `template_ds` is the expanded template. On workers it is cut down to the processing region
    (see `for_workers`), so hooks that run in tasks must only look at that region.
    """

    template_ds: xr.Dataset
    data_vars: tuple[DataVarT, ...]
    append_dim: str
    region: slice
    source_url: str | None = Field(None, description="replaces the dataset's default source root")
    scratch_dir: str | None = Field(
        None, description="where scratch-path tasks keep their variable-region (default: the worker's temp dir)"
    )
    processing: slice | None = Field(
        None,
        description="set by `for_workers`: the processing region (positions of the whole template) that "
        "`template_ds` was cut to, so a hook that pads against the template's length is asked only once",
    )

    max_vars_per_job: ClassVar[int] = 8
    # Source files per download task. Dask costs ~2 ms per task, so a task should do 100 ms or more: one file
    # from a nearby object store often does, a missing file (one 404) or a loopback server never does.
    download_batch_size: ClassVar[int] = 4
    # True: one download per (file, variable), so a shard write depends only on its own variable's bytes and a
    # worker never holds a whole group's messages for one variable. Right for byte-range sources with an index
    # (inventories are cached per worker); whole-file sources keep False or they fetch each file once per variable.
    download_per_variable: ClassVar[bool] = False
    # False (default): each shard-write task decodes its variable from the downloads straight into its
    # variable-region buffer, so decoded fields never wait in worker memory or travel between workers.
    # True: separate read tasks decode about `read_batch_size` files each and hand the fields on.
    separate_read_tasks: ClassVar[bool] = False
    read_batch_size: ClassVar[int] = 8
    # Dask runs a failed index, download or upload task again this many times (a worker lost, a connection
    # reset, an error a hook did not declare as a source failure) before the run fails with its traceback.
    task_retries: ClassVar[int] = 2
    # A variable-region whose shard-padded float32 buffer holds at least this many bytes is assembled in a
    # worker-local scratch file instead of memory, one task doing its downloads, decodes, shard writes and upload
    # (`reformatters.pipeline.scratch`). None (default): never; 0: always. Decided when the graph is built.
    scratch_region_bytes: ClassVar[int | None] = None
    # Scratch path: source files downloaded at once per variable-region (the messages held in memory at most).
    scratch_download_window: ClassVar[int] = 4
    # Scratch path: the resident pages of the region's file mapping (counted by Dask as the worker's memory) are
    # flushed and dropped each time they grow by this much (`pipeline.scratch.MappedPagesRelease`).
    scratch_release_bytes: ClassVar[int] = 256 << 20

    # ---- hooks ----
    def get_processing_region(self) -> slice:
        """Positions to download and transform; may pad `region` for deaccumulation or interpolation."""
        return self.region

    @classmethod
    def source_groups(cls, data_vars: Sequence[DataVarT]) -> Sequence[Sequence[DataVarT]]:
        """Variables that come from the same source files."""
        return [list(data_vars)]

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[DataVarT]
    ) -> Sequence[SourceFileCoordT]:
        raise NotImplementedError(f"{type(self).__name__} must implement generate_source_file_coords()")

    def download_file(self, coord: SourceFileCoordT, data_var_group: Sequence[DataVarT]) -> DownloadPayload:
        raise NotImplementedError(f"{type(self).__name__} must implement download_file()")

    def source_index_url(self, coord: SourceFileCoordT) -> str | None:
        """The inventory `download_file` reads to find its byte ranges (a GRIB `.idx`), or None (the default).

        With `download_per_variable`, every variable's download of a file needs its inventory, and each worker
        would fetch it for itself (and ask again about every file not yet published). Naming it here makes one
        task per batch of files fetch the inventories once and hand them to every download task of the batch;
        `download_file` then finds them in `reformatters.sources.download.fetch_index`'s cache."""
        return None

    def source_request_caps(self) -> Mapping[str, int]:
        """Per source host (`host` or `host:port`, as in its URLs), the most requests to it at once across the
        whole cluster; {} (the default): no cap beyond each process's own. Every worker holds a lease of a
        `distributed.Semaphore` named after the host around each request (`reformatters.sources.download`)."""
        return {}

    def read_data(
        self, coord: SourceFileCoordT, data_var: DataVarT, payload: bytes | Mapping[str, bytes]
    ) -> npt.NDArray[np.float32]:
        """One variable's values from one download, over the template's dims that `coord.out_loc()` leaves
        open (a whole 2-D field for most sources). Implement this, or `read_data_into` to decode in place."""
        if type(self).read_data_into is RegionJob.read_data_into:
            raise NotImplementedError(f"{type(self).__name__} must implement read_data() or read_data_into()")
        template = self.template_ds[data_var.name]
        location = coord.out_loc()
        out = np.empty([n for dim, n in template.sizes.items() if dim not in location], dtype=np.float32)
        self.read_data_into(coord, data_var, payload, out)
        return out

    def read_data_into(
        self,
        coord: SourceFileCoordT,
        data_var: DataVarT,
        payload: bytes | Mapping[str, bytes],
        out: npt.NDArray[np.float32],
    ) -> None:
        """`read_data` writing into `out`, a float32 array of the field's shape: the values' place in the
        variable-region buffer (a view, often strided), or a field of scratch that still holds the last field
        read. Write every value of `out`, NaN where the source has none (the dataset kit checks this). Shard
        writes decode through this hook: implementing it saves a field-sized array and a copy per field. If it
        raises, the framework refills `out` with NaN. Default: `read_data`, copied in."""
        if type(self).read_data is RegionJob.read_data:
            raise NotImplementedError(f"{type(self).__name__} must implement read_data() or read_data_into()")
        values = np.asarray(self.read_data(coord, data_var, payload), dtype=np.float32)
        FieldShapeError.check(data_var.name, coord.get_url(), values.shape, out.shape)
        out[...] = values

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class that overrides the transform hook and does not restate `transforms_region` gets the safe
        # default back: its parent's list of untouched variables described the parent's hook, not this one.
        if "apply_data_transformations" in cls.__dict__ and "transforms_region" not in cls.__dict__:
            cls.transforms_region = RegionJob.transforms_region  # type: ignore[method-assign]

    def transforms_region(self, data_var: DataVarT) -> bool:
        """Whether `apply_data_transformations` changes this variable's values; the hook is called only where
        this says yes.

        The framework rounds every variable to its `keep_mantissa_bits`: one this says no to field by field
        as each is decoded (the field still in cache, no pass over the region), the others over the region
        after the hook, so the hook sees unrounded values. A variable this says no to is known to hold only
        what was decoded (no scan for values in fields no file delivered) and its region buffer is laid out
        chunk by chunk (compressed where it lies; see `pipeline.region_layout`). Default: True for every
        variable in a class that overrides the hook; override this beside the hook to name the variables the
        hook leaves alone."""
        return type(self).apply_data_transformations is not RegionJob.apply_data_transformations

    def apply_data_transformations(self, data_array: xr.DataArray, data_var: DataVarT) -> None:
        """Transform one variable over the processing region in place (deaccumulation, gap filling...).
        Default: nothing. Binary rounding is the framework's, after this hook (see `transforms_region`)."""

    def apply_data_transformations_sparse(
        self, data_array: xr.DataArray, data_var: DataVarT, written: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.bool_]:
        """`apply_data_transformations` for a region whose fields no file delivered were never written: in a
        scratch file (`pipeline.scratch`) they read as zeros, not NaN. `written` marks, over the data array's
        leading dims, the 2-D fields that were; read only those, treat the others as missing, and return which
        fields hold values afterwards (the framework writes fill for the others without reading them).

        A dataset whose variable-regions take the scratch path and have a transform overrides this beside
        `apply_data_transformations` (same result); otherwise the framework writes NaN into every field not read
        first (the whole region's bytes to disk) and calls `apply_data_transformations`."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse transform")

    def has_sparse_transform(self) -> bool:
        return type(self).apply_data_transformations_sparse is not RegionJob.apply_data_transformations_sparse

    @classmethod
    def source_file_due(cls, coord: SourceFileCoordT, now: pd.Timestamp) -> bool:
        """Whether the source should hold `coord`'s file by `now`: a file not found that is not due counts as
        "not published yet", one that is due as missing at the source. Default: a forecast file is due from its
        valid time (`init_time + lead_time`), any other file always."""
        init_time = getattr(coord, "init_time", None)
        lead_time = getattr(coord, "lead_time", None)
        if init_time is None or lead_time is None:
            return True
        return bool(pd.Timestamp(init_time) + pd.Timedelta(lead_time) <= now)

    @classmethod
    def update_template_with_results(
        cls, template_ds: xr.Dataset, append_dim: str, process_results: ProcessResults
    ) -> xr.Dataset:
        """Trim the append dimension to the last position with successfully processed data."""
        last = last_successful_label(process_results, append_dim)
        if last is None:
            return template_ds.isel({append_dim: slice(0, 0)})
        return template_ds.sel({append_dim: slice(None, last)})

    @classmethod
    def operational_update_jobs(
        cls,
        final_store: Any,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[DataVarT],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        raise NotImplementedError(f"{cls.__name__} does not define operational updates")

    # ---- framework ----
    @classmethod
    def get_jobs(
        cls,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[DataVarT],
        filters: RegionJobFilters | None = None,
        source_url: str | None = None,
    ) -> list[Self]:
        """Split the append dimension into shard-aligned regions x variable groups."""
        filters = filters or RegionJobFilters()
        data_vars = select_data_vars(all_data_vars, filters.variable_names)
        shard_length = append_dim_shard_length(data_vars, template_ds, append_dim)
        append_labels = template_ds.get_index(append_dim)
        regions = [
            slice(start, min(start + shard_length, len(append_labels)))
            for start in range(0, len(append_labels), shard_length)
        ]
        regions = [r for r in regions if region_selected(append_labels[r], filters)]
        return cls.jobs_for_regions(template_ds, append_dim, data_vars, regions, source_url=source_url)

    @classmethod
    def jobs_for_regions(
        cls,
        template_ds: xr.Dataset,
        append_dim: str,
        data_vars: Sequence[DataVarT],
        regions: Sequence[slice],
        source_url: str | None = None,
    ) -> list[Self]:
        """One job per region x source group x at most `max_vars_per_job` variables, in append order."""
        return [
            cls(
                template_ds=template_ds,
                data_vars=tuple(chunk),
                append_dim=append_dim,
                region=region,
                source_url=source_url,
            )
            for region in regions
            for group in cls.source_groups(data_vars)
            for chunk in _batched(group, cls.max_vars_per_job)
        ]

    def processing_region(self) -> slice:
        """The positions (of the whole template) this job downloads and transforms: `get_processing_region`'s
        answer, fixed once `for_workers` has cut the template to it. The framework asks this, never the hook."""
        return self.processing if self.processing is not None else self.get_processing_region()

    def for_workers(self) -> Self:
        """A copy whose template covers only the processing region: small enough to ship to workers."""
        if self.processing is not None:
            return self
        length = self.template_ds.sizes[self.append_dim]
        start, stop, step = self.get_processing_region().indices(length)
        if step != 1 or start > self.region.start or stop < self.region.stop:
            raise ValueError(
                f"{type(self).__name__}.get_processing_region() returned {start}:{stop}:{step}, which must be a "
                f"contiguous slice holding the region {self.region.start}:{self.region.stop}; pad the region, "
                "never cut it"
            )
        processing = slice(start, stop)
        small = self.template_ds.isel({self.append_dim: processing})
        return self.model_copy(update={"template_ds": small, "processing": processing})

    def describe(self) -> str:
        labels = self.template_ds.get_index(self.append_dim)[self.region]
        span = f"{labels[0]:%Y-%m-%dT%H:%M}..{labels[-1]:%Y-%m-%dT%H:%M}" if len(labels) else "empty"
        return f"{self.append_dim} {span} [{', '.join(v.name for v in self.data_vars)}]"


def _batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def select_data_vars(all_data_vars: Sequence[DataVarT], names: Sequence[str]) -> list[DataVarT]:
    if not names:
        return list(all_data_vars)
    known = {v.name: v for v in all_data_vars}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variable(s) {unknown}; choose from: {', '.join(sorted(known))}")
    return [v for v in all_data_vars if v.name in names]


def append_dim_shard_length(data_vars: Sequence[DataVar[Any]], template_ds: xr.Dataset, append_dim: str) -> int:
    """The common write-unit length along the append dimension; regions are multiples of it."""
    lengths = set()
    for var in data_vars:
        axis = template_ds[var.name].dims.index(append_dim)
        lengths.add(var.encoding.write_unit[axis])
    if not lengths:
        raise ValueError("no data variables selected")
    return math.lcm(*lengths)


def region_selected(labels: pd.Index, filters: RegionJobFilters) -> bool:
    if len(labels) == 0:
        return False
    first, last = labels[0], labels[-1]
    if filters.start is not None and last < filters.start:
        return False
    if filters.end is not None and first >= filters.end:
        return False
    if filters.contains:
        return any(first <= t <= last for t in filters.contains)
    return True


def last_successful_label(process_results: ProcessResults, append_dim: str) -> Any | None:
    labels = [
        coord.out_loc()[append_dim]
        for coords in process_results.values()
        for coord in coords
        if coord.status == SourceFileStatus.Succeeded
    ]
    return max(labels) if labels else None
