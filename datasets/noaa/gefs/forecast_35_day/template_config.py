"""NOAA GEFS 35-day ensemble forecast, 0.25 degree: structure of the `noaa-gefs-forecast-35-day` dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import Field

from reformatters.common.config_models import (
    BaseInternalAttrs,
    Coordinate,
    CoordinateAttrs,
    DatasetAttributes,
    DataVar,
    DataVarAttrs,
    Encoding,
    latitude_longitude_coords,
    latitude_longitude_spatial_ref,
)
from reformatters.template_config import TemplateConfig

DATASET_ID = "noaa-gefs-forecast-35-day"
DIMS = ("init_time", "ensemble_member", "lead_time", "latitude", "longitude")
ENSEMBLE_MEMBERS = tuple(range(31))  # 0 is the control c00, 1-30 the perturbed p01-p30
CHUNKS = (1, 31, 64, 17, 16)
SHARDS = (1, 31, 192, 374, 368)
RESOLUTION = 0.25
LEAD_HOURS = np.concatenate([np.arange(0, 241, 3), np.arange(246, 841, 6)])
EXPECTED_FORECAST_LENGTH = pd.Timedelta(hours=840)
WINDOW_RESET_HOURS = 6
# The fine-grid `s` files stop here; later leads come from the coarse `a`/`b` files.
S_LAST_LEAD_HOURS = 240

WindowKind = Literal["instant", "acc", "ave", "max", "min"]
# Where a variable lives: `s` (fine grid) to 240 h then `a` or `b` (coarse grid), or `a`/`b` at every lead.
Products = Literal["s+a", "s+b", "a", "b"]


class GefsInternalAttrs(BaseInternalAttrs):
    grib_element: str
    grib_level: str
    products: Products
    window: WindowKind = "instant"
    # Categorical (0/1 and their window fractions) are resampled by nearest neighbour, not blended.
    resampling: Literal["bilinear", "nearest"] = "bilinear"
    kelvin_to_celsius: bool = False
    deaccumulate_average: bool = False


GefsDataVar = DataVar[GefsInternalAttrs]

LAST_STEP = "Average over the interval from the previous lead time to this one."
RATE = "Average precipitation rate since the previous lead time, from GEFS's 6-hour accumulation buckets."
CATEGORICAL = (
    "Fraction of the interval from the previous lead time to this one with this precipitation type (GEFS publishes "
    "the categorical types as window averages); leads past 240 h come from the 0.5 degree files by nearest neighbour."
)


def _var(
    name: str,
    element: str,
    level: str,
    products: Products,
    *,
    long_name: str,
    short_name: str,
    units: str,
    bits: int | Literal["no-rounding"],
    chunks: tuple[int, ...],
    shards: tuple[int, ...],
    window: WindowKind = "instant",
    standard_name: str | None = None,
    comment: str | None = None,
    cell_methods: str | None = None,
    kelvin_to_celsius: bool = False,
    resampling: Literal["bilinear", "nearest"] = "bilinear",
) -> GefsDataVar:
    step_type: Literal["instant", "avg"] = "instant" if window == "instant" else "avg"
    return GefsDataVar(
        name=name,
        encoding=Encoding(dtype="float32", fill_value=float("nan"), chunks=chunks, shards=shards),
        attrs=DataVarAttrs(
            long_name=long_name,
            short_name=short_name,
            units=units,
            step_type=step_type,
            standard_name=standard_name,
            comment=comment,
            cell_methods=cell_methods,
        ),
        internal_attrs=GefsInternalAttrs(
            grib_element=element,
            grib_level=level,
            products=products,
            window=window,
            keep_mantissa_bits=bits,
            deaccumulate_to_rate=window == "acc",
            deaccumulate_average=window == "ave",
            window_reset_frequency=pd.Timedelta(hours=WINDOW_RESET_HOURS) if window != "instant" else None,
            kelvin_to_celsius=kelvin_to_celsius,
            resampling=resampling,
        ),
    )


def data_vars(chunks: tuple[int, ...] = CHUNKS, shards: tuple[int, ...] = SHARDS) -> tuple[GefsDataVar, ...]:
    """The dataset's variables; names shared with `noaa-gfs-forecast` where GFS has the variable."""
    enc: dict[str, Any] = {"chunks": chunks, "shards": shards}
    interval = "time: mean (interval: from the previous lead time)"
    categorical: dict[str, Any] = {
        "units": "1",
        "bits": "no-rounding",
        "window": "ave",
        "resampling": "nearest",
        "cell_methods": interval,
        "comment": CATEGORICAL,
        **enc,
    }
    return (
        _var(
            "temperature_2m",
            "TMP",
            "2 m above ground",
            "s+a",
            long_name="2 metre temperature",
            short_name="t2m",
            units="degC",
            bits=7,
            standard_name="air_temperature",
            kelvin_to_celsius=True,
            **enc,
        ),
        _var(
            "relative_humidity_2m",
            "RH",
            "2 m above ground",
            "s+a",
            long_name="2 metre relative humidity",
            short_name="r2",
            units="%",
            bits=7,
            standard_name="relative_humidity",
            **enc,
        ),
        _var(
            "wind_u_10m",
            "UGRD",
            "10 m above ground",
            "s+a",
            long_name="10 metre U wind component",
            short_name="u10",
            units="m s-1",
            bits=6,
            standard_name="eastward_wind",
            **enc,
        ),
        _var(
            "wind_v_10m",
            "VGRD",
            "10 m above ground",
            "s+a",
            long_name="10 metre V wind component",
            short_name="v10",
            units="m s-1",
            bits=6,
            standard_name="northward_wind",
            **enc,
        ),
        _var(
            "wind_u_100m",
            "UGRD",
            "100 m above ground",
            "b",
            long_name="100 metre U wind component",
            short_name="u100",
            units="m s-1",
            bits=6,
            standard_name="eastward_wind",
            comment="From the 0.5 degree files at every lead, bilinearly resampled to 0.25 degrees.",
            **enc,
        ),
        _var(
            "wind_v_100m",
            "VGRD",
            "100 m above ground",
            "b",
            long_name="100 metre V wind component",
            short_name="v100",
            units="m s-1",
            bits=6,
            standard_name="northward_wind",
            comment="From the 0.5 degree files at every lead, bilinearly resampled to 0.25 degrees.",
            **enc,
        ),
        _var(
            "wind_gust_surface",
            "GUST",
            "surface",
            "s+b",
            long_name="Wind speed (gust)",
            short_name="gust",
            units="m s-1",
            bits=6,
            standard_name="wind_speed_of_gust",
            **enc,
        ),
        _var(
            "pressure_reduced_to_mean_sea_level",
            "PRMSL",
            "mean sea level",
            "s+a",
            long_name="Pressure reduced to MSL",
            short_name="prmsl",
            units="Pa",
            bits=10,
            standard_name="air_pressure_at_mean_sea_level",
            **enc,
        ),
        _var(
            "precipitation_surface",
            "APCP",
            "surface",
            "s+a",
            long_name="Precipitation rate",
            short_name="tp",
            units="kg m-2 s-1",
            bits=7,
            window="acc",
            standard_name="precipitation_flux",
            cell_methods=interval,
            comment=RATE,
            **enc,
        ),
        _var(
            "categorical_snow_surface",
            "CSNOW",
            "surface",
            "s+a",
            long_name="Categorical snow",
            short_name="csnow",
            **categorical,
        ),
        _var(
            "categorical_ice_pellets_surface",
            "CICEP",
            "surface",
            "s+a",
            long_name="Categorical ice pellets",
            short_name="cicep",
            **categorical,
        ),
        _var(
            "categorical_freezing_rain_surface",
            "CFRZR",
            "surface",
            "s+a",
            long_name="Categorical freezing rain",
            short_name="cfrzr",
            **categorical,
        ),
        _var(
            "categorical_rain_surface",
            "CRAIN",
            "surface",
            "s+a",
            long_name="Categorical rain",
            short_name="crain",
            **categorical,
        ),
        _var(
            "total_cloud_cover_atmosphere",
            "TCDC",
            "entire atmosphere",
            "s+a",
            long_name="Total cloud cover",
            short_name="tcc",
            units="%",
            bits=7,
            window="ave",
            standard_name="cloud_area_fraction",
            cell_methods=interval,
            comment=LAST_STEP,
            **enc,
        ),
        _var(
            "downward_short_wave_radiation_flux_surface",
            "DSWRF",
            "surface",
            "s+a",
            long_name="Surface downward short-wave radiation flux",
            short_name="sdswrf",
            units="W m-2",
            bits=7,
            window="ave",
            standard_name="surface_downwelling_shortwave_flux_in_air",
            cell_methods=interval,
            comment=LAST_STEP,
            **enc,
        ),
        _var(
            "downward_long_wave_radiation_flux_surface",
            "DLWRF",
            "surface",
            "s+a",
            long_name="Surface downward long-wave radiation flux",
            short_name="sdlwrf",
            units="W m-2",
            bits=7,
            window="ave",
            standard_name="surface_downwelling_longwave_flux_in_air",
            cell_methods=interval,
            comment=LAST_STEP,
            **enc,
        ),
        _var(
            "geopotential_height_500hpa",
            "HGT",
            "500 mb",
            "a",
            long_name="Geopotential height at 500 hPa",
            short_name="gh",
            units="gpm",
            bits=10,
            standard_name="geopotential_height",
            comment="From the 0.5 degree files at every lead, bilinearly resampled to 0.25 degrees.",
            **enc,
        ),
    )


