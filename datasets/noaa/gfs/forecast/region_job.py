"""How a region of `noaa-gfs-forecast` is produced from NOAA's GRIB2 files and their `.idx` inventories."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.forecasts import first_init_to_update, with_ingested_forecast_length
from reformatters.region_job import ForecastSourceFileCoord, ProcessResults, RegionJob
from reformatters.sources.grib_decode import GridSpec, decode_message
from reformatters.sources.grib_index import (
    instant_step,
    window_step,
)

from ...idx_messages import fetch_with_nomads_fallback, message_or_empty_field, wanted_messages
from .template_config import WINDOW_RESET_HOURS, GfsDataVar

NOAA_BUCKET_URL = "https://noaa-gfs-bdp-pds.s3.amazonaws.com"
NOMADS_URL = "https://nomads.ncep.noaa.gov/pub/data/nccf/com/gfs/prod"
GRID = GridSpec.global_regular(0.25, roll_longitude_to_180=True)
KELVIN_OFFSET = np.float32(273.15)


def window_start_hours(lead_hours: int) -> int:
    """GFS windows restart every 6 h: lead 7 holds 6-7, lead 12 holds 6-12, lead 129 holds 126-129."""
    return ((lead_hours - 1) // WINDOW_RESET_HOURS) * WINDOW_RESET_HOURS


def step_text(data_var: GfsDataVar, lead_hours: int) -> str | None:
    """The `.idx` step of this variable's message at this lead; None where GFS has no message (windows at 0)."""
    window = data_var.internal_attrs.window
    if window == "instant":
        return instant_step(lead_hours)
    if lead_hours == 0:
        return None
    return window_step(window_start_hours(lead_hours), lead_hours, window)


@functools.lru_cache(maxsize=4096)
def gfs_file_url(source_url: str, init_time: pd.Timestamp, lead_time: pd.Timedelta) -> str:
    # Asked several times per file and variable (inventory, ranges, logs); strftime is most of its cost.
    lead_hours = int(lead_time.total_seconds() // 3600)
    return (
        f"{source_url.rstrip('/')}/gfs.{init_time:%Y%m%d}/{init_time:%H}/atmos/"
        f"gfs.t{init_time:%H}z.pgrb2.0p25.f{lead_hours:03d}"
    )


class GfsSourceFileCoord(ForecastSourceFileCoord):
    def get_url(self) -> str:
        return gfs_file_url(self.source_url, self.init_time, self.lead_time)

    def get_idx_url(self) -> str:
        return f"{self.get_url()}.idx"


class GfsForecastRegionJob(RegionJob[GfsDataVar, GfsSourceFileCoord]):
    max_vars_per_job = 4
    download_per_variable = True  # byte ranges from the .idx: each variable's messages on their own
    download_batch_size = 16
    read_batch_size = 16

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[GfsDataVar]
    ) -> Sequence[GfsSourceFileCoord]:
        return GfsSourceFileCoord.for_each_init_and_lead(processing_region_ds, self.source_url or NOAA_BUCKET_URL)

    def source_index_url(self, coord: GfsSourceFileCoord) -> str:
        return coord.get_idx_url()

    def download_file(self, coord: GfsSourceFileCoord, data_var_group: Sequence[GfsDataVar]) -> Mapping[str, bytes]:
        wanted = wanted_messages(data_var_group, lambda var: step_text(var, coord.lead_hours))
        return fetch_with_nomads_fallback(
            coord, wanted, nomads_url=NOMADS_URL, source_url_given=self.source_url is not None
        )

    def read_data_into(
        self,
        coord: GfsSourceFileCoord,
        data_var: GfsDataVar,
        payload: bytes | Mapping[str, bytes],
        out: npt.NDArray[np.float32],
    ) -> None:
        assert not isinstance(payload, bytes)
        step = step_text(data_var, coord.lead_hours)
        message = message_or_empty_field(payload, data_var, step, coord.get_idx_url(), out)
        if message is None:
            return
        decode_message(message, GRID, out=out)
        if data_var.internal_attrs.kelvin_to_celsius:
            out -= KELVIN_OFFSET

    def transforms_region(self, data_var: GfsDataVar) -> bool:
        return data_var.internal_attrs.deaccumulate_to_rate or data_var.internal_attrs.deaccumulate_average

    def apply_data_transformations(self, data_array: xr.DataArray, data_var: GfsDataVar) -> None:
        attrs = data_var.internal_attrs
        if attrs.deaccumulate_to_rate or attrs.deaccumulate_average:
            lead_hours = data_array["lead_time"].values / np.timedelta64(1, "h")
            deaccumulate_along_axis(
                data_array.values,
                lead_hours,
                data_array.dims.index("lead_time"),
                "accumulation" if attrs.deaccumulate_to_rate else "average",
                WINDOW_RESET_HOURS,
            )
        super().apply_data_transformations(data_array, data_var)

    @classmethod
    def update_template_with_results(
        cls, template_ds: xr.Dataset, append_dim: str, process_results: ProcessResults
    ) -> xr.Dataset:
        ds = super().update_template_with_results(template_ds, append_dim, process_results)
        return with_ingested_forecast_length(ds, process_results)

    @classmethod
    def operational_update_jobs(
        cls,
        final_store: Any,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[GfsDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """Reprocess the newest init in the store while its forecast is incomplete; append newer ones."""
        start_index = first_init_to_update(final_store, template_ds, append_dim)
        regions = [slice(p, p + 1) for p in range(start_index, template_ds.sizes[append_dim])]
        return cls.jobs_for_regions(template_ds, append_dim, all_data_vars, regions, source_url), template_ds
