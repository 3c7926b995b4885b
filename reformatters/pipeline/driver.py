"""Submit region graphs to a cluster with a bounded window in flight, in append order."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from distributed import Client, Future, as_completed

from reformatters.cluster import workers_have_encode_resource
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.graph import build_region_graph
from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import RegionJob, SourceFileStatus
from reformatters.replicas import ReplicaError

log = logging.getLogger("reformatters.driver")


class RegionFailedError(RuntimeError):
    pass


class ReplicaRegionFailedError(RegionFailedError, ReplicaError):
    """A region's upload to a replica failed: nothing of it was published anywhere (the message says what to do)."""


class CompletionQueue(Protocol):
    """What the driver needs of `distributed.as_completed`: futures added, then yielded as they finish."""

    def add(self, future: Future[Any]) -> None: ...

    def __iter__(self) -> Iterator[Future[Any]]: ...


@dataclass
class RegionOutcome:
    index: int
    job: RegionJob[Any, Any]
    results: list[VariableResult]
    seconds: float


RegionCallback = Callable[[RegionOutcome], None]
UploadFactory = Callable[[RegionJob[Any, Any]], Callable[..., Any]]


def _unit_weight(job: RegionJob[Any, Any]) -> int:
    """Shard writes submitted together: one variable when its downloads are its own, else the whole region."""
    return 1 if job.download_per_variable else max(1, len(job.data_vars))


def default_variables_in_flight(client: Client, jobs: Sequence[RegionJob[Any, Any]]) -> int:
    """Two shard writes per worker: one encoding, the next one's downloads arriving.

    What is in flight holds its downloaded bytes on the workers until encoded, so more only adds memory.
    Regions whose variables share downloads go in whole; two of them fit at once.
    """
    workers = len(client.scheduler_info().get("workers", {}))
    largest_unit = max((_unit_weight(job) for job in jobs), default=1)
    return max(2 * workers, 2 * largest_unit)


def run_region_jobs(
    client: Client,
    jobs: Sequence[RegionJob[Any, Any]],
    var_metadata: Mapping[str, bytes],
    final_store: ObjectStore,
    *,
    max_regions_in_flight: int | None = None,
    max_variables_in_flight: int | None = None,
    on_region_done: RegionCallback | None = None,
    upload_for: UploadFactory | None = None,
    completion_queue: Callable[[], CompletionQueue] = as_completed,
    drain_on_failure: bool = False,
    keep_outcomes: bool = True,
) -> list[RegionOutcome]:
    """Run every job and return one outcome per job, in job order, or raise `RegionFailedError`.

    Without `keep_outcomes` nothing is kept once `on_region_done` has seen an outcome and the list is empty: the
    driver's memory then does not grow with the number of jobs.

    `on_region_done` is called in completion order. A task that fails (after its retries) raises at once,
    cancelling the rest; with `drain_on_failure` nothing more is submitted, the variable-regions in flight
    finish (their uploads recorded, their regions' callbacks called) and then it raises.

    Variable-regions (one variable's shard writes for one region) go to the scheduler in append order, at most
    `max_variables_in_flight` at once (and, if given, from at most `max_regions_in_flight` regions), so a
    backfill of thousands of regions never floods the scheduler or the workers' memory; earlier regions get
    higher priority. A region is done when all its variables are uploaded.
    """
    window = max_variables_in_flight or default_variables_in_flight(client, jobs)
    region_cap = max_regions_in_flight or len(jobs) or 1
    use_resource = workers_have_encode_resource(client)
    if not use_resource:
        log.info("workers declare no '%s' resource; encodes are not capped per worker", "encode")
    pending_regions = deque(enumerate(jobs))
    pending_units: deque[tuple[int, list[Any]]] = deque()  # (region index, delayed uploads submitted together)
    regions: dict[int, _RegionInFlight] = {}
    outcomes: dict[int, RegionOutcome] = {}
    done: set[int] = set()
    completed = completion_queue()
    future_region: dict[Any, int] = {}  # future key -> region index
    variables_in_flight = 0
    store_ref = held_on_cluster(client, final_store)
    affinity = WorkerAffinity(client)

    def finish(outcome: RegionOutcome) -> None:
        done.add(outcome.index)
        if keep_outcomes:
            outcomes[outcome.index] = outcome
        if on_region_done is not None:
            on_region_done(outcome)

    def submit_next() -> None:
        nonlocal variables_in_flight
        while True:
            if not pending_units:
                if not pending_regions or len(regions) >= region_cap:
                    return
                index, job = pending_regions.popleft()
                extra = {"upload": upload_for(job)} if upload_for is not None else {}
                job_ref = held_on_cluster(client, job.for_workers())
                shared: list[Future[Any]] = []

                def hold_shared(tasks: list[Any], shared: list[Future[Any]] = shared, index: int = index) -> list[Any]:
                    futures = client.compute(tasks, optimize_graph=False, priority=-index)
                    shared.extend(futures)
                    return list(futures)

                graphs = build_region_graph(
                    job,
                    var_metadata,
                    final_store,
                    priority=-index,
                    use_encode_resource=use_resource,
                    job_ref=job_ref,
                    store_ref=store_ref,
                    hold_shared=hold_shared,
                    **extra,
                )
                if not graphs:
                    finish(RegionOutcome(index, job, [], 0.0))
                    continue
                regions[index] = _RegionInFlight(job, len(graphs), time.perf_counter(), job_ref, shared)
                weight = _unit_weight(job)
                pending_units.extend((index, graphs[i : i + weight]) for i in range(0, len(graphs), weight))
            index, unit = pending_units[0]
            if variables_in_flight > 0 and variables_in_flight + len(unit) > window:
                return
            pending_units.popleft()
            worker = affinity.choose()
            placement = {} if worker is None else {"workers": [worker], "allow_other_workers": True}
            futures = client.compute(unit, optimize_graph=False, **placement)
            variables_in_flight += len(unit)
            regions[index].futures.extend(futures)
            for future in futures:
                future_region[future.key] = index
                affinity.assign(future.key, worker)
                completed.add(future)

    submit_next()
    failure: RegionFailedError | None = None
    try:
        for future in completed:
            index = future_region.pop(future.key)
            affinity.release(future.key)
            variables_in_flight -= 1
            region = regions[index]
            if future.status != "finished":
                error = future.exception() if future.status == "error" else None
                reason = f"{type(error).__name__}: {error}" if error is not None else f"task {future.status}"
                failed = ReplicaRegionFailedError if isinstance(error, ReplicaError) else RegionFailedError
                region_failure = failed(f"region {region.job.describe()} failed: {reason}")
                region_failure.__cause__ = error
                if not drain_on_failure:
                    raise region_failure
                if failure is None:
                    failure = region_failure
                    log.error("%s; letting the %d variable-regions in flight finish", failure, variables_in_flight)
                region.failed = True
                continue
            # A region is done when each of its results has been taken from the queue; a sibling future being
            # done already is not enough: its result is still queued and must find the region open.
            region.received += 1
            if region.received == region.variables and not region.failed:
                results = client.gather(region.futures)  # one round trip for all of them
                del regions[index]
                outcome = RegionOutcome(index, region.job, results, time.perf_counter() - region.started)
                log_region_outcome(outcome)
                finish(outcome)
            if failure is None:
                submit_next()
    finally:
        for region in regions.values():
            client.cancel(region.futures + region.shared)
    if failure is not None:
        raise failure
    unfinished = [job.describe() for i, job in enumerate(jobs) if i not in done]
    if unfinished:
        raise RegionFailedError(
            f"{len(unfinished)} of {len(jobs)} regions never completed (first: {unfinished[0]}); nothing is "
            "published for them: re-run the same command to finish them"
        )
    return [outcomes[i] for i in sorted(outcomes)]


