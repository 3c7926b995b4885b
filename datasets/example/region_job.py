from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.region_job import RegionJob, SourceFileCoord

from . import source
from .template_config import ExampleDataVar

DEFAULT_SOURCE_URL = "data/example-source"


class ExampleSourceFileCoord(SourceFileCoord):
    source_url: str
    init_time: pd.Timestamp
    lead_time: pd.Timedelta

    def get_url(self) -> str:
        lead_hours = int(self.lead_time.total_seconds() // 3600)
        return f"{self.source_url.rstrip('/')}/{source.relative_path(self.init_time, lead_hours)}"

    def out_loc(self) -> Mapping[str, Any]:
        return {"init_time": self.init_time, "lead_time": self.lead_time}


class ExampleRegionJob(RegionJob[ExampleDataVar, ExampleSourceFileCoord]):
    max_vars_per_job = 2
    read_batch_size = 6

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[ExampleDataVar]
    ) -> Sequence[ExampleSourceFileCoord]:
        root = self.source_url or DEFAULT_SOURCE_URL
        return [
            ExampleSourceFileCoord(source_url=root, init_time=init_time, lead_time=lead_time)
            for init_time in processing_region_ds["init_time"].to_index()
            for lead_time in processing_region_ds["lead_time"].to_index()
        ]

    def download_file(self, coord: ExampleSourceFileCoord, data_var_group: Sequence[ExampleDataVar]) -> bytes:
        with fsspec.open(coord.get_url(), "rb") as file:
            data: bytes = file.read()
        return data

    def read_data(
        self, coord: ExampleSourceFileCoord, data_var: ExampleDataVar, payload: bytes | Mapping[str, bytes]
    ) -> npt.NDArray[np.float32]:
        assert isinstance(payload, bytes)
        with np.load(io.BytesIO(payload)) as arrays:
            return np.asarray(arrays[data_var.internal_attrs.source_name], dtype=np.float32)

    def apply_data_transformations(self, data_array: xr.DataArray, data_var: ExampleDataVar) -> None:
        if data_var.internal_attrs.deaccumulate_to_rate:
            lead_hours = data_array["lead_time"].values / np.timedelta64(1, "h")
            deaccumulate_along_axis(
                data_array.values, lead_hours, data_array.dims.index("lead_time"), "accumulation", None
            )
        super().apply_data_transformations(data_array, data_var)
