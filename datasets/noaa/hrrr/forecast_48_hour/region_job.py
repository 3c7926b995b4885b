"""How a region of `noaa-hrrr-forecast-48-hour` is produced from HRRR's `wrfsfc` GRIB2 files and `.idx` inventories."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.forecasts import first_init_to_update, with_ingested_forecast_length
from reformatters.region_job import ForecastSourceFileCoord, ProcessResults, RegionJob
from reformatters.sources.grib_decode import decode_message
from reformatters.sources.grib_index import instant_step, window_step

from ...idx_messages import fetch_with_nomads_fallback, message_or_empty_field, wanted_messages
from .template_config import GRID, HrrrDataVar

NOAA_BUCKET_URL = "https://noaa-hrrr-bdp-pds.s3.amazonaws.com"
NOMADS_URL = "https://nomads.ncep.noaa.gov/pub/data/nccf/com/hrrr/prod"
KELVIN_OFFSET = np.float32(273.15)
SECONDS_PER_HOUR = np.float32(3600.0)


def step_text(data_var: HrrrDataVar, lead_hours: int) -> str | None:
    """The `.idx` step of this variable's message at this lead; None where no message applies (rates at lead 0).

    Precipitation comes from the one-hour accumulation each file holds beside the run total (`7-8 hour acc fcst`
    beside `0-8 hour acc fcst`), so every lead's rate stands on its own file.
    """
    if data_var.internal_attrs.window == "instant":
        return instant_step(lead_hours)
    if lead_hours == 0:
        return None
    return window_step(lead_hours - 1, lead_hours, "acc")


@functools.lru_cache(maxsize=4096)
def hrrr_file_url(source_url: str, init_time: pd.Timestamp, lead_time: pd.Timedelta) -> str:
    lead_hours = int(lead_time.total_seconds() // 3600)
    return f"{source_url.rstrip('/')}/hrrr.{init_time:%Y%m%d}/conus/hrrr.t{init_time:%H}z.wrfsfcf{lead_hours:02d}.grib2"


class HrrrSourceFileCoord(ForecastSourceFileCoord):
    def get_url(self) -> str:
        return hrrr_file_url(self.source_url, self.init_time, self.lead_time)

    def get_idx_url(self) -> str:
        return f"{self.get_url()}.idx"


class HrrrForecast48HourRegionJob(RegionJob[HrrrDataVar, HrrrSourceFileCoord]):
    max_vars_per_job = 4
    download_per_variable = True  # byte ranges from the .idx: each variable's messages on their own
    download_batch_size = 16
    read_batch_size = 16

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[HrrrDataVar]
    ) -> Sequence[HrrrSourceFileCoord]:
        return HrrrSourceFileCoord.for_each_init_and_lead(processing_region_ds, self.source_url or NOAA_BUCKET_URL)

    def source_index_url(self, coord: HrrrSourceFileCoord) -> str:
        return coord.get_idx_url()

    def download_file(self, coord: HrrrSourceFileCoord, data_var_group: Sequence[HrrrDataVar]) -> Mapping[str, bytes]:
        wanted = wanted_messages(data_var_group, lambda var: step_text(var, coord.lead_hours))
        return fetch_with_nomads_fallback(
            coord, wanted, nomads_url=NOMADS_URL, source_url_given=self.source_url is not None
        )

    def read_data_into(
        self,
        coord: HrrrSourceFileCoord,
        data_var: HrrrDataVar,
        payload: bytes | Mapping[str, bytes],
        out: npt.NDArray[np.float32],
    ) -> None:
        assert not isinstance(payload, bytes)
        step = step_text(data_var, coord.lead_hours)
        message = message_or_empty_field(payload, data_var, step, coord.get_idx_url(), out)
        if message is None:
            return
        # The files scan from the south-west corner northward; the dataset's y runs north to south.
        decode_message(message, GRID, out=out[::-1])
        if data_var.internal_attrs.kelvin_to_celsius:
            out -= KELVIN_OFFSET
        elif data_var.internal_attrs.deaccumulate_to_rate:
            out /= SECONDS_PER_HOUR  # kg m-2 over the last hour -> kg m-2 s-1

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
        all_data_vars: Sequence[HrrrDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """Reprocess the newest init in the store until its run's every lead is in; append newer ones."""
        start_index = first_init_to_update(final_store, template_ds, append_dim)
        regions = [slice(p, p + 1) for p in range(start_index, template_ds.sizes[append_dim])]
        return cls.jobs_for_regions(template_ds, append_dim, all_data_vars, regions, source_url), template_ds