def _same(value: Any) -> Any:
    return value


def held_on_cluster(client: Client, value: Any) -> Future[Any]:
    """`value` as a task's result, for the tasks that need it: a task can be run again when the worker holding its
    result dies. A scattered value cannot, and a scatter broadcast to every worker does not stay there: the
    scheduler's active memory manager drops the extra replicas, so a dead worker could take the last one and
    Dask would cancel every task needing it."""
    return client.submit(_same, value, pure=False)


def log_region_outcome(outcome: RegionOutcome) -> None:
    """One line per variable of a finished region; the files behind the counts are logged at debug level."""
    if not log.isEnabledFor(logging.INFO):
        return
    for result in outcome.results:
        not_found = sum(1 for coord in result.results if coord.not_found)
        ok = result.count(SourceFileStatus.Succeeded)
        log.info(
            "region %s %s: %d files ok, %d not found, %d failed, %.2f MB fetched, %d objects written",
            outcome.job.describe(),
            result.var_name,
            ok,
            not_found,
            len(result.results) - ok - not_found,
            result.bytes_fetched / 1e6,
            result.objects_written,
        )


class WorkerAffinity:
    """Each variable-region's downloads and shard write go to one worker, the one with the fewest in flight.

    Its downloaded bytes then never travel between workers (nor sit there twice); the placement is a
    preference, so tasks still run elsewhere when that worker is gone. Workers that join later (an
    autoscaled KubeCluster) are picked up as they appear.
    """

    refresh_seconds = 5.0

    def __init__(self, client: Client) -> None:
        self._client = client
        self._in_flight: dict[str, int] = {}
        self._worker_of: dict[Any, str] = {}  # future key -> worker address
        self._workers: list[str] = []
        self._refreshed_at = float("-inf")

    def choose(self) -> str | None:
        # The worker list is a round trip to the scheduler: asked again only every few seconds.
        if time.monotonic() - self._refreshed_at > self.refresh_seconds:
            self._workers = list(self._client.scheduler_info().get("workers", {}))
            self._refreshed_at = time.monotonic()
        workers = self._workers
        if not workers:
            return None
        return min(workers, key=lambda address: (self._in_flight.get(address, 0), address))

    def assign(self, key: Any, worker: str | None) -> None:
        if worker is not None:
            self._worker_of[key] = worker
            self._in_flight[worker] = self._in_flight.get(worker, 0) + 1

    def release(self, key: Any) -> None:
        worker = self._worker_of.pop(key, None)
        if worker is not None:
            self._in_flight[worker] -= 1


@dataclass
class _RegionInFlight:
    job: RegionJob[Any, Any]
    variables: int
    started: float
    job_ref: Future[Any]  # held until the region is done
    shared: list[Future[Any]]  # tasks every variable of the region depends on, held until the region is done
    futures: list[Future[Any]] = field(default_factory=list)
    received: int = 0  # results taken from the completion queue
    failed: bool = False  # a variable of it failed: never done
