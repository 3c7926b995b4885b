"""`reformatters update DATASET_ID`: append the newest runs, publishing strictly in append order.

1. Take the publish lease (one publisher at a time), expand the template up to `now`, ask the region job
   class for the jobs (`operational_update_jobs`), and refuse to run if the template's structure drifted.
2. Write the full expanded metadata to a local tmp store; encode tasks take their array metadata from it.
3. Submit the jobs in append order to a LocalCluster (regions compute concurrently). Only chunk data
   reaches the final store while they run; uploads of regions readers already see go through the upload
   gate, and every upload is recorded by the progress tracker.
4. As each region's futures resolve and every earlier region is published: `update_template_with_results`
   over the cumulative results, write that metadata to a tmp store and copy it into the final store
   (root `zarr.json` last) -- the commit that makes the region visible. Never a shorter append dimension.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from reformatters.cluster import ClusterSession
from reformatters.common.storage import ObjectStore
from reformatters.common.time_utils import parse_utc, utc_now
from reformatters.pipeline.driver import RegionOutcome, run_region_jobs
from reformatters.pipeline.kernels import VariableResult
from reformatters.progress import RunProgress
from reformatters.publish import ROOT_METADATA_KEY, metadata_keys, tmp_metadata_store, variable_metadata
from reformatters.region_job import RegionJob, SourceFileCoord, SourceFileStatus
from reformatters.summary import RunSummary
from reformatters.template_config import with_template_encodings
from reformatters.update.drift import check_no_drift
from reformatters.update.lease import UpdateLease, UpdateRefusedError
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import UpdateProgressTracker, metadata_digest, region_key
from reformatters.update.upload_gate import GatedUpload

log = logging.getLogger("reformatters.update")


class SourceOutageError(UpdateRefusedError):
    pass


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
) -> RunSummary:
    started = time.perf_counter()
    now_ts = parse_utc(now) if now is not None else utc_now()
    config = dataset.template_config
    append_dim: str = config.append_dim
    job_class: type[RegionJob[Any, Any]] = dataset.region_job_class
    final_store: ObjectStore = dataset.store(store_url)
    summary = RunSummary(dataset_id=dataset.dataset_id, kind="update", store=final_store.url)

    if not final_store.exists(ROOT_METADATA_KEY):
        raise UpdateRefusedError(
            f"expected a published dataset at {final_store.url}, found no zarr.json: an update appends to a "
            f"published store. Run `reformatters backfill {dataset.dataset_id} END --store {final_store.url}` first."
        )
    template_ds = config.get_template(now_ts + config.append_dim_frequency)
    run_id = f"{now_ts:%Y%m%dT%H%M}-{uuid.uuid4().hex[:8]}"
    log.info("update %s as of %s into %s (run %s)", dataset.dataset_id, now_ts, final_store.url, run_id)

    # A local cluster starts while the published store is read and the regions are planned.
    with (
        ClusterSession(cluster, n_workers=n_workers) as session,
        UpdateLease(final_store, ttl_seconds=lease_ttl_seconds) as lease,
    ):
        published_ds = final_store.open_dataset()
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
        with tmp_metadata_store(template_ds) as tmp_store:
            check_no_drift(tmp_store, final_store, append_dim)
            var_metadata = variable_metadata(tmp_store, [v.name for v in config.data_vars])
            tracker = UpdateProgressTracker(final_store.url, run_id)
            plans = _plan_regions(jobs, template_ds, append_dim, var_metadata, tracker)
            summary.regions_total = len(plans)
            publisher = _Publisher(
                job_class=job_class,
                template_ds=template_ds,
                published_ds=published_ds,
                append_dim=append_dim,
                final_store=final_store,
                lease=lease,
                tracker=tracker,
                summary=summary,
                published_length=published_length,
                first_start=plans[0].region.start if plans else published_length,
                started=started,
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
    summary.elapsed_seconds = time.perf_counter() - started
    if summary_path is not None:
        summary.write_json(summary_path)
    log.info("update %s done: %s", dataset.dataset_id, summary.render_lines()[0])
    return summary


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
            remaining = []
            for var in job.data_vars:
                record = records.get(var.name)
                # Only real uploads are skipped: a refusal of the gate says what the source lacked back then.
                reusable = record is not None and not record.gated
                if (
                    record is not None
                    and reusable
                    and record.metadata_digest == metadata_digest(var_metadata[var.name])
                ):
                    plan.results.append(record.result)
                    plan.resumed.append(f"{var.name} (run {record.run_id})")
                else:
                    remaining.append(var)
            if remaining:
                plan.jobs.append(job.model_copy(update={"data_vars": tuple(remaining)}))
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
    publisher: _Publisher,
    var_metadata: dict[str, bytes],
    tracker: UpdateProgressTracker,
) -> None:
    plan_of_job = {id(job): plan for plan, job in to_run}
    published_length_at_start = publisher.published_length

    def upload_for(job: RegionJob[Any, Any]) -> GatedUpload:
        plan = plan_of_job[id(job)]
        return GatedUpload(
            region_key=plan.key,
            region_start=job.region.start,
            region_stop=job.region.stop,
            append_axis={v.name: job.template_ds[v.name].dims.index(job.append_dim) for v in job.data_vars},
            published_length=published_length_at_start,
            var_metadata={v.name: var_metadata[v.name] for v in job.data_vars},
            tracker=tracker,
            fence=publisher.lease.fence(),
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
            publisher.final_store,
            on_region_done=region_done,
            upload_for=upload_for,
        )


@dataclass
class _Publisher:
    job_class: type[RegionJob[Any, Any]]
    template_ds: xr.Dataset
    published_ds: xr.Dataset
    append_dim: str
    final_store: ObjectStore
    lease: UpdateLease
    tracker: UpdateProgressTracker
    summary: RunSummary
    published_length: int
    first_start: int
    started: float
    next_index: int = 0
    cumulative: dict[str, list[SourceFileCoord]] = field(default_factory=dict)

    @property
    def published_end(self) -> Any:
        return self.template_ds.get_index(self.append_dim)[self.published_length - 1]

    def publish_ready(self, plans: list[RegionPlan]) -> None:
        """Publish every finished region whose predecessors are all published, in append order."""
        while self.next_index < len(plans) and plans[self.next_index].jobs_left == 0:
            self._publish(plans[self.next_index])
            self.next_index += 1

    def _publish(self, plan: RegionPlan) -> None:
        for result in plan.results:
            self.cumulative.setdefault(result.var_name, []).extend(result.results)
            _log_variable(plan.key, result)
        counted = [
            replace(r, bytes_fetched=0, bytes_written=0, objects_written=0) if "resumed_from_run" in r.extra else r
            for r in plan.results
        ]
        self.summary.add(counted)
        updated = with_template_encodings(
            self.job_class.update_template_with_results(self.template_ds, self.append_dim, self.cumulative),
            self.template_ds,
        )
        updated = _keep_published_coords(updated, self.published_ds, self.append_dim, self.first_start)
        new_length = int(updated.sizes[self.append_dim])
        if new_length < self.published_length:
            failed = sum(1 for r in plan.results for c in r.results if c.status != SourceFileStatus.Succeeded)
            raise SourceOutageError(
                f"region {plan.key}: the results end at {self.append_dim} position {new_length} but "
                f"{self.published_length} positions are published ({failed} file-variables failed in this "
                "region). Publishing would shorten the dataset, so nothing was published and the published "
                "data is unchanged. The source is probably missing files it had before; re-run the update "
                "once it is back."
            )
        with tmp_metadata_store(updated) as tmp_store:
            keys = metadata_keys(tmp_store)
            contents = {key: (tmp_store / key).read_bytes() for key in keys}
        if all(self.final_store.get(key) == data for key, data in contents.items()):
            log.info("region %s: nothing new to publish (metadata unchanged)", plan.key)
        else:
            self.lease.verify()
            pause_at("before_publish")
            for key in keys:
                if key == ROOT_METADATA_KEY:
                    pause_at("mid_publish")
                    self.lease.commit(self.final_store, key, contents[key])  # fenced, recorded in _internal/
                else:
                    self.lease.check_fence()
                    self.final_store.put(key, contents[key])
            previous = self.published_length
            self.published_length = new_length
            log.info(
                "published region %s: %s %d -> %d positions (to %s), %.1f s since start",
                plan.key,
                self.append_dim,
                previous,
                new_length,
                pd.Timestamp(self.published_end),
                time.perf_counter() - self.started,
            )
        self.tracker.clear(plan.key)
        self.summary.regions_done += 1


def _log_variable(key: str, result: VariableResult) -> None:
    ok = result.count(SourceFileStatus.Succeeded)
    failed = len(result.results) - ok
    if "resumed_from_run" in result.extra:
        how = f"skipped, uploaded by run {result.extra['resumed_from_run']}"
    elif result.extra.get("gate") == "unchanged":
        how = "not uploaded, same as published"
    elif result.extra.get("gate"):
        how = (
            f"kept the published values ({result.extra['new_valid']} new values < "
            f"{result.extra['published_valid']} published), uploaded {result.objects_written} objects"
        )
    else:
        how = f"uploaded {result.objects_written} objects, {result.bytes_written / 1e6:.2f} MB"
    log.info(
        "region %s %s: files ok %d failed %d, fetched %.2f MB, %s",
        key,
        result.var_name,
        ok,
        failed,
        result.bytes_fetched / 1e6,
        how,
    )


def _keep_published_coords(updated: xr.Dataset, published: xr.Dataset, append_dim: str, first_start: int) -> xr.Dataset:
    """Positions before the first processed region keep their published non-index coordinate values."""
    keep = min(first_start, int(published.sizes[append_dim]), int(updated.sizes[append_dim]))
    if keep <= 0:
        return updated
    overrides = {}
    for name, coord in updated.coords.items():
        if name == append_dim or append_dim not in coord.dims or name not in published.coords:
            continue
        values = np.array(coord.values, copy=True)
        axis = coord.dims.index(append_dim)
        source = np.asarray(published[name].values)
        cut = [slice(None)] * values.ndim
        cut[axis] = slice(0, keep)
        values[tuple(cut)] = source[tuple(cut)]
        overrides[name] = (coord.dims, values)
    if not overrides:
        return updated
    result = updated.assign_coords(overrides)
    for name in overrides:
        result[name].attrs = updated[name].attrs
        result[name].encoding = updated[name].encoding
    return result
