"""Submit region graphs to a cluster with a bounded window in flight, in append order."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future, as_completed

from reformatters.cluster import workers_have_encode_resource
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.graph import build_region_graph
from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import RegionJob

log = logging.getLogger("reformatters.driver")


class RegionFailedError(RuntimeError):
    pass


@dataclass
class RegionOutcome:
    index: int
    job: RegionJob[Any, Any]
    results: list[VariableResult]
    seconds: float


RegionCallback = Callable[[RegionOutcome], None]
UploadFactory = Callable[[RegionJob[Any, Any]], Callable[..., Any]]


def default_regions_in_flight(client: Client, jobs: Sequence[RegionJob[Any, Any]]) -> int:
    """Enough regions for two shard-write tasks per worker (one encoding, the next one's downloads arriving).

    Every region in flight holds its downloads on the workers until its last variable is encoded, so more
    regions than that only add memory.
    """
    workers = len(client.scheduler_info().get("workers", {}))
    encodes_per_region = max(1, min((len(job.data_vars) for job in jobs), default=1))
    return max(2, -(-2 * workers // encodes_per_region))


def run_region_jobs(
    client: Client,
    jobs: Sequence[RegionJob[Any, Any]],
    var_metadata: Mapping[str, bytes],
    final_store: ObjectStore,
    *,
    max_regions_in_flight: int | None = None,
    on_region_done: RegionCallback | None = None,
    upload_for: UploadFactory | None = None,
) -> list[RegionOutcome]:
    """Run every job; `on_region_done` is called in completion order, the returned list is in job order.

    At most `max_regions_in_flight` regions are on the scheduler at once, so a backfill of thousands
    of regions never floods it; earlier regions get higher priority.
    """
    window = max_regions_in_flight or default_regions_in_flight(client, jobs)
    use_resource = workers_have_encode_resource(client)
    if not use_resource:
        log.info("workers declare no '%s' resource; encodes are not capped per worker", "encode")
    pending = deque(enumerate(jobs))
    in_flight: dict[int, tuple[RegionJob[Any, Any], list[Future[Any]], float]] = {}
    outcomes: dict[int, RegionOutcome] = {}
    completed = as_completed()
    future_region: dict[str, int] = {}

    def submit_next() -> None:
        while pending and len(in_flight) < window:
            index, job = pending.popleft()
            extra = {"upload": upload_for(job)} if upload_for is not None else {}
            graphs = build_region_graph(
                job, var_metadata, final_store, priority=-index, use_encode_resource=use_resource, **extra
            )
            futures = client.compute(graphs, optimize_graph=False)
            in_flight[index] = (job, list(futures), time.perf_counter())
            for future in futures:
                future_region[future.key] = index
                completed.add(future)

    submit_next()
    try:
        for future in completed:
            index = future_region.pop(future.key)
            if index not in in_flight:
                continue
            job, futures, started = in_flight[index]
            if future.status == "error":
                error = future.exception()
                raise RegionFailedError(f"region {job.describe()} failed: {type(error).__name__}: {error}") from error
            if all(f.done() for f in futures):
                results = [f.result() for f in futures]
                del in_flight[index]
                outcome = RegionOutcome(index, job, results, time.perf_counter() - started)
                outcomes[index] = outcome
                if on_region_done is not None:
                    on_region_done(outcome)
                submit_next()
    finally:
        for _, futures, _ in in_flight.values():
            client.cancel(futures)
    return [outcomes[i] for i in sorted(outcomes)]
