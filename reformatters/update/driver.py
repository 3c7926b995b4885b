"""`reformatters update DATASET_ID`: append the newest runs, publishing strictly in append order.

1. Start the cluster and ask the source whether it answers; then take the publisher's lease (one publisher at
   a time: if another holds it, stop at once), expand the template up to `now`, ask the region job class for
   the jobs (`operational_update_jobs`), and refuse to run if the template's structure drifted.
2. Write the full expanded metadata to a local tmp store; encode tasks take their array metadata from it.
3. Submit the jobs in append order to a LocalCluster (regions compute concurrently). Only chunk data
   reaches the final store while they run (fields the run lacks keep their published values, unchanged
   objects are not rewritten), and every upload is recorded by the progress tracker.
4. As each region's jobs are done and every earlier region is published, the shared publisher
   (`reformatters.publish.Publisher`) publishes it: coordinates merged with the published ones, root
   `zarr.json` last -- the commit that makes the region visible. Never a shorter append dimension.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from reformatters.cluster import ClusterSession
from reformatters.common.icechunk_store import IcechunkStore, IcechunkUpload
from reformatters.common.storage import ObjectStore
from reformatters.common.time_utils import parse_utc, utc_now
from reformatters.dynamical_dataset import source_probe_urls
from reformatters.pipeline.driver import RegionOutcome, run_region_jobs
from reformatters.pipeline.kernels import VariableResult
from reformatters.progress import RunProgress
from reformatters.publish import (
    ROOT_METADATA_KEY,
    Publisher,
    SourceOutageError,
    hold_lease,
    published_dataset,
    replicas_written,
    tmp_metadata_store,
    variable_metadata,
)
from reformatters.region_job import RegionJob, SourceFileCoord, SourceFileStatus
from reformatters.replicas import ReplicaTarget, catch_up, check_replica_access, hold_replicas, worker_uploads
from reformatters.sources.reachability import check_source_reachable
from reformatters.summary import RunSummary
from reformatters.update.drift import check_no_drift
from reformatters.update.lease import UpdateRefusedError
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import UpdateProgressTracker, region_key, resume_job
from reformatters.update.upload_gate import RecordedUpload

log = logging.getLogger("reformatters.update")

__all__ = ["SourceOutageError", "run_operational_update"]


@dataclass
class RegionPlan:
    index: int
    region: slice
    key: str
    jobs: list[RegionJob[Any, Any]]  # what still has to run
    results: list[VariableResult] = field(default_factory=list)
    jobs_left: int = 0
    resumed: list[str] = field(default_factory=list)


def run_operational_update(
    dataset: Any,
    *,
    cluster: str = "local",
    store_url: str | None = None,
    source_url: str | None = None,
    now: pd.Timestamp | str | None = None,
    n_workers: int | None = None,
    summary_path: Path | None = None,
    show_progress: bool = True,
    lease_ttl_seconds: float | None = None,  # None: REFORMATTERS_LEASE_TTL, else the lease's default
    scratch_dir: str | None = None,  # scratch-path variable-regions (see `DynamicalDataset.backfill`)
    replica_names: Sequence[str] | None = None,  # None: every declared replica (`DynamicalDataset.selected_replicas`)
) -> RunSummary:
    started = time.perf_counter()
    now_ts = parse_utc(now) if now is not None else utc_now()
    config = dataset.template_config
    append_dim: str = config.append_dim
    job_class: type[RegionJob[Any, Any]] = dataset.region_job_class
    final_store: ObjectStore = dataset.store(store_url)
    final_store.check_access()
    replicas = dataset.selected_replicas(replica_names)
    check_replica_access(replicas, final_store)
    summary = RunSummary(
        dataset_id=dataset.dataset_id,
        kind="update",
        store=final_store.url,
        max_failed_fraction=dataset.max_failed_fraction,
    )

    if not final_store.exists(ROOT_METADATA_KEY):
        raise UpdateRefusedError(
            f"expected a published dataset at {final_store.url}, found no zarr.json: an update appends to a "
            f"published store. Run `reformatters backfill {dataset.dataset_id} END --store {final_store.url}` first."
        )
    template_ds = config.get_template(now_ts + config.append_dim_frequency)
    run_id = f"{now_ts:%Y%m%dT%H%M}-{uuid.uuid4().hex[:8]}"
    log.info("update %s as of %s into %s (run %s)", dataset.dataset_id, now_ts, final_store.url, run_id)

    # A local cluster starts while the template is expanded; nothing is written before it is up and the
    # source answers.
    with ClusterSession(cluster, n_workers=n_workers, replicas=replicas) as session:
        session.client()
        newest = slice(template_ds.sizes[append_dim] - 1, template_ds.sizes[append_dim])
        probe_jobs = job_class.jobs_for_regions(template_ds, append_dim, config.data_vars, [newest], source_url)
        check_source_reachable(source_probe_urls(probe_jobs), what=f"update of {dataset.dataset_id}")
        with (
            hold_lease(final_store, ttl_seconds=lease_ttl_seconds) as lease,
            hold_replicas(replicas, ttl_seconds=lease_ttl_seconds) as replica_targets,
        ):
            for target in replica_targets:
                catch_up(target, final_store, append_dim)
            pause_at("replicas_caught_up")
            _update_under_lease(
                dataset,
                session,
                lease,
                replica_targets,
                final_store,
                template_ds,
                now_ts,
                run_id,
                summary,
                started,
                show_progress,
                source_url,
                scratch_dir,
            )
    summary.elapsed_seconds = time.perf_counter() - started
    if summary_path is not None:
        summary.write_json(summary_path)
    log.info("update %s done: %s", dataset.dataset_id, summary.render_lines()[0])
    return summary


def _update_under_lease(
    dataset: Any,
    session: ClusterSession,
    lease: Any,
    replica_targets: Sequence[ReplicaTarget],
    final_store: ObjectStore,
    template_ds: xr.Dataset,
    now_ts: pd.Timestamp,
    run_id: str,
    summary: RunSummary,
    started: float,
    show_progress: bool,
    source_url: str | None,
    scratch_dir: str | None = None,
) -> None:
    """Plan, run and publish the update's regions: everything from reading the published store on happens
    while this run holds the publisher's lease."""
    config = dataset.template_config
    append_dim: str = config.append_dim
    job_class: type[RegionJob[Any, Any]] = dataset.region_job_class
    published_ds = published_dataset(final_store)
    if published_ds is None:
        raise UpdateRefusedError(f"the published dataset at {final_store.url} disappeared while this update ran")
    published_length = int(published_ds.sizes[append_dim])
    if template_ds.sizes[append_dim] < published_length:
        raise UpdateRefusedError(
            f"the template up to now ({now_ts}) has {template_ds.sizes[append_dim]} {append_dim} positions, "
            f"the store already publishes {published_length} (to "
            f"{published_ds.get_index(append_dim)[-1]}); is --now (or the clock) right?"
        )
    jobs, template_ds = job_class.operational_update_jobs(
        final_store, template_ds, append_dim, config.data_vars, source_url
    )
    if scratch_dir is not None:
        jobs = [job.model_copy(update={"scratch_dir": scratch_dir}) for job in jobs]
    with tmp_metadata_store(template_ds) as tmp_store:
        check_no_drift(tmp_store, final_store, append_dim)
        var_metadata = variable_metadata(tmp_store, [v.name for v in config.data_vars])
        tracker = UpdateProgressTracker(final_store.control_store().url, run_id)
        plans = _plan_regions(jobs, template_ds, append_dim, var_metadata, tracker)
        summary.regions_total = len(plans)
        publisher = _RegionPublisher(
            publisher=Publisher(
                job_class=job_class,
                template_ds=template_ds,
                append_dim=append_dim,
                final_store=final_store,
                lease=lease,
                data_var_names=[v.name for v in config.data_vars],
                published_ds=published_ds,
                refuse_shorter=True,
                replicas=replica_targets,
            ),
            tracker=tracker,
            summary=summary,
            started=started,
            due=dataset.source_file_due(now_ts),
        )
        to_run = [(plan, job) for plan in plans for job in plan.jobs]
        if not plans:
            log.info("update %s: no regions to process", dataset.dataset_id)
        publisher.publish_ready(plans)
        if to_run:
            _run_and_publish(dataset, session, show_progress, to_run, plans, publisher, var_metadata, tracker)
            session.close_in_background()
        publisher.publish_ready(plans)
        unpublished = [p.key for p in plans if p.index >= publisher.next_index]
        if unpublished:
            raise RuntimeError(f"regions {unpublished} finished without being published (a driver bug)")
    summary.published_append_dim_end = pd.Timestamp(publisher.published_end).isoformat()


