"""How a region of `noaa-gefs-analysis` is produced from the control (c00) runs of GEFS.

Which run and lead each time comes from (`source_run`): the newest 6-hourly c00 run with the time at lead 0 or 3 h;
a variable with no lead-0 message (window accumulations and averages) one run back, at lead 3 or 6 h. Files, messages
and their decoding (products, resampling of the 0.5 degree files, nearest neighbour for categorical fields) are the
GEFS forecast's (`forecast_35_day.region_job`).

The processing region is the region padded by two steps before and one after (`get_processing_region`): a lead-6
rate is the difference with the lead-3 accumulation of the step before, and a single missing step is the mean of
its neighbours once those are final. The padding is read, never written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import xarray as xr

from reformatters.common.arrays import holds_only_nan
from reformatters.common.deaccumulation import deaccumulate_along_axis
from reformatters.common.storage import ObjectStore
from reformatters.region_job import ProcessResults, SourceFileStatus

from ..forecast_35_day.region_job import (
    NOAA_BUCKET_URL,
    GefsForecast35DayRegionJob,
    GefsSourceFileCoord,
    product_at,
)
from ..forecast_35_day.template_config import WINDOW_RESET_HOURS, GefsDataVar
from .template_config import is_categorical

CONTROL_MEMBER = 0
RUN_INTERVAL = pd.Timedelta(hours=WINDOW_RESET_HOURS)
# Steps read beyond the region: two before (a rate at the region's first step needs the accumulation before it,
# and the interpolation of that step needs the rate before it), one after (the next neighbour of its last step).
PAD_BEFORE = 2
PAD_AFTER = 1


def has_lead_zero(var: GefsDataVar) -> bool:
    """Instantaneous fields have a lead-0 (`anl`) message; windows have none at lead 0."""
    return var.internal_attrs.window == "instant"


def source_run(time: pd.Timestamp, lead_zero: bool) -> tuple[pd.Timestamp, pd.Timedelta]:
    """(init time, lead) of the c00 run the analysis takes `time` from."""
    init = (time if lead_zero else time - pd.Timedelta(hours=3)).floor(RUN_INTERVAL)
    return init, time - init


class GefsAnalysisSourceFileCoord(GefsSourceFileCoord):
    """A c00 file (init, lead) placed at its valid time."""

    def out_loc(self) -> Mapping[str, Any]:
        return {"time": self.init_time + self.lead_time}


def window_hours(times: pd.DatetimeIndex) -> npt.NDArray[np.float64]:
    """Hours since 1970 along `times`: GEFS windows restart at every 6-hourly run, which falls on a multiple of 6
    of these hours, so deaccumulation along them sees the lead-3 step as a window's first and the lead-6 one as its
    second."""
    return np.asarray((times - pd.Timestamp("1970-01-01")) / pd.Timedelta(hours=1), dtype=np.float64)


def interpolate_single_gaps(values: npt.NDArray[np.float32], holding: npt.NDArray[np.bool_]) -> int:
    """In place along axis 0: a step without values whose two neighbours hold values becomes their mean; two or
    more consecutive missing steps stay missing. `holding` (one per step) says which steps hold values and is updated
    where one is filled. Returns how many were filled."""
    present = holding.copy()
    for step in np.nonzero(present)[0]:
        if holds_only_nan(values[step]):
            present[step] = False
    filled = 0
    for i in range(1, len(values) - 1):
        if present[i] or not (present[i - 1] and present[i + 1]):
            continue
        np.add(values[i - 1], values[i + 1], out=values[i])
        np.multiply(values[i], np.float32(0.5), out=values[i])
        holding[i] = True
        filled += 1
    return filled


class GefsAnalysisRegionJob(GefsForecast35DayRegionJob):
    max_vars_per_job = 4
    # A full-grid variable-region (2880 steps x 721 x 1440 float32, 12 GB) goes through a worker-local scratch file.
    scratch_region_bytes = 1 << 30

    @classmethod
    def source_groups(cls, data_vars: Sequence[GefsDataVar]) -> Sequence[Sequence[GefsDataVar]]:
        """Per product and per rule: variables with and without a lead-0 message come from different runs."""
        groups: dict[tuple[str, bool], list[GefsDataVar]] = {}
        for var in data_vars:
            groups.setdefault((var.internal_attrs.products, has_lead_zero(var)), []).append(var)
        return list(groups.values())

    def get_processing_region(self) -> slice:
        length = self.template_ds.sizes[self.append_dim]
        return slice(max(0, self.region.start - PAD_BEFORE), min(length, self.region.stop + PAD_AFTER))

    def generate_source_file_coords(
        self, processing_region_ds: xr.Dataset, data_var_group: Sequence[GefsDataVar]
    ) -> Sequence[GefsSourceFileCoord]:
        lead_zero = has_lead_zero(data_var_group[0])
        products = data_var_group[0].internal_attrs.products
        source_url = self.source_url or NOAA_BUCKET_URL
        coords = []
        for time in processing_region_ds.get_index("time"):
            init, lead = source_run(time, lead_zero)
            coords.append(
                GefsAnalysisSourceFileCoord(
                    source_url=source_url,
                    init_time=init,
                    ensemble_member=CONTROL_MEMBER,
                    lead_time=lead,
                    product=product_at(products, int(lead / pd.Timedelta(hours=1))),
                )
            )
        return coords

    def transforms_region(self, data_var: GefsDataVar) -> bool:
        attrs = data_var.internal_attrs
        return attrs.deaccumulate_to_rate or attrs.deaccumulate_average or not is_categorical(data_var)

    def transform_fields(
        self, data_array: xr.DataArray, data_var: GefsDataVar, holding: npt.NDArray[np.bool_] | None
    ) -> None:
        """Deaccumulate windows along time, then fill single missing steps. `holding` (one per time step): the
        fields written (in a scratch file the others read as zeros), updated where a gap is filled; None: a region
        with NaN where no field was read."""
        if data_array.dims[0] != "time":
            raise ValueError(f"{data_var.name}: dims {data_array.dims}, expected time first")
        attrs = data_var.internal_attrs
        values = data_array.values
        if attrs.deaccumulate_to_rate or attrs.deaccumulate_average:
            deaccumulate_along_axis(
                values,
                window_hours(data_array.get_index("time")),
                0,
                "accumulation" if attrs.deaccumulate_to_rate else "average",
                WINDOW_RESET_HOURS,
                present=holding,
            )
        if not is_categorical(data_var):
            interpolate_single_gaps(values, np.ones(len(values), dtype=bool) if holding is None else holding)

    @classmethod
    def update_template_with_results(
        cls, template_ds: xr.Dataset, append_dim: str, process_results: ProcessResults
    ) -> xr.Dataset:
        """End at the last time every variable of the results filled (a newer run gives the windowed variables a
        step more than the instantaneous ones: that step waits for the next run)."""
        ends = []
        for coords in process_results.values():
            labels = [c.out_loc()[append_dim] for c in coords if c.status == SourceFileStatus.Succeeded]
            if not labels:
                return template_ds.isel({append_dim: slice(0, 0)})
            ends.append(max(labels))
        if not ends:
            return template_ds.isel({append_dim: slice(0, 0)})
        return template_ds.sel({append_dim: slice(None, min(ends))})

    @classmethod
    def operational_update_jobs(
        cls,
        final_store: Any,
        template_ds: xr.Dataset,
        append_dim: str,
        all_data_vars: Sequence[GefsDataVar],
        source_url: str | None = None,
    ) -> tuple[Sequence[Self], xr.Dataset]:
        """From the last published step (a single missing step there is filled once its next neighbour exists) to
        the template's end, in regions that end on shard boundaries; the first one merges into its published
        shard."""
        store = final_store if isinstance(final_store, ObjectStore) else ObjectStore(final_store)
        published = store.open_dataset() if store.exists("zarr.json") else None
        length = 0 if published is None else int(published.sizes[append_dim])
        start = max(0, length - 1)
        end = template_ds.sizes[append_dim]
        axis = template_ds[all_data_vars[0].name].dims.index(append_dim)
        unit = all_data_vars[0].encoding.write_unit[axis]
        regions = []
        while start < end:
            stop = min(end, (start // unit + 1) * unit)
            regions.append(slice(start, stop))
            start = stop
        return cls.jobs_for_regions(template_ds, append_dim, all_data_vars, regions, source_url), template_ds
