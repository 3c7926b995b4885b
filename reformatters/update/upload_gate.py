"""The upload step of an update: never replace published values with NaN (design invariant 5).

A region readers already see (it overlaps the published extent) is re-uploaded for a variable only if
its new data holds at least as many non-NaN values over the visible positions as the published data does.
Otherwise the published shards stay and the variable's result says so. A visible region whose new data
changes nothing (same count over the visible positions, nothing beyond them) is not rewritten either.
Every upload, or refusal, is then recorded by the progress tracker so a resumed update can skip it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import EncodedVariable, VariableResult, limit_library_threads, upload_kernel
from reformatters.update.lease import Fence
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import UpdateProgressTracker, metadata_digest

log = logging.getLogger("reformatters.update")


def _published_array(final_store: ObjectStore, var_name: str) -> Any:
    import zarr

    return zarr.open_array(final_store.zarr_store(), path=var_name, mode="r")


def _encoded_array(encoded: EncodedVariable, var_metadata: bytes) -> tuple[Any, dict[str, Any]]:
    import zarr
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer
    store_dict: dict[str, Any] = {
        "zarr.json": buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'),
        f"{encoded.var_name}/zarr.json": buffer.from_bytes(var_metadata),
        **{key: buffer.from_bytes(data) for key, data in encoded.objects.items()},
    }
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.open_array(zarr.storage.MemoryStore(store_dict=store_dict), path=encoded.var_name, mode="r+")
    return array, store_dict


def _selection(ndim: int, axis: int, positions: slice) -> tuple[slice, ...]:
    selection = [slice(None)] * ndim
    selection[axis] = positions
    return tuple(selection)


def _count(array: Any, axis: int, positions: slice) -> int:
    values = np.asarray(array[_selection(array.ndim, axis, positions)])
    return int(np.count_nonzero(~np.isnan(values)))


def keep_published_positions(
    encoded: EncodedVariable, var_metadata: bytes, published: Any, axis: int, positions: slice
) -> EncodedVariable:
    """The encoded shards with the visible positions replaced by their published values."""
    import zarr

    array, store_dict = _encoded_array(encoded, var_metadata)
    selection = _selection(array.ndim, axis, positions)
    with zarr.config.set({"array.write_empty_chunks": True}):
        array[selection] = np.asarray(published[selection])
    objects = {key: store_dict[key].to_bytes() for key in encoded.objects}
    return replace(encoded, objects=objects)


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
    fence: Fence | None = None  # the publisher's lease generation, checked before anything is written

    def __call__(self, encoded: EncodedVariable, final_store: ObjectStore) -> VariableResult:
        limit_library_threads()
        if self.fence is not None:
            self.fence.check()
        name = encoded.var_name
        digest = metadata_digest(self.var_metadata[name])
        visible_stop = min(self.region_stop, self.published_length)
        extra: dict[str, Any] = {}
        if visible_stop > self.region_start:
            axis = self.append_axis[name]
            positions = slice(self.region_start, visible_stop)
            published_array = _published_array(final_store, name)
            published = _count(published_array, axis, positions)
            new_array, _ = _encoded_array(encoded, self.var_metadata[name])
            new = _count(new_array, axis, positions)
            beyond = _count(new_array, axis, slice(visible_stop, self.region_stop))
            extra = {"published_valid": published, "new_valid": new}
            if new < published:
                log.warning(
                    "upload gate: %s %s keeps its published values at the visible positions: the new results "
                    "hold %d values there, the published data %d (a source outage?)",
                    name,
                    self.region_key,
                    new,
                    published,
                )
                extra["gate"] = "kept published"
                if beyond > 0:
                    encoded = keep_published_positions(
                        encoded, self.var_metadata[name], published_array, axis, positions
                    )
            elif new == published and beyond == 0:
                extra["gate"] = "unchanged"
            if extra.get("gate") and beyond == 0:
                # Nothing readers could see would change: leave the published objects alone.
                result = VariableResult(
                    var_name=name,
                    results=encoded.results,
                    bytes_fetched=encoded.bytes_fetched,
                    bytes_written=0,
                    objects_written=0,
                    skipped=True,
                    extra=extra,
                )
                self.tracker.record(self.region_key, result, digest, gated=True)
                return result
        result = upload_kernel(encoded, final_store)
        result = replace(result, extra={**result.extra, **extra, "uploaded_by_run": self.tracker.run_id})
        self.tracker.record(self.region_key, result, digest)
        pause_at("upload")
        return result
