"""Turn a region job into one Dask graph.

download (per source file) -> read (per variable x batch of files) -> encode (per variable: transform
and encode whole shards in memory) -> upload (per variable: chunk objects into the final store).
The scheduler pipelines it: while one variable uploads, the next encodes and later files download.
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
            coords = job.generate_source_file_coords(processing_ds, group)
            downloads = [
                delayed(download_kernel, pure=False)(
                    job_key, coord, list(group), dask_key_name=f"download-{token}-{group_index}-{i}"
                )
                for i, coord in enumerate(coords)
            ]
            for var_index, data_var in enumerate(group):
                reads = [
                    delayed(read_kernel, pure=False)(
                        job_key,
                        data_var,
                        downloads[start : start + job.read_batch_size],
                        var_index == 0,
                        dask_key_name=f"read-{data_var.name}-{token}-{start}",
                    )
                    for start in range(0, len(downloads), job.read_batch_size)
                ]
                annotations = {"resources": {ENCODE_RESOURCE: 1}} if use_encode_resource else {}
                with annotate(**annotations):
                    encoded = delayed(encode_variable_kernel, pure=False)(
                        job_key,
                        data_var,
                        reads,
                        var_metadata[data_var.name],
                        store_key,
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