_TIME_UNITS = "seconds since 1970-01-01 00:00:00"
TIME_ENCODING = Encoding(
    dtype="int64", fill_value=0, chunks=(100_000,), units=_TIME_UNITS, calendar="proleptic_gregorian"
)
_DURATION = Encoding(dtype="int64", fill_value=-1, chunks=(100_000,), units="seconds")
SPATIAL_REF_WKT = (
    'GEOGCS["GEFS sphere",DATUM["unknown",SPHEROID["Sphere",6371229,0]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]]'
)


class GefsGridTemplateConfig(TemplateConfig[GefsDataVar]):
    """What the GEFS datasets share: the global grid at `resolution` (the published 0.25 degree by default; a
    coarser variant, whose coarse source files are then at twice its resolution, keeps the same code paths at a size
    tests can hold) and a variant's template rendered under `variant_templates_dir`."""

    resolution: float = Field(RESOLUTION, gt=0)
    variant_templates_dir: Path | None = None

    @property
    def templates_dir(self) -> Path:
        return self.variant_templates_dir or super().templates_dir

    def update_template(self, templates_dir: Path | None = None) -> Path:
        return super().update_template(templates_dir or self.variant_templates_dir)

    def grid_coordinates(self) -> dict[str, Any]:
        return {
            "latitude": np.linspace(90.0, -90.0, round(180 / self.resolution) + 1),
            "longitude": -180.0 + np.arange(round(360 / self.resolution)) * self.resolution,
        }


