"""A dataset: its template, its region job class, where it is stored; backfill, update and validation."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import pandas as pd
import xarray as xr
from pydantic import BaseModel, ConfigDict, InstanceOf

from reformatters.cluster import ClusterSession
from reformatters.common.icechunk_store import IcechunkStore, IcechunkUpload
from reformatters.common.storage import ObjectStore, open_store
from reformatters.common.time_utils import parse_utc, utc_now
from reformatters.deploy.models import OperationalResources
from reformatters.pipeline.driver import RegionOutcome, run_region_jobs
from reformatters.progress import RunProgress
from reformatters.publish import (
    DEFAULT_LEASE_WAIT_SECONDS,
    Publisher,
    RunCannotStartError,
    check_publishable,
    commit_icechunk_structure,
    hold_lease,
    publication_template,
    published_dataset,
    region_span,
    replicas_written,
    tmp_metadata_store,
    variable_metadata,
)
from reformatters.region_job import RegionJob, RegionJobFilters, SourceFileCoord
from reformatters.replicas import (
    Replica,
    catch_up,
    check_replica_access,
    hold_replicas,
    select_replicas,
    worker_uploads,
)
from reformatters.sources.reachability import check_source_reachable
from reformatters.summary import RunSummary
from reformatters.template_config import TemplateConfig
from reformatters.update.pause import pause_at
from reformatters.update.progress_tracker import (
    BACKFILL_PROGRESS_PREFIX,
    ProgressRecord,
    ProgressTracker,
    metadata_digest,
    region_key,
    resume_job,
)
from reformatters.update.upload_gate import RecordedUpload

log = logging.getLogger("reformatters")

RegionJobT = TypeVar("RegionJobT", bound=RegionJob[Any, Any])

DEFAULT_STORE_BASE = "data/output"


class DynamicalDataset(BaseModel, Generic[RegionJobT]):
    """Brings a TemplateConfig, a RegionJob subclass and storage together."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    template_config: InstanceOf[TemplateConfig]  # type: ignore[type-arg]
    region_job_class: type[RegionJobT]
    store_base: str = DEFAULT_STORE_BASE
    # Published before the primary store, region by region (`reformatters.replicas`).
    replicas: tuple[Replica, ...] = ()

    description: ClassVar[str] = ""
    # A run whose failed source files exceed this fraction of the files due by now publishes what is good and
    # exits non-zero.
    max_failed_fraction: ClassVar[float] = 0.05

    @property
    def dataset_id(self) -> str:
        return self.template_config.dataset_id

    def default_store_url(self, store_format: str = "zarr") -> str:
        """`{base}/{dataset_id}/v{version}.{zarr|icechunk}`: a plain Zarr store or an Icechunk repository."""
        version = self.template_config.dataset_attributes.dataset_version
        return f"{self.store_base.rstrip('/')}/{self.dataset_id}/v{version}.{store_format}"

    def starting_at(self, append_dim_start: pd.Timestamp | str) -> Self:
        """This dataset with its append dimension starting later: for a demo or a trial store of recent data.

        The start must fall on the dataset's own grid (a multiple of `append_dim_frequency` from its start).
        """
        config = self.template_config
        start = parse_utc(append_dim_start)
        offset = start - config.append_dim_start
        if offset < pd.Timedelta(0) or offset % config.append_dim_frequency != pd.Timedelta(0):
            raise ValueError(
                f"{self.dataset_id}: {config.append_dim} start {start} is not on the dataset's grid; expected "
                f"{config.append_dim_start} or later in steps of {config.append_dim_frequency}"
            )
        return self.model_copy(update={"template_config": config.model_copy(update={"append_dim_start": start})})

    def store(self, store_url: str | None = None) -> ObjectStore:
        return open_store(store_url or self.default_store_url())

    def selected_replicas(self, names: Sequence[str] | None = None) -> list[Replica]:
        """The replicas a run writes: every declared one (None), none (`[]`) or those named."""
        return select_replicas(self.dataset_id, self.replicas, names)

    # ---- backfill ----
    def backfill(
        self,
        append_dim_end: str | pd.Timestamp,
        *,
        cluster: str = "local",
        filters: RegionJobFilters | None = None,
        store_url: str | None = None,
        source_url: str | None = None,
        summary_path: Path | None = None,
        n_workers: int | None = None,
        max_regions_in_flight: int | None = None,
        show_progress: bool = True,
        lease_wait_seconds: float = DEFAULT_LEASE_WAIT_SECONDS,
        scratch_dir: str | None = None,
        replica_names: Sequence[str] | None = None,
    ) -> RunSummary:
        """Process the regions up to `append_dim_end` (exclusive) that `filters` select, and publish them.

        Safe on a store readers already use, whatever the slice, variables or end: it is the same publisher as
        the update (`reformatters.publish`): it waits up to `lease_wait_seconds` for the lease, keeps published
        fields the run has no values for, keeps published coordinates outside what it processed for every
        variable, never shortens the dataset, and publishes its metadata last. Nothing is written before the
        cluster is up and the source answers. `scratch_dir`: where workers keep variable-regions that take the
        scratch path (`RegionJob.scratch_region_bytes`); default each worker's temporary directory.
        `replica_names`: the replicas to write (`selected_replicas`), each region published there first.
        """
        started = time.perf_counter()
        config = self.template_config
        append_dim = config.append_dim
        final_store = self.store(store_url)
        final_store.check_access()
        replicas = self.selected_replicas(replica_names)
        check_replica_access(replicas, final_store)
        end = parse_utc(append_dim_end)
        if end <= config.append_dim_start:
            raise RunCannotStartError(
                f"nothing to backfill: the end {end.isoformat()} is at or before {self.dataset_id}'s first "
                f"{append_dim} {config.append_dim_start.isoformat()}; give an end after it (it is exclusive), "
                f"e.g. {(config.append_dim_start + config.append_dim_frequency).isoformat()}"
            )
        now = utc_now()
        run_id = f"backfill-{now:%Y%m%dT%H%M}-{uuid.uuid4().hex[:8]}"
        due = self.source_file_due(now)
        # The cluster starts while the template is expanded and the jobs are planned.
        resources = self.operational_resources()
        kube_sizing = resources.backfill if resources is not None else None
        with ClusterSession(cluster, n_workers=n_workers, kube_sizing=kube_sizing, replicas=replicas) as session:
            jobs = self.region_job_class.get_jobs(
                config.get_template(end), append_dim, config.data_vars, filters, source_url=source_url
            )
            summary = RunSummary(
                dataset_id=self.dataset_id,
                kind="backfill",
                store=final_store.url,
                regions_total=len(jobs),
                max_failed_fraction=self.max_failed_fraction,
            )
            client = session.client()
            check_source_reachable(source_probe_urls(jobs), what=f"backfill of {self.dataset_id}")
            with (
                hold_lease(final_store, wait_seconds=lease_wait_seconds) as lease,
                hold_replicas(replicas, wait_seconds=lease_wait_seconds) as replica_targets,
            ):
                commit_icechunk_structure(final_store, config.get_template(end), append_dim, lease)
                for target in replica_targets:
                    catch_up(target, final_store, append_dim)
                pause_at("replicas_caught_up")
                published = published_dataset(final_store)
                # Jobs see the published extent too: a region that ends before it merges into its shard.
                template_ds = publication_template(config, end, published)
                jobs = [job.model_copy(update={"template_ds": template_ds, "scratch_dir": scratch_dir}) for job in jobs]
                log.info(
                    "backfill %s: %d region jobs into %s (%s)",
                    self.dataset_id,
                    len(jobs),
                    final_store.url,
                    "new store"
                    if published is None
                    else f"published store of {published.sizes[append_dim]} {append_dim} positions",
                )
                with tmp_metadata_store(template_ds) as tmp_store:
                    if published is not None:
                        check_publishable(tmp_store, final_store, append_dim)
                    var_metadata = variable_metadata(tmp_store, [v.name for v in config.data_vars])
                    publisher = Publisher(
                        job_class=self.region_job_class,
                        template_ds=template_ds,
                        append_dim=append_dim,
                        final_store=final_store,
                        lease=lease,
                        data_var_names=[v.name for v in config.data_vars],
                        published_ds=published,
                        replicas=replica_targets,
                    )
                    tracker = ProgressTracker(final_store.control_store().url, run_id, prefix=BACKFILL_PROGRESS_PREFIX)
                    to_run, region_keys = self._resume(
                        jobs, template_ds, var_metadata, tracker, publisher, summary, due
                    )
                    icechunk = isinstance(final_store, IcechunkStore)
                    to_replicas = worker_uploads(replica_targets)
                    commits = _RegionCommits(publisher, tracker, var_metadata, summary, to_run, region_keys)

                    def upload_for(job: RegionJob[Any, Any]) -> RecordedUpload | IcechunkUpload:
                        if isinstance(final_store, IcechunkStore):
                            # Recorded once committed (`_RegionCommits`): uncommitted forks vanish with the run.
                            return IcechunkUpload(
                                fork=final_store.fork_bytes(),
                                var_metadata={v.name: var_metadata[v.name] for v in job.data_vars},
                                fence=lease.fence(),
                            )
                        return RecordedUpload(
                            region_key=region_keys[id(job)],
                            var_metadata={v.name: var_metadata[v.name] for v in job.data_vars},
                            tracker=tracker,
                            fence=lease.fence(),
                            replicas=to_replicas,
                        )

                    jobs_left = Counter(region_span(job) for job in to_run)
                    for span in publisher.pending_regions():
                        if not jobs_left[span]:
                            publisher.complete(slice(*span))  # every variable of it resumed
                    with RunProgress(
                        f"backfill {self.dataset_id}", len(to_run), client, enabled=show_progress
                    ) as progress:

                        def region_done(outcome: RegionOutcome) -> None:
                            summary.add(outcome.results, due)
                            if icechunk:
                                commits.done(outcome, f"backfill of {self.dataset_id}")
                            else:
                                summary.regions_done += 1
                                span = region_span(outcome.job)
                                jobs_left[span] -= 1
                                publisher.add(
                                    outcome.job.region,
                                    {r.var_name: r.results for r in outcome.results},
                                    complete=jobs_left[span] == 0,
                                    on_replicas=replicas_written(outcome.results),
                                )
                            progress.region_done(outcome)
                            pause_at("backfill_region_done")

                        run_region_jobs(
                            client,
                            to_run,
                            var_metadata,
                            final_store,
                            max_regions_in_flight=max_regions_in_flight,
                            on_region_done=region_done,
                            upload_for=upload_for,
                            drain_on_failure=True,
                            keep_outcomes=False,
                        )
                # The workers shut down while the results are published.
                session.close_in_background()
                published = publisher.publish(f"backfill of {self.dataset_id}")
                for key in sorted(set(region_keys.values())):
                    tracker.clear(key)
        summary.published_append_dim_end = _last_label(published, append_dim)
        summary.elapsed_seconds = time.perf_counter() - started
        if summary_path is not None:
            summary.write_json(summary_path)
        return summary

    def source_file_due(self, now: pd.Timestamp) -> Callable[[SourceFileCoord], bool]:
        """Whether a file should be at the source by `now` (`RegionJob.source_file_due`)."""
        job_class = self.region_job_class
        return lambda coord: job_class.source_file_due(coord, now)

    def _resume(
        self,
        jobs: Sequence[RegionJob[Any, Any]],
        template_ds: xr.Dataset,
        var_metadata: Mapping[str, bytes],
        tracker: ProgressTracker,
        publisher: Publisher,
        summary: RunSummary,
        due: Callable[[SourceFileCoord], bool],
    ) -> tuple[list[RegionJob[Any, Any]], dict[int, str]]:
        """The jobs (or the variables of them) an earlier run of this backfill has not uploaded, each with its
        region's progress key (by `id` of the job); what was uploaded goes to the publisher and the summary."""
        append_dim = self.template_config.append_dim
        labels = template_ds.get_index(append_dim)
        records: dict[str, dict[str, ProgressRecord]] = {}
        to_run: list[RegionJob[Any, Any]] = []
        region_keys: dict[int, str] = {}
        skipped = 0
        for job in jobs:
            key = region_key(append_dim, labels[job.region])
            if key not in records:
                records[key] = tracker.load(key)
            reused, remaining = resume_job(job, records[key], var_metadata)
            if reused:
                skipped += len(reused)
                publisher.add(job.region, {r.var_name: r.results for r in reused}, complete=False)
                summary.add((replace(r, bytes_fetched=0, bytes_written=0, objects_written=0) for r in reused), due)
            if remaining:
                job = job.model_copy(update={"data_vars": remaining})
                to_run.append(job)
            else:
                summary.regions_done += 1
            region_keys[id(job)] = key
        if skipped:
            log.info(
                "backfill %s: resuming, %d variable-regions already uploaded by an earlier run of it are skipped",
                self.dataset_id,
                skipped,
            )
        return to_run, region_keys

    def finalize(
        self, template_ds: xr.Dataset, results: dict[str, list[SourceFileCoord]], final_store: ObjectStore
    ) -> xr.Dataset:
        """Publish `results` as a backfill does, for tools that run the kernels themselves (the benchmark's staged
        mode): the results are taken to cover `template_ds` whole for the variables they name."""
        published = published_dataset(final_store)
        with hold_lease(final_store) as lease:
            publisher = Publisher(
                job_class=self.region_job_class,
                template_ds=publication_template(
                    self.template_config,
                    template_ds.get_index(self.template_config.append_dim)[-1]
                    + self.template_config.append_dim_frequency,
                    published,
                ),
                append_dim=self.template_config.append_dim,
                final_store=final_store,
                lease=lease,
                data_var_names=self.data_var_names(),
                published_ds=published,
            )
            publisher.add(slice(0, template_ds.sizes[self.template_config.append_dim]), results)
            return publisher.publish(f"results of {self.dataset_id}")

    # ---- operational update and validation (reformatters.update, reformatters.validation) ----
    def update(self, **kwargs: Any) -> RunSummary:
        from reformatters.update.driver import run_operational_update

        summary: RunSummary = run_operational_update(self, **kwargs)
        return summary

    def validators(self) -> Sequence[Any]:
        """The checks `validate` runs; datasets override."""
        return []

    # ---- Kubernetes (reformatters.deploy) ----
    def operational_resources(self) -> OperationalResources | None:
        """The CronJobs and backfill sizing `reformatters deploy` renders; None: the dataset is not deployed."""
        return None

    def run_validators(self, **kwargs: Any) -> Any:
        from reformatters.validation import run_validation

        return run_validation(self, **kwargs)

    # ---- reading ----
    def open_published(self, store_url: str | None = None) -> xr.Dataset:
        published: xr.Dataset = self.store(store_url).open_dataset()
        return published

    def data_var_names(self) -> Sequence[str]:
        return [v.name for v in self.template_config.data_vars]


