"""NOAA GEFS analysis, 0.25 degree: structure of the `noaa-gefs-analysis` dataset.

A 3-hourly series with `time` as its append dimension, stitched from the shortest leads of successive control (c00)
runs of GEFS. The variables are `noaa-gefs-forecast-35-day`'s surface variables, defined there and used here
under the same names and encodings' codecs, with the analysis's chunks and shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reformatters.common.config_models import Coordinate, CoordinateAttrs, DatasetAttributes

from ..forecast_35_day.template_config import (
    RESOLUTION,
    TIME_ENCODING,
    GefsDataVar,
    GefsGridTemplateConfig,
    grid_coords,
)
from ..forecast_35_day.template_config import data_vars as forecast_data_vars

DATASET_ID = "noaa-gefs-analysis"
DIMS = ("time", "latitude", "longitude")
CHUNKS = (1440, 32, 32)
SHARDS = (2880, 384, 384)
FREQUENCY = pd.Timedelta(hours=3)
# The current source era (`pgrb2` `s`/`a`/`b` files of GEFS v12). The 1.0 degree era from 2020-01-01 and the
# reforecast can be put in front later by moving the start back a whole number of shards (2880 steps, 360 days): the
# structure stays and each shard keeps its bytes, only its index along `time` moves (except where the era's first
# steps gain an earlier neighbour: the first window step, deaccumulated, and a missing first step, interpolated).
CURRENT_ERA_START = pd.Timestamp("2020-09-23T12:00")
# The forecast dataset's variables that are not surface (or near-surface) fields.
NOT_SURFACE = ("geopotential_height_500hpa",)

STEP_RULE = (
    "Each time is taken from the newest 6-hourly control (c00) run that has it at lead 0 or 3 hours; a variable "
    "GEFS publishes only as a window accumulation or average (no lead-0 message) is taken from one run back, at lead "
    "3 or 6 hours."
)
INTERVAL = "time: mean (interval: the 3 hours before this time)"
WINDOWED = (
    "Average over the 3 hours before this time, from the 6-hour window of the run the step comes from (lead 3 h: its "
    "first 3 hours; lead 6 h: the difference of the 0-6 h and 0-3 h windows)."
)
GAPS = (
    "A single missing time step is the linear interpolation (mean) of its two neighbours; two or more consecutive "
    "missing steps stay NaN."
)


def is_categorical(var: GefsDataVar) -> bool:
    """Flag-like variables (resampled by nearest neighbour): never interpolated across a missing step."""
    return var.internal_attrs.resampling == "nearest"


def data_vars(chunks: tuple[int, ...] = CHUNKS, shards: tuple[int, ...] = SHARDS) -> tuple[GefsDataVar, ...]:
    """The forecast dataset's surface variables with the analysis's chunks, shards and interval wording."""
    variables = []
    for var in forecast_data_vars(chunks, shards):
        if var.name in NOT_SURFACE:
            continue
        notes = [] if var.internal_attrs.window == "instant" else [WINDOWED]
        if not is_categorical(var):
            notes.append(GAPS)
        attrs = var.attrs.model_copy(
            update={
                "comment": " ".join(notes) or None,
                "cell_methods": None if var.internal_attrs.window == "instant" else INTERVAL,
            }
        )
        variables.append(var.model_copy(update={"attrs": attrs}))
    return tuple(variables)


class GefsAnalysisTemplateConfig(GefsGridTemplateConfig):
    def dimension_coordinates(self) -> dict[str, Any]:
        return self.grid_coordinates()

    def derive_coordinates(self, ds: Any) -> dict[str, Any]:
        return {"spatial_ref": ((), np.int64(0))}


def gefs_analysis_template_config(
    *,
    resolution: float = RESOLUTION,
    chunks: tuple[int, ...] = CHUNKS,
    shards: tuple[int, ...] = SHARDS,
    start: pd.Timestamp = CURRENT_ERA_START,
    templates_dir: Path | None = None,
) -> GefsAnalysisTemplateConfig:
    return GefsAnalysisTemplateConfig(
        dims=DIMS,
        append_dim="time",
        append_dim_start=start,
        append_dim_frequency=FREQUENCY,
        template_append_length=8,
        resolution=resolution,
        variant_templates_dir=templates_dir,
        dataset_attributes=DatasetAttributes(
            dataset_id=DATASET_ID,
            dataset_version="0.1.0",
            name="NOAA GEFS analysis",
            description="Weather analysis from the Global Ensemble Forecast System (GEFS) operated by NOAA NWS NCEP: "
            f"a continuous 3-hourly series from the shortest leads of successive control runs. {STEP_RULE}",
            attribution="NOAA NWS NCEP GEFS data processed by reformatters.",
            spatial_domain="Global",
            spatial_resolution="0.25 degrees (~20km); 100 m wind resampled from 0.5 degrees",
            time_domain=f"{start:%Y-%m-%d %H:%M} UTC to present",
            time_resolution="3 hours",
        ),
        coords=(
            Coordinate(
                name="time",
                encoding=TIME_ENCODING,
                attrs=CoordinateAttrs(long_name="Time", standard_name="time", axis="T"),
            ),
            *grid_coords(resolution),
        ),
        data_vars=data_vars(chunks, shards),
    )
