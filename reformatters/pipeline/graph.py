"""Turn a region job into one Dask graph.

download (per batch of source files) -> encode (per variable: decode its fields from the downloads into one
variable-region buffer, transform, encode whole shards in memory) -> upload (per variable: shard objects
into the final store). With `RegionJob.separate_read_tasks`, read tasks (per variable x batch of files)
decode between download and encode instead. The scheduler pipelines it: while one variable uploads,
the next encodes and later files download.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dask.base import annotate, tokenize
from dask.delayed import Delayed, delayed

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import download_kernel, encode_variable_kernel, read_kernel, upload_kernel
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
) -> list[Delayed]:
    """One Delayed per variable, each resolving to a `VariableResult` once its shards are uploaded.

    `upload(encoded, final_store) -> VariableResult` replaces the plain upload (the operational update
    passes a gated upload that also records progress).
    """
    processing = job.get_processing_region()
    processing_ds = job.template_ds.isel({job.append_dim: processing})
    worker_job = job.for_workers()
    token = tokenize(job.template_ds.get_index(job.append_dim)[job.region].tolist(), [v.name for v in job.data_vars])
    job_key = delayed(worker_job, name=f"region-job-{token}", pure=True)
    store_key = delayed(final_store, name=f"final-store-{token}", pure=True)

    uploads: list[Delayed] = []
    with annotate(priority=priority):
        for group_index, group in enumerate(job.source_groups(job.data_vars)):
            coords = list(job.generate_source_file_coords(processing_ds, group))
            batch = max(1, job.download_batch_size)
            downloads = [
                delayed(download_kernel, pure=False)(
                    job_key,
                    coords[start : start + batch],
                    list(group),
                    dask_key_name=f"download-{token}-{group_index}-{start}",
                )
                for start in range(0, len(coords), batch)
            ]
            batches_per_read = max(1, job.read_batch_size // batch)
            for var_index, data_var in enumerate(group):
                inputs: list[Delayed] = downloads
                if job.separate_read_tasks:
                    inputs = [
                        delayed(read_kernel, pure=False)(
                            job_key,
                            data_var,
                            downloads[start : start + batches_per_read],
                            var_index == 0,
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
                        var_index == 0,
                        dask_key_name=f"encode-{data_var.name}-{token}",
                    )
                uploads.append(
                    delayed(upload, pure=False)(encoded, store_key, dask_key_name=f"upload-{data_var.name}-{token}")
                )
    return uploads


def count_tasks(graphs: Sequence[Delayed]) -> int:
    keys: set[Any] = set()
    for graph in graphs:
        keys.update(graph.__dask_graph__().keys())
    return len(keys)
