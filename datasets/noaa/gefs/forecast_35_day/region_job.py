"""How a region of `noaa-gefs-forecast-35-day` is produced from NOAA's GEFS member files and their `.idx`.

Each variable is read from the product that holds it at each lead: the 0.25 degree `s` file to 240 h where the
variable is there, else the 0.5 degree `a`/`b` file, decoded into a field of scratch on its own grid and resampled
into the field's place (bilinear with longitude wrap; nearest neighbour for categorical fields). Everything a hook
does is per file and per field, or per (init, member) along lead time, never over the whole variable-region.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.deaccumulation import NEGATIVE_RATE_TOLERANCE, deaccumulate_along_axis
from reformatters.common.resample import regular_global_plan
from reformatters.common.storage import ObjectStore
from reformatters.common.time_utils import utc_now
from reformatters.forecasts import (
    TransformWithHolding,
    leads_to_fetch,
    merge_published,
    update_jobs_completing_members,
    update_template_per_member,
)
from reformatters.region_job import EnsembleForecastSourceFileCoord, ProcessResults, RegionJob
from reformatters.sources.download import fetch_available_grib_messages
from reformatters.sources.grib_decode import GridSpec, decode_message
from reformatters.sources.grib_index import instant_step, window_step

from ...idx_messages import message_or_empty_field, wanted_messages
from .template_config import (
    EXPECTED_FORECAST_LENGTH,
    S_LAST_LEAD_HOURS,
    WINDOW_RESET_HOURS,
    GefsDataVar,
)

NOAA_BUCKET_URL = "https://noaa-gefs-pds.s3.amazonaws.com"
KELVIN_OFFSET = np.float32(273.15)
# Leads past 384 h (the extension) reach the bucket about 21 h after the rest: only inits this old have them.
EXTENSION_FIRST_LEAD_HOURS = 390
EXTENSION_DELAY = pd.Timedelta(hours=28)

Product = Literal["s", "a", "b"]


def member_name(member: int) -> str:
    return "c00" if member == 0 else f"p{member:02d}"


def window_start_hours(lead_hours: int) -> int:
    """GEFS buckets restart every 6 h: lead 3 holds 0-3, 6 holds 0-6, 9 holds 6-9, 246 holds 240-246."""
    return ((lead_hours - 1) // WINDOW_RESET_HOURS) * WINDOW_RESET_HOURS


def step_text(data_var: GefsDataVar, lead_hours: int) -> str | None:
    """The `.idx` step of this variable's message at this lead; None where GEFS has none (windows at lead 0)."""
    window = data_var.internal_attrs.window
    if window == "instant":
        return instant_step(lead_hours)
    if lead_hours == 0:
        return None
    return window_step(window_start_hours(lead_hours), lead_hours, window)


def product_at(products: str, lead_hours: int) -> Product:
    """The product a variable is read from at this lead (`s+a`: `s` to 240 h, then `a`)."""
    fine, _, coarse = products.rpartition("+")
    if fine and lead_hours <= S_LAST_LEAD_HOURS:
        return "s"
    return coarse  # type: ignore[return-value]


def requested_lead_hours(lead_hours: Sequence[int], init_time: pd.Timestamp, now: pd.Timestamp) -> list[int]:
    """The leads worth asking the source for: the extension only once the init is old enough to have it."""
    if init_time <= now - EXTENSION_DELAY:
        return list(lead_hours)
    return [lead for lead in lead_hours if lead < EXTENSION_FIRST_LEAD_HOURS]


@functools.lru_cache(maxsize=256)  # coords are handled in order; a larger cache only holds memory
def gefs_file_url(source_url: str, init_time: pd.Timestamp, member: int, product: str, lead_hours: int) -> str:
    dir_res, res = ("p25", "0p25") if product == "s" else ("p5", "0p50")
    return (
        f"{source_url.rstrip('/')}/gefs.{init_time:%Y%m%d}/{init_time:%H}/atmos/pgrb2{product}{dir_res}/"
        f"ge{member_name(member)}.t{init_time:%H}z.pgrb2{product}.{res}.f{lead_hours:03d}"
    )


