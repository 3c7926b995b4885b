"""The upload step of an update or a backfill: the shared upload (the final store, then each plain replica), then a
progress record so a resumed run skips it.

What guards published values is decided before this step, in the shard write (design invariant 5,
`reformatters.pipeline.published_fields`): a field the run has no values for keeps the published one. The
upload itself leaves every object whose published bytes are the same alone (`upload_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import EncodedVariable, VariableResult, limit_library_threads, upload_kernel
from reformatters.replicas import ReplicaUpload
from reformatters.update.lease import Fence
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import UpdateProgressTracker, metadata_digest


@dataclass(frozen=True)
class RecordedUpload:
    """`upload(encoded, final_store)` for one region job of an update; runs in an upload task on a worker."""

    region_key: str
    var_metadata: dict[str, bytes]
    tracker: UpdateProgressTracker
    fence: Fence | None = None  # the publisher's lease generation, checked before anything is written
    replicas: tuple[ReplicaUpload, ...] = ()  # written after the final store (`upload_kernel`)

    def __call__(self, encoded: EncodedVariable, final_store: ObjectStore) -> VariableResult:
        limit_library_threads()
        if self.fence is not None:
            self.fence.check()
        result = upload_kernel(encoded, final_store, self.replicas)
        result = replace(result, extra={**result.extra, "uploaded_by_run": self.tracker.run_id})
        self.tracker.record(self.region_key, result, metadata_digest(self.var_metadata[encoded.var_name]))
        pause_at("upload")
        return result