def _plan_regions(
    jobs: Sequence[RegionJob[Any, Any]],
    template_ds: xr.Dataset,
    append_dim: str,
    var_metadata: dict[str, bytes],
    tracker: UpdateProgressTracker,
) -> list[RegionPlan]:
    """Group jobs by region in append order; drop the variables a killed run already uploaded."""
    by_region: dict[tuple[int, int], list[RegionJob[Any, Any]]] = {}
    for job in jobs:
        by_region.setdefault((job.region.start, job.region.stop), []).append(job)
    labels = template_ds.get_index(append_dim)
    plans = []
    for index, (start, stop) in enumerate(sorted(by_region)):
        key = region_key(append_dim, labels[start:stop])
        records = tracker.load(key)
        plan = RegionPlan(index=index, region=slice(start, stop), key=key, jobs=[])
        for job in by_region[(start, stop)]:
            reused, remaining = resume_job(job, records, var_metadata)
            plan.results.extend(reused)
            plan.resumed.extend(f"{r.var_name} (run {r.extra['resumed_from_run']})" for r in reused)
            if remaining:
                plan.jobs.append(job.model_copy(update={"data_vars": remaining}))
        if plan.resumed:
            log.info("region %s: resuming, already uploaded: %s", key, ", ".join(plan.resumed))
        plan.jobs_left = len(plan.jobs)
        plans.append(plan)
    return plans


