"""What forecast datasets (`init_time` x `lead_time`) share beyond their source layout: how far each init's
run is ingested (per init, or per init and ensemble member), and where an operational update starts.

An ensemble whose members can arrive at different times (GEFS: one file set per member; ECMWF IFS ENS: the control
from other files than the perturbed members since IFS cycle 50r1) records `ingested_forecast_length` per
(init_time, ensemble_member) and re-ingests the newest init until every member is complete: an update fetches
only the leads past each member's ingested length and merges the published fields into the rest
(`update_jobs_completing_members`, `leads_to_fetch`, `merge_published`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.config_models import DataVar
from reformatters.common.storage import ObjectStore
from reformatters.region_job import ProcessResults, RegionJob, SourceFileStatus, last_successful_label

JobT = TypeVar("JobT", bound=RegionJob[Any, Any])


def with_ingested_forecast_length(ds: xr.Dataset, process_results: ProcessResults) -> xr.Dataset:
    """`ingested_forecast_length` of each init the results cover: its longest lead read from the source. Inits the
    results do not cover keep their value."""
    ingested: dict[pd.Timestamp, pd.Timedelta] = {}
    for coords in process_results.values():
        for coord in coords:
            if coord.status != SourceFileStatus.Succeeded:
                continue
            location = coord.out_loc()
            init, lead = location["init_time"], location["lead_time"]
            if init not in ingested or lead > ingested[init]:
                ingested[init] = lead
    values = ds["ingested_forecast_length"].values.copy()
    for i, init in enumerate(ds.get_index("init_time")):
        if init in ingested:
            values[i] = ingested[init].to_timedelta64()
    return ds.assign_coords(ingested_forecast_length=ds["ingested_forecast_length"].copy(data=values))


def first_init_to_update(final_store: Any, template_ds: xr.Dataset, append_dim: str = "init_time") -> int:
    """The template position an update starts at: the newest published init while its ingested forecast is
    shorter than expected (its late leads are still to come), else the init after it; 0 for an empty store."""
    store = final_store if isinstance(final_store, ObjectStore) else ObjectStore(final_store)
    published = store.open_dataset(chunks=None) if store.exists("zarr.json") else None
    if published is None or published.sizes[append_dim] == 0:
        return 0
    labels = published.get_index(append_dim)
    ingested = published["ingested_forecast_length"].values[-1]
    expected = published["expected_forecast_length"].values[-1]
    complete = not np.isnat(ingested) and ingested >= expected
    newest_position = int(template_ds.get_index(append_dim).searchsorted(labels[-1]))
    return newest_position + 1 if complete else newest_position


def with_ingested_forecast_length_per_member(ds: xr.Dataset, process_results: ProcessResults) -> xr.Dataset:
    """`ingested_forecast_length` per (init, member) (dims `init_time, ensemble_member`): each one's longest lead
    read from the source, never below what `ds` already records (an update carries the published lengths in)."""
    values = ds["ingested_forecast_length"].values.copy()
    inits = ds.get_index("init_time")
    members = ds.get_index("ensemble_member")
    for coords in process_results.values():
        for coord in coords:
            if coord.status != SourceFileStatus.Succeeded:
                continue
            location = coord.out_loc()
            if location["init_time"] not in inits:
                continue
            i = inits.get_loc(location["init_time"])
            m = members.get_loc(location["ensemble_member"])
            lead = pd.Timedelta(location["lead_time"]).to_timedelta64()
            if np.isnat(values[i, m]) or lead > values[i, m]:
                values[i, m] = lead
    return ds.assign_coords(ingested_forecast_length=ds["ingested_forecast_length"].copy(data=values))


def update_template_per_member(template_ds: xr.Dataset, append_dim: str, process_results: ProcessResults) -> xr.Dataset:
    """`RegionJob.update_template_with_results` of a forecast with `ingested_forecast_length` per (init, member):
    trimmed to the last init with data read now or already published (an update re-ingesting a published init
    carries its lengths in: finding nothing new there keeps it, it is no outage), then each member's length."""
    last = last_successful_label(process_results, append_dim)
    lengths = template_ds["ingested_forecast_length"]
    published = lengths.notnull().any([dim for dim in lengths.dims if dim != append_dim]).values
    labels = template_ds.get_index(append_dim)
    if published.any():
        newest_published = labels[np.flatnonzero(published)[-1]]
        last = newest_published if last is None else max(last, newest_published)
    ds = (
        template_ds.isel({append_dim: slice(0, 0)})
        if last is None
        else template_ds.sel({append_dim: slice(None, last)})
    )
    return with_ingested_forecast_length_per_member(ds, process_results)


