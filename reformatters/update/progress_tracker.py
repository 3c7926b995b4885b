"""Which variables of which region an update has uploaded, kept in the final store's internal area.

One object per region and variable: `_internal/update_progress/<region-key>/<variable>.json`. Zarr only
treats a folder holding a `zarr.json` as a node, and readers open the root's consolidated metadata, so
xarray and zarr never see this area. A resumed update skips the variables recorded here (if they were
encoded with the same array metadata) and publishes with the recorded per-file results; the records of a
region are removed once the region is published.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import SourceFileCoord

PROGRESS_PREFIX = "_internal/update_progress"


def metadata_digest(var_metadata: bytes) -> str:
    return hashlib.sha256(var_metadata).hexdigest()[:16]


def region_key(append_dim: str, labels: Sequence[Any]) -> str:
    def text(label: Any) -> str:
        if isinstance(label, pd.Timestamp | pd.Timedelta) or hasattr(label, "isoformat"):
            return str(pd.Timestamp(label).strftime("%Y%m%dT%H%M%S"))
        return str(label).replace("/", "_")

    return f"{append_dim}-{text(labels[0])}-{text(labels[-1])}"


@dataclass(frozen=True)
class ProgressRecord:
    run_id: str
    region_key: str
    var_name: str
    metadata_digest: str
    result: VariableResult
    gated: bool


@dataclass(frozen=True)
class UpdateProgressTracker:
    """Picklable: upload tasks on workers write records, the driver reads and clears them."""

    store_url: str
    run_id: str

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.store_url)

    def _key(self, key: str, var_name: str) -> str:
        return f"{PROGRESS_PREFIX}/{key}/{var_name}.json"

    def record(self, key: str, result: VariableResult, digest: str, *, gated: bool = False) -> None:
        body = {
            "run_id": self.run_id,
            "region": key,
            "variable": result.var_name,
            "metadata_digest": digest,
            "gated": gated,
            "recorded_at": time.time(),
            "files": [{"url": _url(c), "status": str(c.status), "reason": c.status_reason} for c in result.results],
            "bytes_fetched": result.bytes_fetched,
            "bytes_written": result.bytes_written,
            "objects_written": result.objects_written,
            "extra": result.extra,
            # The coords themselves, to rebuild the results on resume (same code version).
            "results_pickle": base64.b64encode(pickle.dumps(list(result.results))).decode(),
        }
        self.store.put(self._key(key, result.var_name), json.dumps(body, indent=1, default=str).encode())

    def load(self, key: str) -> dict[str, ProgressRecord]:
        records = {}
        for object_key in self.store.list(f"{PROGRESS_PREFIX}/{key}/"):
            data = self.store.get(object_key)
            if data is None:
                continue
            body = json.loads(data)
            results: list[SourceFileCoord] = pickle.loads(base64.b64decode(body["results_pickle"]))
            result = VariableResult(
                var_name=body["variable"],
                results=results,
                bytes_fetched=int(body["bytes_fetched"]),
                bytes_written=int(body["bytes_written"]),
                objects_written=int(body["objects_written"]),
                skipped=True,
                extra={**body.get("extra", {}), "resumed_from_run": body["run_id"]},
            )
            records[body["variable"]] = ProgressRecord(
                run_id=body["run_id"],
                region_key=key,
                var_name=body["variable"],
                metadata_digest=body["metadata_digest"],
                result=result,
                gated=bool(body.get("gated")),
            )
        return records

    def clear(self, key: str) -> None:
        self.store.delete_prefix(f"{PROGRESS_PREFIX}/{key}/")

    def all_keys(self) -> list[str]:
        return sorted({k.split("/")[2] for k in self.store.list(f"{PROGRESS_PREFIX}/") if k.count("/") >= 3})


def _url(coord: SourceFileCoord) -> str:
    try:
        return coord.get_url()
    except Exception:  # noqa: BLE001
        return repr(coord)
