"""Which variables of which region a run has uploaded, kept in the final store's internal area.

One JSON object per region and variable: `_internal/update_progress/<region-key>/<variable>.json` for updates,
`_internal/backfill_progress/...` for backfills. Zarr only treats a folder holding a `zarr.json` as a node, and
readers open the root's consolidated metadata, so xarray and zarr never see this area.

A record is data only (schema `PROGRESS_SCHEMA`): the per-file outcome of each source file, keyed by the file's
coordinate fields. A resumed run regenerates the region's source file coords itself and takes only their
statuses from the record, so nothing read from the bucket is ever executed; a record that does not parse, has
another schema, or names other files than the run would read is ignored with a warning and the variable runs
again. A variable whose record holds files the source did not have is run again too: the source may have them
now. The records of a region are removed once the region is published.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pydantic import ValidationError

from reformatters.common.config_models import FrozenModel
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import RegionJob, SourceFileCoord, SourceFileStatus

log = logging.getLogger("reformatters.progress_records")

PROGRESS_PREFIX = "_internal/update_progress"
BACKFILL_PROGRESS_PREFIX = "_internal/backfill_progress"
# 1: the records of earlier releases (pickled coords inside); never read again.
PROGRESS_SCHEMA = 2

_STATUS_FIELDS = frozenset({"status", "status_reason", "not_found"})


def metadata_digest(var_metadata: bytes) -> str:
    return hashlib.sha256(var_metadata).hexdigest()[:16]


def region_key(append_dim: str, labels: Sequence[Any]) -> str:
    def text(label: Any) -> str:
        if isinstance(label, pd.Timestamp | pd.Timedelta) or hasattr(label, "isoformat"):
            return str(pd.Timestamp(label).strftime("%Y%m%dT%H%M%S"))
        return str(label).replace("/", "_")

    return f"{append_dim}-{text(labels[0])}-{text(labels[-1])}"


def coord_key(coord: SourceFileCoord) -> str:
    """The coord's identity, its outcome aside: what a record's file entry is matched on."""
    fields = coord.model_dump(exclude=set(_STATUS_FIELDS))
    return json.dumps({"type": type(coord).__name__, **fields}, sort_keys=True, default=str)


class FileRecord(FrozenModel):
    coord: str  # coord_key
    url: str
    status: SourceFileStatus
    reason: str | None = None
    not_found: bool = False


class ProgressRecord(FrozenModel):
    """One variable of one region, uploaded by run `run_id` (the JSON body without its `schema` field)."""

    run_id: str
    region: str
    variable: str
    metadata_digest: str
    recorded_at: float
    files: tuple[FileRecord, ...]
    bytes_fetched: int
    bytes_written: int
    objects_written: int
    extra: dict[str, Any] = {}

    @property
    def files_not_found(self) -> int:
        return sum(1 for f in self.files if f.not_found)

    def result(self, coords: Sequence[SourceFileCoord]) -> VariableResult | None:
        """The recorded outcome over `coords` (the files the run would read for this variable and region), or
        None if the record names other files."""
        by_key = {f.coord: f for f in self.files}
        keys = [coord_key(c) for c in coords]
        if len(by_key) != len(self.files) or sorted(keys) != sorted(by_key):
            return None
        results = [
            c.with_status(by_key[k].status, by_key[k].reason, not_found=by_key[k].not_found)
            for c, k in zip(coords, keys, strict=True)
        ]
        return VariableResult(
            var_name=self.variable,
            results=results,
            bytes_fetched=self.bytes_fetched,
            bytes_written=self.bytes_written,
            objects_written=self.objects_written,
            skipped=True,
            extra={**self.extra, "resumed_from_run": self.run_id},
        )


@dataclass(frozen=True)
class UpdateProgressTracker:
    """Picklable: upload tasks on workers write records, the driver reads and clears them. `prefix` tells an
    update's records (`PROGRESS_PREFIX`) from a backfill's (`BACKFILL_PROGRESS_PREFIX`)."""

    store_url: str
    run_id: str
    prefix: str = PROGRESS_PREFIX

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.store_url)

    def _key(self, key: str, var_name: str) -> str:
        return f"{self.prefix}/{key}/{var_name}.json"

    def record(self, key: str, result: VariableResult, digest: str) -> None:
        """Write the record, its file entries one at a time: an ensemble's variable-region has thousands, and the
        whole record as objects (a model per file, its dict, the indented text) took several KB per file."""
        head = ProgressRecord(
            run_id=self.run_id,
            region=key,
            variable=result.var_name,
            metadata_digest=digest,
            recorded_at=time.time(),
            files=(),
            bytes_fetched=result.bytes_fetched,
            bytes_written=result.bytes_written,
            objects_written=result.objects_written,
            extra=json.loads(json.dumps(result.extra, default=str)),
        ).model_dump(mode="json")
        del head["files"]
        body = io.BytesIO()
        body.write(json.dumps({"schema": PROGRESS_SCHEMA, **head})[:-1].encode())
        body.write(b', "files": [')
        for index, c in enumerate(result.results):
            entry = FileRecord(
                coord=coord_key(c), url=_url(c), status=c.status, reason=c.status_reason, not_found=c.not_found
            )
            body.write(b",\n" if index else b"\n")
            body.write(json.dumps(entry.model_dump(mode="json")).encode())
        body.write(b"]}\n")
        self.store.put(self._key(key, result.var_name), body.getvalue())

    def load(self, key: str) -> dict[str, ProgressRecord]:
        """The records of region `key` by variable; records that are not this release's data are skipped, each
        with a warning naming the object."""
        records = {}
        for object_key in self.store.list(f"{self.prefix}/{key}/"):
            data = self.store.get(object_key)
            if data is None:
                continue
            record = _parse(data, object_key)
            if record is not None:
                records[record.variable] = record
        return records

    def clear(self, key: str) -> None:
        self.store.delete_prefix(f"{self.prefix}/{key}/")

    def all_keys(self) -> list[str]:
        depth = self.prefix.count("/") + 1
        return sorted({k.split("/")[depth] for k in self.store.list(f"{self.prefix}/") if k.count("/") > depth})


ProgressTracker = UpdateProgressTracker


def _parse(data: bytes, object_key: str) -> ProgressRecord | None:
    def ignored(why: str) -> None:
        log.warning("ignoring progress record %s: %s; its variable and region are processed again", object_key, why)

    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        ignored(f"not JSON ({type(error).__name__}: {str(error)[:120]})")
        return None
    if not isinstance(body, dict):
        ignored(f"expected a JSON object, found {type(body).__name__}")
        return None
    schema = body.pop("schema", None)
    if schema != PROGRESS_SCHEMA:
        ignored(f"schema {schema!r}, this release reads schema {PROGRESS_SCHEMA} (written by another release?)")
        return None
    try:
        return ProgressRecord.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        ignored(f"does not match schema {PROGRESS_SCHEMA} ({error.error_count()} errors, first: {first['msg']})")
        return None


def region_coords(job: RegionJob[Any, Any], var_name: str) -> list[SourceFileCoord]:
    """The source file coords the shard write of `var_name` reports for `job`'s region (on the driver: the job's
    template covers the whole append dimension)."""
    processing_ds = job.template_ds.isel({job.append_dim: job.processing_region()})
    group = next(g for g in job.source_groups(job.data_vars) if any(v.name == var_name for v in g))
    in_region = set(job.template_ds.get_index(job.append_dim)[job.region])
    coords = job.generate_source_file_coords(processing_ds, group)
    return [c for c in coords if c.out_loc().get(job.append_dim) in in_region]


def resume_job(
    job: RegionJob[Any, Any], records: Mapping[str, ProgressRecord], var_metadata: Mapping[str, bytes]
) -> tuple[list[VariableResult], tuple[Any, ...]]:
    """What an earlier run of `job` already uploaded (as results) and the variables still to run."""
    reused: list[VariableResult] = []
    remaining = []
    for var in job.data_vars:
        record = records.get(var.name)
        result = None
        if record is not None and record.metadata_digest == metadata_digest(var_metadata[var.name]):
            if record.files_not_found:
                log.info(
                    "%s %s: run %s found %d files missing at the source; asking for them again",
                    record.region,
                    var.name,
                    record.run_id,
                    record.files_not_found,
                )
            else:
                result = record.result(region_coords(job, var.name))
                if result is None:
                    log.warning(
                        "ignoring progress record of %s %s: it names other source files than this run reads "
                        "(another --source-url or release?); processing it again",
                        record.region,
                        var.name,
                    )
        if result is None:
            remaining.append(var)
        else:
            reused.append(result)
    return reused, tuple(remaining)


def _url(coord: SourceFileCoord) -> str:
    try:
        return coord.get_url()
    except Exception:  # noqa: BLE001
        return repr(coord)