class _RegionCommits:
    """An Icechunk backfill commits each region on `main` once it and every region before it are done (append
    order), with the forks of its uploads merged in; its progress records are written only then."""

    def __init__(
        self,
        publisher: Publisher,
        tracker: ProgressTracker,
        var_metadata: Mapping[str, bytes],
        summary: RunSummary,
        jobs: Sequence[RegionJob[Any, Any]],
        region_keys: Mapping[int, str],
    ) -> None:
        self.publisher = publisher
        self.tracker = tracker
        self.var_metadata = var_metadata
        self.summary = summary
        self.order = sorted({(job.region.start, job.region.stop) for job in jobs})
        self.jobs_left: dict[tuple[int, int], int] = {}
        self.total: dict[tuple[int, int], int] = {}
        self.keys: dict[tuple[int, int], str] = {}
        for job in jobs:
            span = (job.region.start, job.region.stop)
            self.jobs_left[span] = self.jobs_left.get(span, 0) + 1
            self.total[span] = self.jobs_left[span]
            self.keys[span] = region_keys[id(job)]
        self.results: dict[tuple[int, int], list[Any]] = {}
        self.next = 0

    def done(self, outcome: RegionOutcome, what: str) -> None:
        span = (outcome.job.region.start, outcome.job.region.stop)
        self.results.setdefault(span, []).extend(outcome.results)
        self.jobs_left[span] -= 1
        while self.next < len(self.order) and self.jobs_left[self.order[self.next]] == 0:
            span = self.order[self.next]
            results = self.publisher.absorb_forks(self.results.pop(span, []))
            self.publisher.add(slice(*span), {r.var_name: r.results for r in results})
            self.publisher.publish(f"{what}, region {self.keys[span]}")
            for result in results:
                self.tracker.record(self.keys[span], result, metadata_digest(self.var_metadata[result.var_name]))
            self.summary.regions_done += self.total[span]
            self.next += 1
            pause_at("region_committed")


def source_probe_urls(jobs: Sequence[RegionJob[Any, Any]], count: int = 2) -> list[str]:
    """The URLs of the first source files of the first job: what a reachability probe asks for."""
    if not jobs:
        return []
    job = jobs[0]
    processing_ds = job.template_ds.isel({job.append_dim: job.processing_region()})
    coords = job.generate_source_file_coords(processing_ds, job.source_groups(job.data_vars)[0])
    return [coord.get_url() for coord in list(coords)[:count]]


def _last_label(ds: xr.Dataset, append_dim: str) -> str | None:
    index = ds.get_index(append_dim)
    return None if len(index) == 0 else pd.Timestamp(index[-1]).isoformat()
