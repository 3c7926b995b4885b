"""Turn a region job into one Dask graph.

[index (per batch of source files: inventories shared by every variable's downloads) ->]
download (per batch of source files) -> encode (per variable: decode its fields from the downloads into one
variable-region buffer, transform, encode whole shards in memory) -> upload (per variable: shard objects
into the final store). With `RegionJob.separate_read_tasks`, read tasks (per variable x batch of files)
decode between download and encode instead. A variable-region larger than `RegionJob.scratch_region_bytes` is one
task instead (`reformatters.pipeline.scratch`). The scheduler pipelines it: while one variable uploads,
the next encodes and later files download.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dask.base import annotate, tokenize
from dask.delayed import Delayed, delayed

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import (
    download_kernel,
    encode_variable_kernel,
    index_kernel,
    read_kernel,
    upload_kernel,
)
from reformatters.pipeline.scratch import scratch_variable_kernel, uses_scratch
from reformatters.pipeline.source_results import SourceFileResults
from reformatters.region_job import RegionJob

ENCODE_RESOURCE = "encode"


def build_region_graph(
    job: RegionJob[Any, Any],
    var_metadata: Mapping[str, bytes],
    final_store: ObjectStore,
    *,
    priority: int = 0,
    use_encode_resource: bool = True,
    upload: Callable[..., Any] = upload_kernel,
    job_ref: Any = None,
    store_ref: Any = None,
    hold_shared: Callable[[list[Delayed]], list[Any]] | None = None,
) -> list[Delayed]:
    """One Delayed per variable, each resolving to a `VariableResult` once its shards are uploaded.

    `upload(encoded, final_store) -> VariableResult` replaces the plain upload (the operational update
    passes a gated upload that also records progress). `job_ref` and `store_ref` are futures of
    `job.for_workers()` and `final_store` already on the cluster (the driver's `held_on_cluster`); without
    them both travel as literal keys of the graph. `hold_shared` receives the tasks every variable of the region
    depends on (inventory fetches) and returns what the variables' graphs depend on instead: the driver, which
    submits variables one by one, returns futures it keeps until the region is done, so a task that one
    variable's graph finished is not run again for the next.
    """
    processing = job.processing_region()
    processing_ds = job.template_ds.isel({job.append_dim: processing})
    token = tokenize(job.template_ds.get_index(job.append_dim)[job.region].tolist(), [v.name for v in job.data_vars])
    # Literal keys land in the layer of their first consumer and take its annotations: a job key inside a
    # shard write's layer would need a free encode slot before any download could start. The driver passes
    # futures instead, which belong to no layer.
    job_key = job_ref if job_ref is not None else delayed(job.for_workers(), name=f"region-job-{token}", pure=True)
    store_key = store_ref if store_ref is not None else delayed(final_store, name=f"final-store-{token}", pure=True)

    uploads: list[Delayed] = []
    position = 0
    for group_index, group in enumerate(job.source_groups(job.data_vars)):
        coords = list(job.generate_source_file_coords(processing_ds, group))
        batches = coord_batches(job, coords)
        batches_per_read = max(1, job.read_batch_size // max(1, job.download_batch_size))

        # Per-variable downloads of a file all need its inventory: one task per batch fetches them for all.
        indexes: list[Any] = [None] * len(batches)
        in_memory = [v for v in group if not uses_scratch(job, v)]
        # Scratch tasks get their coords packed: a worker holds them in ~0.2 KB each instead of ~1.3 KB objects.
        packed_coords = SourceFileResults(coords) if len(in_memory) < len(group) else None
        if shares_inventories(job, in_memory, coords):
            with annotate(priority=priority - position / len(job.data_vars), retries=job.task_retries):
                indexes = [
                    delayed(index_kernel, pure=False)(job_key, batch, dask_key_name=f"index-{group_index}-{token}-{i}")
                    for i, batch in enumerate(batches)
                ]
            if hold_shared is not None:
                indexes = hold_shared(indexes)

        def download_tasks(
            variables: Sequence[Any],
            name: str,
            batches: list[list[Any]] = batches,
            indexes: list[Any] = indexes,
        ) -> list[Delayed]:
            return [
                delayed(download_kernel, pure=False)(
                    job_key, batch, list(variables), indexes[index], dask_key_name=f"download-{name}-{token}-{index}"
                )
                for index, batch in enumerate(batches)
            ]

        with annotate(priority=priority - position / len(job.data_vars), retries=job.task_retries):
            shared = [] if job.download_per_variable or not in_memory else download_tasks(group, f"group{group_index}")
        for data_var in group:
            # Within the region, variables in turn: the first one's downloads all come before the second's, so
            # its shard write starts while the others download (Dask would otherwise interleave them).
            with annotate(priority=priority - position / len(job.data_vars)):
                position += 1
                if data_var not in in_memory:
                    # One task downloads, decodes, encodes and uploads the variable-region (`pipeline.scratch`); a
                    # retry redoes all of it, on whichever worker.
                    annotations = {"resources": {ENCODE_RESOURCE: 1}} if use_encode_resource else {}
                    with annotate(**annotations, retries=job.task_retries):
                        uploads.append(
                            delayed(scratch_variable_kernel, pure=False)(
                                job_key,
                                data_var,
                                packed_coords,
                                var_metadata[data_var.name],
                                store_key,
                                upload,
                                dask_key_name=f"scratch-{data_var.name}-{token}",
                            )
                        )
                    continue
                with annotate(retries=job.task_retries):
                    downloads = download_tasks([data_var], data_var.name) if job.download_per_variable else shared
                # Bytes fetched are counted once: by each variable's task when downloads are its own.
                count_bytes = job.download_per_variable or data_var is in_memory[0]
                inputs: list[Delayed] = downloads
                if job.separate_read_tasks:
                    inputs = [
                        delayed(read_kernel, pure=False)(
                            job_key,
                            data_var,
                            downloads[start : start + batches_per_read],
                            count_bytes,
                            dask_key_name=f"read-{data_var.name}-{token}-{start}",
                        )
                        for start in range(0, len(downloads), batches_per_read)
                    ]
                annotations = {"resources": {ENCODE_RESOURCE: 1}} if use_encode_resource else {}
                with annotate(**annotations):
                    encoded = delayed(encode_variable_kernel, pure=False)(
                        job_key,
                        data_var,
                        inputs,
                        var_metadata[data_var.name],
                        store_key,
                        count_bytes,
                        dask_key_name=f"encode-{data_var.name}-{token}",
                    )
                with annotate(retries=job.task_retries):
                    uploads.append(
                        delayed(upload, pure=False)(encoded, store_key, dask_key_name=f"upload-{data_var.name}-{token}")
                    )
    return uploads


def shares_inventories(job: RegionJob[Any, Any], group: Sequence[Any], coords: Sequence[Any]) -> bool:
    """Whether one task per batch fetches the inventories for every variable's downloads (see `source_index_url`)."""
    return job.download_per_variable and len(group) > 1 and bool(coords) and job.source_index_url(coords[0]) is not None


def coord_batches(job: RegionJob[Any, Any], coords: Sequence[Any]) -> list[list[Any]]:
    """Source file coords in download-task batches of `job.download_batch_size`."""
    size = max(1, job.download_batch_size)
    return [list(coords[start : start + size]) for start in range(0, len(coords), size)]


def count_tasks(graphs: Sequence[Delayed]) -> int:
    keys: set[Any] = set()
    for graph in graphs:
        keys.update(graph.__dask_graph__().keys())
    return len(keys)