def update_jobs_completing_members(
    job_class: type[JobT],
    final_store: Any,
    template_ds: xr.Dataset,
    append_dim: str,
    all_data_vars: Sequence[Any],
    source_url: str | None,
    expected_forecast_length: pd.Timedelta,
) -> tuple[list[JobT], xr.Dataset]:
    """An update of a forecast recording `ingested_forecast_length` per (init, member): re-ingest the newest
    published init while any member lacks leads (its job's `merge_published_store` set: what is published is merged,
    not fetched again) and append every newer init. The returned template carries the published lengths."""
    store = final_store if isinstance(final_store, ObjectStore) else ObjectStore(final_store)
    published = store.open_dataset() if store.exists("zarr.json") else None
    start_index = 0
    merge_index: int | None = None
    if published is not None and published.sizes[append_dim] > 0:
        published_ingested = published["ingested_forecast_length"].values
        length = published.sizes[append_dim]
        values = template_ds["ingested_forecast_length"].values.copy()
        values[:length] = published_ingested
        template_ds = template_ds.assign_coords(
            ingested_forecast_length=template_ds["ingested_forecast_length"].copy(data=values)
        )
        newest = published_ingested[-1]
        complete = not np.isnat(newest).any() and bool((newest >= expected_forecast_length.to_timedelta64()).all())
        start_index = length if complete else length - 1
        merge_index = None if complete else length - 1
    regions = [slice(p, p + 1) for p in range(start_index, template_ds.sizes[append_dim])]
    jobs = job_class.jobs_for_regions(template_ds, append_dim, all_data_vars, regions, source_url)
    jobs = [
        job.model_copy(update={"merge_published_store": store.url}) if job.region.start == merge_index else job
        for job in jobs
    ]
    return jobs, template_ds


def leads_to_fetch(
    lead_hours: Sequence[int],
    region_ds: xr.Dataset,
    init_time: pd.Timestamp,
    member: int,
    merging: bool,
    keep_last_ingested: bool = False,
) -> list[int]:
    """The leads of (init, member) to ask the source for: all of them, or when the job merges what is published,
    those past the member's `ingested_forecast_length` (nothing for a complete member). `keep_last_ingested` asks
    for the last ingested lead again when anything is left to fetch: an accumulation since the start of the
    forecast needs it to turn the next lead into a rate."""
    if not merging:
        return list(lead_hours)
    published = region_ds["ingested_forecast_length"].sel(init_time=init_time, ensemble_member=member).values
    if np.isnat(published):
        return list(lead_hours)
    done = float(published / np.timedelta64(1, "h"))
    remaining = [lead for lead in lead_hours if lead > done]
    if keep_last_ingested and remaining:
        return [lead for lead in lead_hours if lead >= done]
    return remaining


class TransformWithHolding:
    """A region job's transform written once for both paths (a mixin placed before `RegionJob`): the in-memory
    region (NaN where no field was read) and the scratch path's sparse region, where `holding` marks the fields
    written and the transform updates it where fields arrive (the published ones it merges in)."""

    def transform_fields(self, data_array: xr.DataArray, data_var: Any, holding: npt.NDArray[np.bool_] | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement transform_fields()")

    def apply_data_transformations(self, data_array: xr.DataArray, data_var: Any) -> None:
        self.transform_fields(data_array, data_var, None)

    def apply_data_transformations_sparse(
        self, data_array: xr.DataArray, data_var: Any, written: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.bool_]:
        holding = written.copy()
        self.transform_fields(data_array, data_var, holding)
        return holding


def merge_published(
    data_array: xr.DataArray,
    data_var: DataVar[Any],
    store: ObjectStore,
    holding: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Fill the positions this job did not fetch (NaN) with the store's published values, one block of whole
    chunks (all members x a chunk of leads x a chunk row x a shard's columns) at a time. With `holding` (over the
    data array's leading dims, `init_time`, `ensemble_member` and `lead_time` in its order: the fields written; the
    others read as zeros): a field not written is NaN-filled where a published value first arrives for it, and
    marked."""
    published = store.open_dataset(chunks=None)
    if data_var.name not in published:
        return
    leading = ("init_time", "ensemble_member", "lead_time")
    dims = tuple(data_array.dims)
    if set(dims[:3]) != set(leading) or dims[3:] != ("latitude", "longitude"):
        raise ValueError(f"{data_var.name}: dims {dims}, expected init_time, ensemble_member, lead_time (any order)")
    order = [dims.index(dim) for dim in leading]
    # Views in (init, member, lead, latitude, longitude) order: writes land in the data array and in `holding`.
    values = np.transpose(data_array.values, (*order, 3, 4))
    held = None if holding is None else np.transpose(holding, order)
    published_inits = published.get_index("init_time")
    source = published[data_var.name].transpose(*leading, "latitude", "longitude")
    chunk_of = dict(zip(dims, data_var.encoding.chunks, strict=True))
    shard_of = dict(zip(dims, data_var.encoding.shards or data_var.encoding.chunks, strict=True))
    lead_step, lat_step, lon_step = chunk_of["lead_time"], chunk_of["latitude"], shard_of["longitude"]
    n_lead, n_lat, n_lon = values.shape[2:]
    for i, init in enumerate(data_array.get_index("init_time")):
        if init not in published_inits:
            continue
        row = source.isel(init_time=published_inits.get_loc(init))
        for lead in range(0, n_lead, lead_step):
            for lat in range(0, n_lat, lat_step):
                for lon in range(0, n_lon, lon_step):
                    block = (slice(lead, lead + lead_step), slice(lat, lat + lat_step), slice(lon, lon + lon_step))
                    target = values[(i, slice(None), *block)]
                    stored = row.isel(lead_time=block[0], latitude=block[1], longitude=block[2]).values
                    if held is None:
                        np.copyto(target, stored, where=np.isnan(target))
                        continue
                    written = held[i, :, block[0]]  # a view: (member, lead)
                    arriving = ~written & ~np.isnan(stored).all(axis=(-2, -1))
                    for member, step in zip(*np.nonzero(arriving), strict=True):
                        values[i, member, lead + step] = np.nan
                        written[member, step] = True
                    np.copyto(target, stored, where=np.isnan(target) & written[:, :, None, None])