class GefsSourceFileCoord(EnsembleForecastSourceFileCoord):
    product: Product

    def get_url(self) -> str:
        return gefs_file_url(self.source_url, self.init_time, self.ensemble_member, self.product, self.lead_hours)

    def get_idx_url(self) -> str:
        return f"{self.get_url()}.idx"


@functools.lru_cache(maxsize=8)
def fine_grid(resolution: float) -> GridSpec:
    return GridSpec.global_regular(resolution, roll_longitude_to_180=True)


@functools.lru_cache(maxsize=8)
def coarse_grid(resolution: float) -> GridSpec:
    """The `a`/`b` files' grid: twice the dataset's spacing, longitudes 0..360 as published (no roll)."""
    return GridSpec.global_regular(2 * resolution)


_scratch = threading.local()


def _coarse_scratch(shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """This thread's field to decode a coarse message into before it is resampled into its place."""
    values: npt.NDArray[np.float32] | None = getattr(_scratch, "values", None)
    if values is None or values.shape != shape:
        values = np.empty(shape, dtype=np.float32)
        _scratch.values = values
    return values


def clamp_window_accumulation(values: npt.NDArray[np.float32], window_hours: float) -> int:
    """The rate rule of `deaccumulate_along_axis` for a window's first step, applied to the accumulation itself
    (in place): small negatives (packing noise) become 0, clearly negative ones NaN; returns how many."""
    with np.errstate(invalid="ignore"):
        clearly = values < np.float32(NEGATIVE_RATE_TOLERANCE * window_hours * 3600.0)
    np.copyto(values, np.float32(np.nan), where=clearly)
    np.maximum(values, np.float32(0), out=values)
    return int(np.count_nonzero(clearly))


class GefsForecast35DayRegionJob(TransformWithHolding, RegionJob[GefsDataVar, GefsSourceFileCoord]):
    max_vars_per_job = 4
    download_per_variable = True  # byte ranges from the .idx: each variable's messages on their own
    download_batch_size = 16
    # A full-grid variable-region (31 members x 181 leads) is 26 GB padded: through a worker-local scratch file.
    scratch_region_bytes = 1 << 30
    read_batch_size = 16

    # Set for the init an update re-ingests: fields already published (leads up to each member's
    # `ingested_forecast_length` in the template) are not fetched again but merged from this store.
    merge_published_store: str | None = None

    @classmethod
    def source_groups(cls, data_vars: Sequence[GefsDataVar]) -> Sequence[Sequence[GefsDataVar]]:
        groups: dict[str, list[GefsDataVar]] = {}
        for var in data_vars:
            groups.setdefault(var.internal_attrs.products, []).append(var)
        return list(groups.values())

    @property
    def resolution(self) -> float:
        longitude = self.template_ds["longitude"].values
        return float(longitude[1] - longitude[0])

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[GefsDataVar]
    ) -> Sequence[GefsSourceFileCoord]:
        products = data_var_group[0].internal_attrs.products
        source_url = self.source_url or NOAA_BUCKET_URL
        lead_hours = [int(h) for h in processing_region_ds["lead_time"].values // np.timedelta64(1, "h")]
        members = [int(m) for m in processing_region_ds["ensemble_member"].values]
        merging = self.merge_published_store is not None
        now = utc_now()
        coords: list[GefsSourceFileCoord] = []
        for init_time in processing_region_ds["init_time"].to_index():
            leads = requested_lead_hours(lead_hours, init_time, now)
            for member in members:
                coords.extend(
                    GefsSourceFileCoord(
                        source_url=source_url,
                        init_time=init_time,
                        ensemble_member=member,
                        lead_time=pd.Timedelta(hours=lead),
                        product=product_at(products, lead),
                    )
                    for lead in leads_to_fetch(leads, processing_region_ds, init_time, member, merging)
                )
        return coords

    def source_index_url(self, coord: GefsSourceFileCoord) -> str:
        return coord.get_idx_url()

    def download_file(self, coord: GefsSourceFileCoord, data_var_group: Sequence[GefsDataVar]) -> Mapping[str, bytes]:
        wanted = wanted_messages(data_var_group, lambda var: step_text(var, coord.lead_hours))
        return fetch_available_grib_messages(coord.get_url(), coord.get_idx_url(), wanted)

    def read_data_into(
        self,
        coord: GefsSourceFileCoord,
        data_var: GefsDataVar,
        payload: bytes | Mapping[str, bytes],
        out: npt.NDArray[np.float32],
    ) -> None:
        assert not isinstance(payload, bytes)
        attrs = data_var.internal_attrs
        step = step_text(data_var, coord.lead_hours)
        message = message_or_empty_field(payload, data_var, step, coord.get_idx_url(), out)
        if message is None:
            return
        resolution = self.resolution
        if coord.product == "s":
            decode_message(message, fine_grid(resolution), out=out)
            if attrs.kelvin_to_celsius:
                out -= KELVIN_OFFSET
            return
        grid = coarse_grid(resolution)
        source = decode_message(message, grid, out=_coarse_scratch((grid.nj, grid.ni)))
        if attrs.kelvin_to_celsius:
            source -= KELVIN_OFFSET
        if attrs.window != "instant":
            start = window_start_hours(coord.lead_hours)
            previous = self.template_ds.get_index("lead_time").get_loc(coord.lead_time) - 1
            previous_hours = self.template_ds["lead_time"].values[previous] / np.timedelta64(1, "h")
            if previous < 0 or previous_hours > start:
                # Deaccumulation would difference this field with a field on the other grid.
                raise NotImplementedError(
                    f"{data_var.name}: a windowed coarse-grid field at lead {coord.lead_hours} h that is not its "
                    f"window's first step ({start}-{coord.lead_hours} h after {previous_hours:g} h); read it from "
                    "the fine grid or deaccumulate it before resampling"
                )
            if attrs.deaccumulate_to_rate:
                # Deaccumulated and clamped on the source grid, then resampled: a first step's rate is A / seconds.
                clamp_window_accumulation(source, coord.lead_hours - start)
        plan = regular_global_plan(2 * resolution, resolution)
        if attrs.resampling == "nearest":
            plan.nearest(source, out=out)
        else:
            plan.bilinear(source, out=out)

    def transforms_region(self, data_var: GefsDataVar) -> bool:
        attrs = data_var.internal_attrs
        return attrs.deaccumulate_to_rate or attrs.deaccumulate_average or self.merge_published_store is not None

    def transform_fields(
        self, data_array: xr.DataArray, data_var: GefsDataVar, holding: npt.NDArray[np.bool_] | None
    ) -> None:
        """`holding` (init, member, lead): the fields written (the others read as zeros, never as NaN), updated
        where the published fields merged in arrive; None: a region with NaN where no field was read."""
        attrs = data_var.internal_attrs
        values = data_array.values
        if data_array.dims[:3] != ("init_time", "ensemble_member", "lead_time"):
            raise ValueError(f"{data_var.name}: dims {data_array.dims}, expected init_time, ensemble_member, lead_time")
        if attrs.deaccumulate_to_rate or attrs.deaccumulate_average:
            lead_hours = data_array["lead_time"].values / np.timedelta64(1, "h")
            # One (init, member) at a time: the scratch is two fields, whatever the ensemble size.
            for init in range(values.shape[0]):
                for member in range(values.shape[1]):
                    deaccumulate_along_axis(
                        values[init, member],
                        lead_hours,
                        0,
                        "accumulation" if attrs.deaccumulate_to_rate else "average",
                        WINDOW_RESET_HOURS,
                        present=None if holding is None else holding[init, member],
                    )
        if self.merge_published_store is not None:
            # After deaccumulation: published values are rates already.
            merge_published(data_array, data_var, ObjectStore(self.merge_published_store), holding)

    @classmethod
    def update_template_with_results(
        cls, template_ds: xr.Dataset, append_dim: str, process_results: ProcessResults
    ) -> xr.Dataset:
        """Trim to the last init with data (read now or published); `ingested_forecast_length` per (init, member)."""
        return update_template_per_member(template_ds, append_dim, process_results)

    @classmethod
    def operational_update_jobs(
        cls,
        final_store: Any,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[GefsDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """Re-ingest the newest published init while any member lacks leads (merging what is published instead
        of fetching it again) and append every newer init."""
        return update_jobs_completing_members(
            cls, final_store, template_ds, append_dim, all_data_vars, source_url, EXPECTED_FORECAST_LENGTH
        )
