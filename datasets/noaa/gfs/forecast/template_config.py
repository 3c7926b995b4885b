"""NOAA GFS forecast, 0.25 degree: structure of the `noaa-gfs-forecast` dataset."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

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

DIMS = ("init_time", "lead_time", "latitude", "longitude")
CHUNKS = (1, 105, 121, 121)
SHARDS = (1, 210, 726, 726)
LEAD_HOURS = np.concatenate([np.arange(0, 121), np.arange(123, 385, 3)])
EXPECTED_FORECAST_LENGTH = pd.Timedelta(hours=384)
WINDOW_RESET_HOURS = 6

WindowKind = Literal["instant", "acc", "ave", "max", "min"]


class GfsInternalAttrs(BaseInternalAttrs):
    grib_element: str
    grib_level: str
    window: WindowKind = "instant"
    kelvin_to_celsius: bool = False
    deaccumulate_average: bool = False


GfsDataVar = DataVar[GfsInternalAttrs]


def _var(
    name: str,
    element: str,
    level: str,
    *,
    long_name: str,
    short_name: str,
    units: str,
    bits: int | Literal["no-rounding"],
    window: WindowKind = "instant",
    standard_name: str | None = None,
    comment: str | None = None,
    cell_methods: str | None = None,
    kelvin_to_celsius: bool = False,
) -> GfsDataVar:
    step_type: Literal["instant", "accum", "avg", "max", "min"] = {
        "instant": "instant",
        "acc": "avg",
        "ave": "avg",
        "max": "max",
        "min": "min",
    }[window]  # type: ignore[assignment]
    return GfsDataVar(
        name=name,
        encoding=Encoding(dtype="float32", fill_value=float("nan"), chunks=CHUNKS, shards=SHARDS),
        attrs=DataVarAttrs(
            long_name=long_name,
            short_name=short_name,
            units=units,
            step_type=step_type,
            standard_name=standard_name,
            comment=comment,
            cell_methods=cell_methods,
        ),
        internal_attrs=GfsInternalAttrs(
            grib_element=element,
            grib_level=level,
            window=window,
            keep_mantissa_bits=bits,
            deaccumulate_to_rate=window == "acc",
            deaccumulate_average=window == "ave",
            window_reset_frequency=pd.Timedelta(hours=WINDOW_RESET_HOURS) if window != "instant" else None,
            kelvin_to_celsius=kelvin_to_celsius,
        ),
    )


LAST_STEP = "Average over the interval from the previous lead time to this one."
SINCE_RESET = "Extreme since the last 6-hourly window restart, as GFS publishes it."

DATA_VARS: tuple[GfsDataVar, ...] = (
    _var(
        "temperature_2m",
        "TMP",
        "2 m above ground",
        long_name="2 metre temperature",
        short_name="t2m",
        units="degC",
        bits=7,
        standard_name="air_temperature",
        kelvin_to_celsius=True,
    ),
    _var(
        "relative_humidity_2m",
        "RH",
        "2 m above ground",
        long_name="2 metre relative humidity",
        short_name="r2",
        units="%",
        bits=7,
        standard_name="relative_humidity",
    ),
    _var(
        "maximum_temperature_2m",
        "TMAX",
        "2 m above ground",
        long_name="Maximum temperature",
        short_name="tmax",
        units="degC",
        bits=7,
        window="max",
        kelvin_to_celsius=True,
        cell_methods="time: maximum (interval: since the last 6-hourly window restart)",
        comment=SINCE_RESET,
    ),
    _var(
        "minimum_temperature_2m",
        "TMIN",
        "2 m above ground",
        long_name="Minimum temperature",
        short_name="tmin",
        units="degC",
        bits=7,
        window="min",
        kelvin_to_celsius=True,
        cell_methods="time: minimum (interval: since the last 6-hourly window restart)",
        comment=SINCE_RESET,
    ),
    _var(
        "wind_u_10m",
        "UGRD",
        "10 m above ground",
        long_name="10 metre U wind component",
        short_name="u10",
        units="m s-1",
        bits=6,
        standard_name="eastward_wind",
    ),
    _var(
        "wind_v_10m",
        "VGRD",
        "10 m above ground",
        long_name="10 metre V wind component",
        short_name="v10",
        units="m s-1",
        bits=6,
        standard_name="northward_wind",
    ),
    _var(
        "wind_u_100m",
        "UGRD",
        "100 m above ground",
        long_name="100 metre U wind component",
        short_name="u100",
        units="m s-1",
        bits=6,
        standard_name="eastward_wind",
    ),
    _var(
        "wind_v_100m",
        "VGRD",
        "100 m above ground",
        long_name="100 metre V wind component",
        short_name="v100",
        units="m s-1",
        bits=6,
        standard_name="northward_wind",
    ),
    _var(
        "pressure_surface",
        "PRES",
        "surface",
        long_name="Surface pressure",
        short_name="sp",
        units="Pa",
        bits=10,
        standard_name="surface_air_pressure",
    ),
    _var(
        "pressure_reduced_to_mean_sea_level",
        "PRMSL",
        "mean sea level",
        long_name="Pressure reduced to MSL",
        short_name="prmsl",
        units="Pa",
        bits=10,
        standard_name="air_pressure_at_mean_sea_level",
    ),
    _var(
        "precipitation_surface",
        "APCP",
        "surface",
        long_name="Precipitation rate",
        short_name="tp",
        units="kg m-2 s-1",
        bits=7,
        window="acc",
        standard_name="precipitation_flux",
        comment="Average precipitation rate since the previous lead time, from GFS accumulations.",
    ),
    _var(
        "categorical_snow_surface",
        "CSNOW",
        "surface",
        long_name="Categorical snow",
        short_name="csnow",
        units="0=no; 1=yes",
        bits="no-rounding",
    ),
    _var(
        "categorical_ice_pellets_surface",
        "CICEP",
        "surface",
        long_name="Categorical ice pellets",
        short_name="cicep",
        units="0=no; 1=yes",
        bits="no-rounding",
    ),
    _var(
        "categorical_freezing_rain_surface",
        "CFRZR",
        "surface",
        long_name="Categorical freezing rain",
        short_name="cfrzr",
        units="0=no; 1=yes",
        bits="no-rounding",
    ),
    _var(
        "categorical_rain_surface",
        "CRAIN",
        "surface",
        long_name="Categorical rain",
        short_name="crain",
        units="0=no; 1=yes",
        bits="no-rounding",
    ),
    _var(
        "percent_frozen_precipitation_surface",
        "CPOFP",
        "surface",
        long_name="Percent frozen precipitation",
        short_name="cpofp",
        units="%",
        bits=7,
    ),
    _var(
        "precipitable_water_atmosphere",
        "PWAT",
        "entire atmosphere (considered as a single layer)",
        long_name="Precipitable water",
        short_name="pwat",
        units="kg m-2",
        bits=7,
        standard_name="atmosphere_mass_content_of_water_vapor",
    ),
    _var(
        "total_cloud_cover_atmosphere",
        "TCDC",
        "entire atmosphere",
        long_name="Total cloud cover",
        short_name="tcc",
        units="%",
        bits=7,
        standard_name="cloud_area_fraction",
    ),
    _var(
        "geopotential_height_cloud_ceiling",
        "HGT",
        "cloud ceiling",
        long_name="Geopotential height of cloud ceiling",
        short_name="gh",
        units="gpm",
        bits=8,
        standard_name="geopotential_height",
    ),
    _var(
        "downward_short_wave_radiation_flux_surface",
        "DSWRF",
        "surface",
        long_name="Surface downward short-wave radiation flux",
        short_name="sdswrf",
        units="W m-2",
        bits=7,
        window="ave",
        standard_name="surface_downwelling_shortwave_flux_in_air",
        comment=LAST_STEP,
    ),
    _var(
        "downward_long_wave_radiation_flux_surface",
        "DLWRF",
        "surface",
        long_name="Surface downward long-wave radiation flux",
        short_name="sdlwrf",
        units="W m-2",
        bits=7,
        window="ave",
        standard_name="surface_downwelling_longwave_flux_in_air",
        comment=LAST_STEP,
    ),
)

_TIME_UNITS = "seconds since 1970-01-01 00:00:00"
_TIME = Encoding(dtype="int64", fill_value=0, chunks=(100_000,), units=_TIME_UNITS, calendar="proleptic_gregorian")
_DURATION = Encoding(dtype="int64", fill_value=-1, chunks=(100_000,), units="seconds")
SPATIAL_REF_WKT = (
    'GEOGCS["GFS sphere",DATUM["unknown",SPHEROID["Sphere",6371229,0]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]]'
)


class GfsForecastTemplateConfig(TemplateConfig[GfsDataVar]):
    def dimension_coordinates(self) -> dict[str, Any]:
        return {
            "lead_time": pd.to_timedelta(LEAD_HOURS, unit="h"),
            "latitude": np.linspace(90.0, -90.0, 721),
            "longitude": np.arange(-180.0, 180.0, 0.25),
        }

    def derive_coordinates(self, ds: xr.Dataset) -> dict[str, Any]:
        init = ds["init_time"].values
        lead = ds["lead_time"].values
        return {
            "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :]),
            "expected_forecast_length": (
                ("init_time",),
                np.full(len(init), EXPECTED_FORECAST_LENGTH.to_timedelta64(), dtype="timedelta64[ns]"),
            ),
            "ingested_forecast_length": (
                ("init_time",),
                np.full(len(init), np.timedelta64("NaT"), dtype="timedelta64[ns]"),
            ),
            "spatial_ref": ((), np.int64(0)),
        }


def gfs_forecast_template_config() -> GfsForecastTemplateConfig:
    return GfsForecastTemplateConfig(
        dims=DIMS,
        append_dim="init_time",
        append_dim_start="2021-05-01T00:00",
        append_dim_frequency="6h",
        template_append_length=4,
        dataset_attributes=DatasetAttributes(
            dataset_id="noaa-gfs-forecast",
            dataset_version="0.2.0",
            name="NOAA GFS forecast",
            description="Weather forecasts from the Global Forecast System (GFS) operated by NOAA NWS NCEP.",
            attribution="NOAA NWS NCEP GFS data processed by reformatters.",
            spatial_domain="Global",
            spatial_resolution="0.25 degrees (~20km)",
            time_domain="Forecasts initialized 2021-05-01 00:00 UTC to present",
            time_resolution="Forecasts initialized every 6 hours",
            forecast_domain="Forecast lead time 0-384 hours (0-16 days) ahead",
            forecast_resolution="Forecast step 0-120 hours: hourly, 123-384 hours: 3 hourly",
        ),
        coords=(
            Coordinate(
                name="init_time", encoding=_TIME, attrs=CoordinateAttrs(long_name="Forecast initialization time")
            ),
            Coordinate(
                name="lead_time",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(209,), units="seconds"),
                attrs=CoordinateAttrs(long_name="Forecast lead time"),
            ),
            *latitude_longitude_coords(721, 1440),
            Coordinate(
                name="valid_time",
                encoding=Encoding(
                    dtype="int64", fill_value=0, chunks=(2_000, 209), units=_TIME_UNITS, calendar="proleptic_gregorian"
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
                encoding=_DURATION,
                attrs=CoordinateAttrs(
                    long_name="Ingested forecast length", comment="The longest lead time processed for this init time."
                ),
            ),
            latitude_longitude_spatial_ref(SPATIAL_REF_WKT, "GFS uses a sphere with radius 6371229 m."),
        ),
        data_vars=DATA_VARS,
    )
