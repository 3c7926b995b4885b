"""A dataset: its template, its region job class, where it is stored; backfill, update and validation."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import pandas as pd
import xarray as xr
from pydantic import BaseModel, ConfigDict, InstanceOf

from reformatters.cluster import ClusterSession
from reformatters.common.storage import ObjectStore
from reformatters.common.time_utils import parse_utc
from reformatters.pipeline.driver import RegionOutcome, run_region_jobs
from reformatters.progress import RunProgress
from reformatters.publish import publish_from_tmp_store, tmp_metadata_store, variable_metadata
from reformatters.region_job import RegionJob, RegionJobFilters, SourceFileCoord
from reformatters.summary import RunSummary
from reformatters.template_config import TemplateConfig, with_template_encodings

log = logging.getLogger("reformatters")

RegionJobT = TypeVar("RegionJobT", bound=RegionJob[Any, Any])

DEFAULT_STORE_BASE = "data/output"


class DynamicalDataset(BaseModel, Generic[RegionJobT]):
    """Brings a TemplateConfig, a RegionJob subclass and storage together."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    template_config: InstanceOf[TemplateConfig]  # type: ignore[type-arg]
    region_job_class: type[RegionJobT]
    store_base: str = DEFAULT_STORE_BASE

    description: ClassVar[str] = ""

    @property
    def dataset_id(self) -> str:
        return self.template_config.dataset_id

    def default_store_url(self) -> str:
        version = self.template_config.dataset_attributes.dataset_version
        return f"{self.store_base.rstrip('/')}/{self.dataset_id}/v{version}.zarr"

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
        return ObjectStore(store_url or self.default_store_url())

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
    ) -> RunSummary:
        started = time.perf_counter()
        config = self.template_config
        final_store = self.store(store_url)
        # The cluster starts while the template is expanded and the jobs are planned.
        with ClusterSession(cluster, n_workers=n_workers) as session:
            template_ds = config.get_template(append_dim_end)
            jobs = self.region_job_class.get_jobs(
                template_ds, config.append_dim, config.data_vars, filters, source_url=source_url
            )
            summary = RunSummary(
                dataset_id=self.dataset_id, kind="backfill", store=final_store.url, regions_total=len(jobs)
            )
            store_in_use = final_store.exists("zarr.json")
            log.info(
                "backfill %s: %d region jobs into %s (%s)",
                self.dataset_id,
                len(jobs),
                final_store.url,
                "store in use: metadata deferred to the end" if store_in_use else "new store: metadata first",
            )
            all_results: dict[str, list[SourceFileCoord]] = {}
            with tmp_metadata_store(template_ds) as tmp_store:
                if not store_in_use:
                    publish_from_tmp_store(tmp_store, final_store)
                var_metadata = variable_metadata(tmp_store, [v.name for v in config.data_vars])
                client = session.client()
                with RunProgress(f"backfill {self.dataset_id}", len(jobs), client, enabled=show_progress) as progress:

                    def region_done(outcome: RegionOutcome) -> None:
                        summary.regions_done += 1
                        summary.add(outcome.results)
                        for result in outcome.results:
                            all_results.setdefault(result.var_name, []).extend(result.results)
                        progress.region_done(outcome)

                    run_region_jobs(
                        client,
                        jobs,
                        var_metadata,
                        final_store,
                        max_regions_in_flight=max_regions_in_flight,
                        on_region_done=region_done,
                    )
            # The workers shut down while the results are published.
            session.close_in_background()
            published = self.finalize(template_ds, all_results, final_store)
        summary.published_append_dim_end = _last_label(published, config.append_dim)
        summary.elapsed_seconds = time.perf_counter() - started
        if summary_path is not None:
            summary.write_json(summary_path)
        return summary

    def finalize(
        self, template_ds: xr.Dataset, results: dict[str, list[SourceFileCoord]], final_store: ObjectStore
    ) -> xr.Dataset:
        """`update_template_with_results` over all results, then publish; never shorter than published."""
        append_dim = self.template_config.append_dim
        updated = with_template_encodings(
            self.region_job_class.update_template_with_results(template_ds, append_dim, results), template_ds
        )
        published_length = published_append_length(final_store, append_dim)
        if published_length is not None and updated.sizes[append_dim] < published_length:
            updated = _keep_published_extent(template_ds, updated, final_store, append_dim, published_length)
        with tmp_metadata_store(updated) as tmp_store:
            publish_from_tmp_store(tmp_store, final_store)
        return updated

    # ---- operational update and validation (reformatters.update, reformatters.validation) ----
    def update(self, **kwargs: Any) -> RunSummary:
        from reformatters.update.driver import run_operational_update

        summary: RunSummary = run_operational_update(self, **kwargs)
        return summary

    def validators(self) -> Sequence[Any]:
        """The checks `validate` runs; datasets override."""
        return []

    def run_validators(self, **kwargs: Any) -> Any:
        from reformatters.validation import run_validation

        return run_validation(self, **kwargs)

    # ---- reading ----
    def open_published(self, store_url: str | None = None) -> xr.Dataset:
        published: xr.Dataset = self.store(store_url).open_dataset()
        return published

    def data_var_names(self) -> Sequence[str]:
        return [v.name for v in self.template_config.data_vars]


def published_append_length(final_store: ObjectStore, append_dim: str) -> int | None:
    if not final_store.exists("zarr.json"):
        return None
    ds = final_store.open_dataset()
    return int(ds.sizes[append_dim]) if append_dim in ds.sizes else None


def _keep_published_extent(
    template_ds: xr.Dataset,
    updated: xr.Dataset,
    final_store: ObjectStore,
    append_dim: str,
    published_length: int,
) -> xr.Dataset:
    """A run that processed less than is published keeps the published extent and its coordinates."""
    published = final_store.open_dataset()
    kept = template_ds.isel({append_dim: slice(0, published_length)})
    overrides = {}
    for name, coord in published.coords.items():
        if append_dim in coord.dims and name != append_dim and name in kept.coords:
            values = coord.values.copy()
            if name in updated.coords:
                fresh = updated[name]
                values[: fresh.sizes[append_dim]] = fresh.values
            overrides[name] = (coord.dims, values)
    return kept.assign_coords(overrides)


def _last_label(ds: xr.Dataset, append_dim: str) -> str | None:
    index = ds.get_index(append_dim)
    return None if len(index) == 0 else pd.Timestamp(index[-1]).isoformat()
