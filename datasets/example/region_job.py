from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Self

import fsspec
import numpy as np
import numpy.typing as npt
import xarray as xr

from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.common.storage import ObjectStore
from reformatters.region_job import ForecastSourceFileCoord, RegionJob, append_dim_shard_length
from reformatters.sources.errors import SourceUnreadableError
from reformatters.update.pause import pause_at

from . import source
from .template_config import ExampleDataVar

DEFAULT_SOURCE_URL = "data/example-source"


class ExampleSourceFileCoord(ForecastSourceFileCoord):
    def get_url(self) -> str:
        return f"{self.source_url.rstrip('/')}/{source.relative_path(self.init_time, self.lead_hours)}"


class ExampleRegionJob(RegionJob[ExampleDataVar, ExampleSourceFileCoord]):
    max_vars_per_job = 2
    read_batch_size = 6

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[ExampleDataVar]
    ) -> Sequence[ExampleSourceFileCoord]:
        return ExampleSourceFileCoord.for_each_init_and_lead(
            processing_region_ds, self.source_url or DEFAULT_SOURCE_URL
        )

    def download_file(self, coord: ExampleSourceFileCoord, data_var_group: Sequence[ExampleDataVar]) -> bytes:
        pause_at("download")
        with fsspec.open(coord.get_url(), "rb") as file:
            data: bytes = file.read()
        return data

    def read_data(
        self, coord: ExampleSourceFileCoord, data_var: ExampleDataVar, payload: bytes | Mapping[str, bytes]
    ) -> npt.NDArray[np.float32]:
        assert isinstance(payload, bytes)
        try:
            with np.load(io.BytesIO(payload)) as arrays:
                return np.asarray(arrays[data_var.internal_attrs.source_name], dtype=np.float32)
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise SourceUnreadableError(
                f"{coord.get_url()} is not an npz file holding {data_var.name}: {error}"
            ) from error

    def transforms_region(self, data_var: ExampleDataVar) -> bool:
        return data_var.internal_attrs.deaccumulate_to_rate

    def apply_data_transformations(self, data_array: xr.DataArray, data_var: ExampleDataVar) -> None:
        if data_var.internal_attrs.deaccumulate_to_rate:
            lead_hours = data_array["lead_time"].values / np.timedelta64(1, "h")
            deaccumulate_along_axis(
                data_array.values, lead_hours, data_array.dims.index("lead_time"), "accumulation", None
            )
        super().apply_data_transformations(data_array, data_var)

    @classmethod
    def operational_update_jobs(
        cls,
        final_store: Any,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[ExampleDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """Reprocess the newest init in the store (it may be incomplete) and append the newer ones.

        The first region runs from the newest published init to the end of its shard (the encode step merges
        it into the shard's published content); later regions are whole shards, up to the template's end.
        """
        store = final_store if isinstance(final_store, ObjectStore) else ObjectStore(final_store)
        length = template_ds.sizes[append_dim]
        start = 0
        if store.exists("zarr.json"):
            published = store.open_dataset()
            if published.sizes[append_dim] > 0:
                newest = published.get_index(append_dim)[-1]
                start = int(template_ds.get_index(append_dim).get_loc(newest))
        shard = append_dim_shard_length(all_data_vars, template_ds, append_dim)
        regions = []
        while start < length:
            stop = min((start // shard + 1) * shard, length)
            regions.append(slice(start, stop))
            start = stop
        jobs = cls.jobs_for_regions(template_ds, append_dim, all_data_vars, regions, source_url=source_url)
        return jobs, template_ds
