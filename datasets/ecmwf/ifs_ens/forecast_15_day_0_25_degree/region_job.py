"""How a region of `ecmwf-ifs-ens-forecast-15-day-0-25-degree` is produced from ECMWF open data.

One ensemble file per step (`enfo`/`ef`) holds every perturbed member (and, before IFS cycle 50r1, the control);
from 50r1 on the control is the deterministic forecast (`oper`/`fc`). A source file coord is one member's field at
one step: its bytes are found through the file's JSON-lines `.index` (fetched once per worker and handed on by the
framework's index tasks) and fetched by byte range, every member of a step sharing one index.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.common.storage import ObjectStore
from reformatters.forecasts import (
    TransformWithHolding,
    leads_to_fetch,
    merge_published,
    update_jobs_completing_members,
    update_template_per_member,
)
from reformatters.region_job import EnsembleForecastSourceFileCoord, ProcessResults, RegionJob
from reformatters.sources.ecmwf_index import EcmwfMessageKey, fetch_ecmwf_messages
from reformatters.sources.grib_decode import GridSpec, decode_message
from reformatters.sources.grib_index import GribMessageNotFoundError

from .template_config import CONTROL_IN_OPER_FROM, EXPECTED_FORECAST_LENGTH, EcmwfDataVar

ECMWF_OPEN_DATA_URL = "https://ecmwf-forecasts.s3.eu-central-1.amazonaws.com"
ECMWF_DATA_URL = "https://data.ecmwf.int/forecasts"
# The ECMWF bucket and data.ecmwf.int slow down past about 8 parallel requests per client: the whole cluster
# shares that many (per host, whichever root a job reads from).
REQUESTS_PER_HOST = 8
KELVIN_OFFSET = np.float32(273.15)

Stream = Literal["enfo", "oper"]


def stream_of(init_time: pd.Timestamp, member: int) -> tuple[Stream, Literal["cf", "pf", "fc"]]:
    """Where a member's field is: (stream, type of its index line)."""
    if member == 0:
        return ("oper", "fc") if init_time >= CONTROL_IN_OPER_FROM else ("enfo", "cf")
    return "enfo", "pf"


@functools.lru_cache(maxsize=4096)
def ecmwf_file_url(source_url: str, init_time: pd.Timestamp, stream: Stream, step: int, resolution_dir: str) -> str:
    kind = "ef" if stream == "enfo" else "fc"
    return (
        f"{source_url.rstrip('/')}/{init_time:%Y%m%d}/{init_time:%H}z/ifs/{resolution_dir}/{stream}/"
        f"{init_time:%Y%m%d%H}0000-{step}h-{stream}-{kind}.grib2"
    )


def resolution_dir(resolution: float) -> str:
    return f"{resolution:g}".replace(".", "p")


class EcmwfSourceFileCoord(EnsembleForecastSourceFileCoord):
    """One member's fields at one step: a byte-range subset of the step's ensemble (or deterministic) file."""

    resolution_dir: str = "0p25"

    @property
    def stream(self) -> Stream:
        return stream_of(self.init_time, self.ensemble_member)[0]

    def get_url(self) -> str:
        return ecmwf_file_url(self.source_url, self.init_time, self.stream, self.lead_hours, self.resolution_dir)

    def get_index_url(self) -> str:
        return self.get_url().removesuffix(".grib2") + ".index"

    def message_key(self, data_var: EcmwfDataVar) -> EcmwfMessageKey:
        _, kind = stream_of(self.init_time, self.ensemble_member)
        attrs = data_var.internal_attrs
        return EcmwfMessageKey(
            param=attrs.param,
            levtype=attrs.levtype,
            levelist=attrs.levelist,
            step=str(self.lead_hours),
            type=kind,
            number=None if kind == "fc" else self.ensemble_member,
        )


@functools.lru_cache(maxsize=8)
def source_grid(resolution: float) -> GridSpec:
    """ECMWF's global grid at `resolution`, its first longitude taken from each message, rolled to -180."""
    ni = round(360 / resolution)
    return GridSpec(
        ni=ni,
        nj=round(180 / resolution) + 1,
        latitude_of_first_grid_point=90.0,
        longitude_of_first_grid_point=-180.0,
        latitude_of_last_grid_point=-90.0,
        longitude_of_last_grid_point=180.0 - resolution,
        roll_longitude_to_180=True,
        first_longitude_from_message=True,
    )


