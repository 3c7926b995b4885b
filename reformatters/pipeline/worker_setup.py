"""Preloaded into every local worker process as it starts (Dask's `preload`).

A worker that first meets these modules while unpickling its first task spends a second or more importing them
before any work starts; imported at start-up, that time overlaps the driver's own preparation instead.
"""

from __future__ import annotations

from typing import Any


def dask_setup(worker: Any) -> None:
    import eccodes  # noqa: F401 - the decoder's shared library loads on import

    from reformatters.cluster import import_dataset_integrations
    from reformatters.pipeline.kernels import limit_library_threads

    import_dataset_integrations()
    limit_library_threads()