def grid_coords(resolution: float) -> tuple[Coordinate, ...]:
    """latitude, longitude and spatial_ref of the GEFS grid at `resolution`."""
    n_lat, n_lon = round(180 / resolution) + 1, round(360 / resolution)
    return (
        *latitude_longitude_coords(n_lat, n_lon),
        latitude_longitude_spatial_ref(SPATIAL_REF_WKT, "GEFS uses a sphere with radius 6371229 m."),
    )


class GefsForecast35DayTemplateConfig(GefsGridTemplateConfig):
    """`ensemble_members` are the published dataset's by default; a variant with fewer keeps the code paths."""

    ensemble_members: tuple[int, ...] = ENSEMBLE_MEMBERS

    def dimension_coordinates(self) -> dict[str, Any]:
        return {
            "ensemble_member": np.asarray(self.ensemble_members, dtype=np.int64),
            "lead_time": pd.to_timedelta(LEAD_HOURS, unit="h"),
            **self.grid_coordinates(),
        }

    def derive_coordinates(self, ds: xr.Dataset) -> dict[str, Any]:
        init = ds["init_time"].values
        lead = ds["lead_time"].values
        members = ds.sizes["ensemble_member"]
        return {
            "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :]),
            "expected_forecast_length": (
                ("init_time",),
                np.full(len(init), EXPECTED_FORECAST_LENGTH.to_timedelta64(), dtype="timedelta64[ns]"),
            ),
            "ingested_forecast_length": (
                ("init_time", "ensemble_member"),
                np.full((len(init), members), np.timedelta64("NaT"), dtype="timedelta64[ns]"),
            ),
            "spatial_ref": ((), np.int64(0)),
        }