class EcmwfIfsEnsRegionJob(TransformWithHolding, RegionJob[EcmwfDataVar, EcmwfSourceFileCoord]):
    max_vars_per_job = 4
    download_per_variable = True  # one member's message per download: a variable's shard write needs only its own
    download_batch_size = 16
    read_batch_size = 16
    # A full variable-region (85 leads x 51 members x 721 x 1440, padded to whole shards) is 26.6 GB: it goes
    # through a worker-local scratch file.
    scratch_region_bytes = 1 << 30

    # Set for the init an update re-ingests: fields already published (leads up to each member's
    # `ingested_forecast_length` in the template) are not fetched again but merged from this store.
    merge_published_store: str | None = None

    @property
    def resolution(self) -> float:
        longitude = self.template_ds["longitude"].values
        return float(longitude[1] - longitude[0])

    def source_request_caps(self) -> Mapping[str, int]:
        hosts = {urlsplit(url).netloc for url in (ECMWF_OPEN_DATA_URL, ECMWF_DATA_URL)}
        hosts.add(urlsplit(self.source_url or ECMWF_OPEN_DATA_URL).netloc or "local")
        return dict.fromkeys(sorted(hosts), REQUESTS_PER_HOST)

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[EcmwfDataVar]
    ) -> Sequence[EcmwfSourceFileCoord]:
        """Every (step, member) of the region; when the job merges what is published, a member's steps past its
        `ingested_forecast_length` (and its last ingested step again if the group has an accumulation to turn
        into a rate)."""
        source_url = self.source_url or ECMWF_OPEN_DATA_URL
        directory = resolution_dir(self.resolution)
        lead_hours = [int(h) for h in processing_region_ds["lead_time"].values // np.timedelta64(1, "h")]
        members = [int(m) for m in processing_region_ds["ensemble_member"].values]
        merging = self.merge_published_store is not None
        accumulated = any(var.internal_attrs.deaccumulate_to_rate for var in data_var_group)
        coords: list[EcmwfSourceFileCoord] = []
        for init_time in processing_region_ds["init_time"].to_index():
            wanted = {
                member: set(leads_to_fetch(lead_hours, processing_region_ds, init_time, member, merging, accumulated))
                for member in members
            }
            # Step by step, every member of a step together: they share the step's index.
            coords.extend(
                EcmwfSourceFileCoord(
                    source_url=source_url,
                    init_time=init_time,
                    lead_time=pd.Timedelta(hours=lead),
                    ensemble_member=member,
                    resolution_dir=directory,
                )
                for lead in lead_hours
                for member in members
                if lead in wanted[member]
            )
        return coords

    def source_index_url(self, coord: EcmwfSourceFileCoord) -> str:
        return coord.get_index_url()

    def download_file(self, coord: EcmwfSourceFileCoord, data_var_group: Sequence[EcmwfDataVar]) -> Mapping[str, bytes]:
        wanted = {var.name: coord.message_key(var) for var in data_var_group}
        return fetch_ecmwf_messages(coord.get_url(), coord.get_index_url(), wanted)

    def read_data_into(
        self,
        coord: EcmwfSourceFileCoord,
        data_var: EcmwfDataVar,
        payload: bytes | Mapping[str, bytes],
        out: npt.NDArray[np.float32],
    ) -> None:
        assert not isinstance(payload, bytes)
        message = payload.get(data_var.name)
        if message is None:
            raise GribMessageNotFoundError(
                f"{coord.get_index_url()} lists no message {coord.message_key(data_var).describe()}"
            )
        decode_message(message, source_grid(self.resolution), out=out)
        attrs = data_var.internal_attrs
        if attrs.kelvin_to_celsius:
            out -= KELVIN_OFFSET
        if attrs.scale != 1.0:
            out *= np.float32(attrs.scale)

    def transforms_region(self, data_var: EcmwfDataVar) -> bool:
        return data_var.internal_attrs.deaccumulate_to_rate or self.merge_published_store is not None

    def transform_fields(
        self, data_array: xr.DataArray, data_var: EcmwfDataVar, holding: npt.NDArray[np.bool_] | None
    ) -> None:
        """Accumulations since the start of the forecast become the average rate since the previous lead, one
        (init, member) at a time (the scratch is two fields, whatever the ensemble size); then, for the init an
        update re-ingests, the published fields fill what was not fetched. `holding` (init, lead, member): the
        fields written (the others read as zeros, never as NaN), updated where published fields arrive; None: a
        region with NaN where no field was read."""
        if data_array.dims[:3] != ("init_time", "lead_time", "ensemble_member"):
            raise ValueError(f"{data_var.name}: dims {data_array.dims}, expected init_time, lead_time, ensemble_member")
        if data_var.internal_attrs.deaccumulate_to_rate:
            values = data_array.values
            lead_hours = data_array["lead_time"].values / np.timedelta64(1, "h")
            for init in range(values.shape[0]):
                for member in range(values.shape[2]):
                    deaccumulate_along_axis(
                        values[init, :, member],
                        lead_hours,
                        0,
                        "accumulation",
                        None,
                        present=None if holding is None else holding[init, :, member],
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
        all_data_vars: Sequence[EcmwfDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """Re-ingest the newest published init while any member (the control, from other files since 50r1,
        included) is shorter than 360 h, merging what is published instead of fetching it again; append every
        newer init."""
        return update_jobs_completing_members(
            cls, final_store, template_ds, append_dim, all_data_vars, source_url, EXPECTED_FORECAST_LENGTH
        )
