"""The upload step of an update: never replace published values with NaN (design invariant 5).

A region readers already see (it overlaps the published extent) is re-uploaded for a variable only if
its new data holds at least as many non-NaN values over the visible positions as the published data does.
Otherwise the published shards stay and the variable's result says so. Every upload, or refusal, is then
recorded by the progress tracker so a resumed update can skip it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import EncodedVariable, VariableResult, limit_library_threads, upload_kernel
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import UpdateProgressTracker, metadata_digest

log = logging.getLogger("reformatters.update")


def count_valid_published(final_store: ObjectStore, var_name: str, axis: int, positions: slice) -> int:
    import zarr

    array = zarr.open_array(final_store.zarr_store(), path=var_name, mode="r")
    return _count(array, axis, positions)


def count_valid_encoded(encoded: EncodedVariable, var_metadata: bytes, axis: int, positions: slice) -> int:
    import zarr
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer
    store_dict: dict[str, Any] = {
        "zarr.json": buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'),
        f"{encoded.var_name}/zarr.json": buffer.from_bytes(var_metadata),
        **{key: buffer.from_bytes(data) for key, data in encoded.objects.items()},
    }
    array = zarr.open_array(zarr.storage.MemoryStore(store_dict=store_dict), path=encoded.var_name, mode="r")
    return _count(array, axis, positions)


def _count(array: Any, axis: int, positions: slice) -> int:
    selection = [slice(None)] * array.ndim
    selection[axis] = positions
    values = np.asarray(array[tuple(selection)])
    return int(np.count_nonzero(~np.isnan(values)))


@dataclass(frozen=True)
class GatedUpload:
    """`upload(encoded, final_store)` for one region job; runs in an upload task on a worker."""

    region_key: str
    region_start: int
    region_stop: int
    append_axis: dict[str, int]  # variable -> axis of the append dimension
    published_length: int
    var_metadata: dict[str, bytes]
    tracker: UpdateProgressTracker

    def __call__(self, encoded: EncodedVariable, final_store: ObjectStore) -> VariableResult:
        limit_library_threads()
        name = encoded.var_name
        digest = metadata_digest(self.var_metadata[name])
        visible_stop = min(self.region_stop, self.published_length)
        if visible_stop > self.region_start:
            axis = self.append_axis[name]
            positions = slice(self.region_start, visible_stop)
            published = count_valid_published(final_store, name, axis, positions)
            new = count_valid_encoded(encoded, self.var_metadata[name], axis, positions)
            if new < published:
                log.warning(
                    "upload gate: %s %s keeps its published data: new results hold %d values over the "
                    "visible positions, the published data %d (a source outage?)",
                    name,
                    self.region_key,
                    new,
                    published,
                )
                result = VariableResult(
                    var_name=name,
                    results=encoded.results,
                    bytes_fetched=encoded.bytes_fetched,
                    bytes_written=0,
                    objects_written=0,
                    skipped=True,
                    extra={"gate": "kept published", "published_valid": published, "new_valid": new},
                )
                self.tracker.record(self.region_key, result, digest, gated=True)
                return result
        result = upload_kernel(encoded, final_store)
        result = replace(result, extra={**result.extra, "uploaded_by_run": self.tracker.run_id})
        self.tracker.record(self.region_key, result, digest)
        pause_at("upload")
        return result