def _run_and_publish(
    dataset: Any,
    session: ClusterSession,
    show_progress: bool,
    to_run: list[tuple[RegionPlan, RegionJob[Any, Any]]],
    plans: list[RegionPlan],
    publisher: _RegionPublisher,
    var_metadata: dict[str, bytes],
    tracker: UpdateProgressTracker,
) -> None:
    plan_of_job = {id(job): plan for plan, job in to_run}

    final_store = publisher.publisher.final_store
    to_replicas = worker_uploads(publisher.publisher.replicas)

    def upload_for(job: RegionJob[Any, Any]) -> RecordedUpload | IcechunkUpload:
        plan = plan_of_job[id(job)]
        if isinstance(final_store, IcechunkStore):
            # Nothing is recorded: what is not committed vanishes with the run, and a re-run redoes it.
            return IcechunkUpload(
                fork=final_store.fork_bytes(),
                var_metadata={v.name: var_metadata[v.name] for v in job.data_vars},
                fence=publisher.publisher.lease.fence(),
            )
        return RecordedUpload(
            region_key=plan.key,
            var_metadata={v.name: var_metadata[v.name] for v in job.data_vars},
            tracker=tracker,
            fence=publisher.publisher.lease.fence(),
            replicas=to_replicas,
        )

    client = session.client()
    with RunProgress(f"update {dataset.dataset_id}", len(to_run), client, enabled=show_progress) as progress:

        def region_done(outcome: RegionOutcome) -> None:
            plan = plan_of_job[id(outcome.job)]
            plan.results.extend(outcome.results)
            plan.jobs_left -= 1
            progress.region_done(outcome)
            publisher.publish_ready(plans)

        run_region_jobs(
            client,
            [job for _, job in to_run],
            var_metadata,
            publisher.publisher.final_store,
            on_region_done=region_done,
            upload_for=upload_for,
            keep_outcomes=False,
        )


@dataclass
class _RegionPublisher:
    """Publishes the update's regions in append order, each once every job of it is done."""

    publisher: Publisher
    tracker: UpdateProgressTracker
    summary: RunSummary
    started: float
    due: Callable[[SourceFileCoord], bool]
    next_index: int = 0

    @property
    def published_end(self) -> Any:
        publisher = self.publisher
        return publisher.template_ds.get_index(publisher.append_dim)[publisher.published_length - 1]

    def publish_ready(self, plans: list[RegionPlan]) -> None:
        """Publish every finished region whose predecessors are all published, in append order."""
        while self.next_index < len(plans) and plans[self.next_index].jobs_left == 0:
            self._publish(plans[self.next_index])
            self.next_index += 1

    def _publish(self, plan: RegionPlan) -> None:
        plan.results = self.publisher.absorb_forks(plan.results)
        results: dict[str, list[Any]] = {}
        for result in plan.results:
            results.setdefault(result.var_name, []).extend(result.results)
            _log_variable(plan.key, result)
        counted = [
            replace(r, bytes_fetched=0, bytes_written=0, objects_written=0) if "resumed_from_run" in r.extra else r
            for r in plan.results
        ]
        self.summary.add(counted, self.due)
        self.publisher.add(plan.region, results, on_replicas=replicas_written(plan.results))
        try:
            self.publisher.publish(f"region {plan.key}")
        except SourceOutageError as error:
            # What this run uploaded reflects the outage: the next run fetches the region again.
            self.tracker.clear(plan.key)
            failed = sum(1 for r in plan.results for c in r.results if c.status != SourceFileStatus.Succeeded)
            raise SourceOutageError(f"{error} ({failed} file-variables failed in this region)") from None
        log.info("region %s done, %.1f s since start", plan.key, time.perf_counter() - self.started)
        self.tracker.clear(plan.key)
        self.summary.regions_done += 1
        plan.results = []  # folded into the publisher: an update of many regions holds no file outcomes


def _log_variable(key: str, result: VariableResult) -> None:
    ok = result.count(SourceFileStatus.Succeeded)
    failed = len(result.results) - ok
    if "resumed_from_run" in result.extra:
        how = f"skipped, uploaded by run {result.extra['resumed_from_run']}"
    else:
        how = f"uploaded {result.objects_written} objects, {result.bytes_written / 1e6:.2f} MB"
        unchanged = result.extra.get("objects_unchanged", 0)
        if unchanged:
            how += f", {unchanged} not uploaded, same as published"
        if result.extra.get("kept_published_fields"):
            how += f", kept {result.extra['kept_published_fields']} published fields the source lacks now"
    log.info(
        "region %s %s: files ok %d failed %d, fetched %.2f MB, %s",
        key,
        result.var_name,
        ok,
        failed,
        result.bytes_fetched / 1e6,
        how,
    )