def gefs_forecast_35_day_template_config(
    *,
    ensemble_members: tuple[int, ...] = ENSEMBLE_MEMBERS,
    resolution: float = RESOLUTION,
    chunks: tuple[int, ...] = CHUNKS,
    shards: tuple[int, ...] = SHARDS,
    templates_dir: Path | None = None,
) -> GefsForecast35DayTemplateConfig:
    n_members = len(ensemble_members)
    return GefsForecast35DayTemplateConfig(
        dims=DIMS,
        append_dim="init_time",
        append_dim_start="2020-10-01T00:00",
        append_dim_frequency="1D",
        template_append_length=2,
        ensemble_members=ensemble_members,
        resolution=resolution,
        variant_templates_dir=templates_dir,
        dataset_attributes=DatasetAttributes(
            dataset_id=DATASET_ID,
            dataset_version="0.1.0",
            name="NOAA GEFS forecast, 35 day",
            description="Ensemble weather forecasts from the Global Ensemble Forecast System (GEFS) operated by "
            "NOAA NWS NCEP.",
            attribution="NOAA NWS NCEP GEFS data processed by reformatters.",
            spatial_domain="Global",
            spatial_resolution="0.25 degrees (~20km); leads past 240 hours resampled from 0.5 degrees",
            time_domain="Forecasts initialized 2020-10-01 00:00 UTC to present",
            time_resolution="Forecasts initialized every 24 hours (00z)",
            forecast_domain="Forecast lead time 0-840 hours (0-35 days) ahead",
            forecast_resolution="Forecast step 0-240 hours: 3 hourly, 246-840 hours: 6 hourly",
        ),
        coords=(
            Coordinate(
                name="init_time",
                encoding=TIME_ENCODING,
                attrs=CoordinateAttrs(long_name="Forecast initialization time"),
            ),
            Coordinate(
                name="ensemble_member",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(n_members,)),
                attrs=CoordinateAttrs(
                    long_name="Ensemble member",
                    comment="GEFS member number: 0 is the control (c00), 1-30 the perturbed members (p01-p30).",
                ),
            ),
            Coordinate(
                name="lead_time",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(len(LEAD_HOURS),), units="seconds"),
                attrs=CoordinateAttrs(long_name="Forecast lead time"),
            ),
            Coordinate(
                name="valid_time",
                encoding=Encoding(
                    dtype="int64",
                    fill_value=0,
                    chunks=(2_000, len(LEAD_HOURS)),
                    units=_TIME_UNITS,
                    calendar="proleptic_gregorian",
                ),
                attrs=CoordinateAttrs(long_name="Valid time"),
            ),
            Coordinate(
                name="expected_forecast_length",
                encoding=_DURATION,
                attrs=CoordinateAttrs(long_name="Expected forecast length"),
            ),
            Coordinate(
                name="ingested_forecast_length",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(10_000, n_members), units="seconds"),
                attrs=CoordinateAttrs(
                    long_name="Ingested forecast length",
                    comment="The longest lead time processed for this init time and ensemble member.",
                ),
            ),
            *grid_coords(resolution),
        ),
        data_vars=data_vars(chunks, shards),
    )
