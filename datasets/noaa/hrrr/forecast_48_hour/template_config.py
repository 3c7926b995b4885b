"""NOAA HRRR 48-hour forecast, 3 km CONUS: structure of the `noaa-hrrr-forecast-48-hour` dataset."""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyproj
import xarray as xr

from reformatters.common.config_models import (
    BaseInternalAttrs,
    Coordinate,
    CoordinateAttrs,
    DatasetAttributes,
    DataVar,
    DataVarAttrs,
    Encoding,
)
from reformatters.sources.grib_decode import LambertConformalGridSpec
from reformatters.template_config import TemplateConfig

DIMS = ("init_time", "lead_time", "y", "x")
CHUNKS = (1, 49, 265, 300)
SHARDS = (1, 49, 1060, 1800)
LEAD_HOURS = np.arange(0, 49)
APPEND_DIM_START = pd.Timestamp("2018-07-13T12:00")
APPEND_DIM_FREQUENCY = pd.Timedelta(hours=6)
# HRRR v4 (operational from the 12z run of 2020-12-02) runs the 00/06/12/18z forecasts to 48 h; HRRR v3 before it
# ran them to 36 h, so those runs have no files past f36.
HRRR_V4_START = pd.Timestamp("2020-12-02T12:00")
FORECAST_LENGTH_V3 = pd.Timedelta(hours=36)
FORECAST_LENGTH_V4 = pd.Timedelta(hours=48)

# The grid as HRRR's GRIB2 files encode it (template 3.30): scanning from the south-west corner, rows northward.
GRID = LambertConformalGridSpec(
    ni=1799,
    nj=1059,
    latitude_of_first_grid_point=21.138123,
    longitude_of_first_grid_point=237.280472,
    lov=262.5,
    lad=38.5,
    latin1=38.5,
    latin2=38.5,
    dx_metres=3000.0,
    dy_metres=3000.0,
    earth_radius_metres=6371229.0,
)
CRS = pyproj.CRS.from_proj4(
    "+proj=lcc +lat_0=38.5 +lon_0=-97.5 +lat_1=38.5 +lat_2=38.5 +x_0=0 +y_0=0 +R=6371229 +units=m +no_defs"
)


def expected_forecast_length(init_times: npt.ArrayLike) -> npt.NDArray[np.timedelta64]:
    """The last lead each init's run produces: 36 h before HRRR v4, 48 h from it on."""
    inits = pd.DatetimeIndex(np.asarray(init_times))
    lengths: npt.NDArray[np.timedelta64] = np.where(
        inits < HRRR_V4_START, FORECAST_LENGTH_V3.to_timedelta64(), FORECAST_LENGTH_V4.to_timedelta64()
    ).astype("timedelta64[ns]")
    return lengths


@functools.lru_cache(maxsize=1)
def projection_coordinates() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """x (west to east) and y (north to south) of the grid's points, in metres of the Lambert projection."""
    x0, y0 = pyproj.Proj(CRS)(GRID.longitude_of_first_grid_point, GRID.latitude_of_first_grid_point)
    x = x0 + GRID.dx_metres * np.arange(GRID.ni)
    y = y0 + GRID.dy_metres * np.arange(GRID.nj)[::-1]  # published north first: rows flipped on read
    return x, y


@functools.lru_cache(maxsize=1)
def latitude_longitude() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(y, x) latitudes and longitudes (degrees east, -180..180) of the published grid, from pyproj."""
    x, y = projection_coordinates()
    xx, yy = np.meshgrid(x, y)
    longitude, latitude = pyproj.Proj(CRS)(xx, yy, inverse=True)
    return np.asarray(latitude), np.asarray(longitude)


WindowKind = Literal["instant", "acc"]


class HrrrInternalAttrs(BaseInternalAttrs):
    grib_element: str
    grib_level: str
    window: WindowKind = "instant"
    kelvin_to_celsius: bool = False


HrrrDataVar = DataVar[HrrrInternalAttrs]


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
    kelvin_to_celsius: bool = False,
) -> HrrrDataVar:
    return HrrrDataVar(
        name=name,
        encoding=Encoding(dtype="float32", fill_value=float("nan"), chunks=CHUNKS, shards=SHARDS),
        attrs=DataVarAttrs(
            long_name=long_name,
            short_name=short_name,
            units=units,
            step_type="avg" if window == "acc" else "instant",
            standard_name=standard_name,
            comment=comment,
            grid_mapping="spatial_ref",
        ),
        internal_attrs=HrrrInternalAttrs(
            grib_element=element,
            grib_level=level,
            window=window,
            keep_mantissa_bits=bits,
            deaccumulate_to_rate=window == "acc",
            kelvin_to_celsius=kelvin_to_celsius,
        ),
    )


GRID_RELATIVE = "HRRR winds are relative to the grid: along x and y of the Lambert projection, not east and north."

DATA_VARS: tuple[HrrrDataVar, ...] = (
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
        "wind_u_10m",
        "UGRD",
        "10 m above ground",
        long_name="10 metre U wind component",
        short_name="u10",
        units="m s-1",
        bits=6,
        standard_name="x_wind",
        comment=GRID_RELATIVE,
    ),
    _var(
        "wind_v_10m",
        "VGRD",
        "10 m above ground",
        long_name="10 metre V wind component",
        short_name="v10",
        units="m s-1",
        bits=6,
        standard_name="y_wind",
        comment=GRID_RELATIVE,
    ),
    _var(
        "wind_u_80m",
        "UGRD",
        "80 m above ground",
        long_name="80 metre U wind component",
        short_name="u80",
        units="m s-1",
        bits=6,
        standard_name="x_wind",
        comment=GRID_RELATIVE,
    ),
    _var(
        "wind_v_80m",
        "VGRD",
        "80 m above ground",
        long_name="80 metre V wind component",
        short_name="v80",
        units="m s-1",
        bits=6,
        standard_name="y_wind",
        comment=GRID_RELATIVE,
    ),
    _var(
        "wind_gust_surface",
        "GUST",
        "surface",
        long_name="Wind speed (gust)",
        short_name="gust",
        units="m s-1",
        bits=6,
        standard_name="wind_speed_of_gust",
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
        "precipitation_surface",
        "APCP",
        "surface",
        long_name="Precipitation rate",
        short_name="tp",
        units="kg m-2 s-1",
        bits=7,
        window="acc",
        standard_name="precipitation_flux",
        comment="Average precipitation rate since the previous lead time, from HRRR's hourly accumulation.",
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
        "snow_depth_surface",
        "SNOD",
        "surface",
        long_name="Snow depth",
        short_name="sde",
        units="m",
        bits=9,
        standard_name="surface_snow_thickness",
    ),
    _var(
        "downward_short_wave_radiation_flux_surface",
        "DSWRF",
        "surface",
        long_name="Surface downward short-wave radiation flux",
        short_name="sdswrf",
        units="W m-2",
        bits=7,
        standard_name="surface_downwelling_shortwave_flux_in_air",
        comment="Instantaneous, as HRRR publishes it.",
    ),
    _var(
        "downward_long_wave_radiation_flux_surface",
        "DLWRF",
        "surface",
        long_name="Surface downward long-wave radiation flux",
        short_name="sdlwrf",
        units="W m-2",
        bits=7,
        standard_name="surface_downwelling_longwave_flux_in_air",
        comment="Instantaneous, as HRRR publishes it.",
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
        comment="NaN where the sky has no ceiling (missing in HRRR's bitmap).",
    ),
    _var(
        "composite_reflectivity",
        "REFC",
        "entire atmosphere",
        long_name="Composite reflectivity",
        short_name="refc",
        units="dBZ",
        bits=7,
        comment="Maximum simulated radar reflectivity in the column.",
    ),
    _var(
        "visibility_surface",
        "VIS",
        "surface",
        long_name="Visibility",
        short_name="vis",
        units="m",
        bits=7,
        standard_name="visibility_in_air",
    ),
    _var(
        "vertically_integrated_liquid_hydrometeor",
        # wgrib2 has no short name for this NCEP-local parameter (discipline 0, category 16, number 201).
        "var discipline=0 center=7 local_table=1 parmcat=16 parm=201",
        "entire atmosphere",
        long_name="Hydrometeor-based vertically integrated liquid",
        short_name="hvil",
        units="kg m-2",
        bits=7,
        comment="GRIB2 discipline 0, category 16, parameter 201 of NCEP's local table 1; "
        "HRRR's inventory lists it without a short name.",
    ),
)

_TIME_UNITS = "seconds since 1970-01-01 00:00:00"
_TIME = Encoding(dtype="int64", fill_value=0, chunks=(100_000,), units=_TIME_UNITS, calendar="proleptic_gregorian")
_DURATION = Encoding(dtype="int64", fill_value=-1, chunks=(100_000,), units="seconds")
_GRID_2D = Encoding(dtype="float32", fill_value=float("nan"), chunks=(GRID.nj, GRID.ni))


class HrrrForecast48HourTemplateConfig(TemplateConfig[HrrrDataVar]):
    def dimension_coordinates(self) -> dict[str, Any]:
        x, y = projection_coordinates()
        return {"lead_time": pd.to_timedelta(LEAD_HOURS, unit="h"), "y": y, "x": x}

    def derive_coordinates(self, ds: xr.Dataset) -> dict[str, Any]:
        init = ds["init_time"].values
        lead = ds["lead_time"].values
        latitude, longitude = latitude_longitude()
        return {
            "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :]),
            "expected_forecast_length": (("init_time",), expected_forecast_length(init)),
            "ingested_forecast_length": (
                ("init_time",),
                np.full(len(init), np.timedelta64("NaT"), dtype="timedelta64[ns]"),
            ),
            "latitude": (("y", "x"), latitude),
            "longitude": (("y", "x"), longitude),
            "spatial_ref": ((), np.int64(0)),
        }


def _spatial_ref_attrs() -> CoordinateAttrs:
    wkt = CRS.to_wkt()
    return CoordinateAttrs(
        crs_wkt=wkt,
        spatial_ref=wkt,
        grid_mapping_name="lambert_conformal_conic",
        standard_parallel=(GRID.latin1, GRID.latin2),
        longitude_of_central_meridian=GRID.lov - 360.0,
        latitude_of_projection_origin=GRID.lad,
        false_easting=0.0,
        false_northing=0.0,
        earth_radius=GRID.earth_radius_metres,
        comment="HRRR's Lambert conformal conic projection on a sphere of radius 6371229 m.",
    )


def hrrr_forecast_48_hour_template_config() -> HrrrForecast48HourTemplateConfig:
    return HrrrForecast48HourTemplateConfig(
        dims=DIMS,
        append_dim="init_time",
        append_dim_start=APPEND_DIM_START,
        append_dim_frequency=APPEND_DIM_FREQUENCY,
        template_append_length=4,
        dataset_attributes=DatasetAttributes(
            dataset_id="noaa-hrrr-forecast-48-hour",
            dataset_version="0.1.0",
            name="NOAA HRRR forecast, 48 hour",
            description="Weather forecasts from the High-Resolution Rapid Refresh (HRRR) model operated by "
            "NOAA NWS NCEP.",
            attribution="NOAA NWS NCEP HRRR data processed by reformatters.",
            spatial_domain="Continental United States",
            spatial_resolution="3km",
            time_domain="Forecasts initialized 2018-07-13 12:00 UTC to present",
            time_resolution="Forecasts initialized every 6 hours (the 00, 06, 12 and 18 UTC runs)",
            forecast_domain="Forecast lead time 0-48 hours ahead (0-36 hours for runs before 2020-12-02 12 UTC)",
            forecast_resolution="Hourly",
        ),
        coords=(
            Coordinate(
                name="init_time", encoding=_TIME, attrs=CoordinateAttrs(long_name="Forecast initialization time")
            ),
            Coordinate(
                name="lead_time",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(len(LEAD_HOURS),), units="seconds"),
                attrs=CoordinateAttrs(long_name="Forecast lead time"),
            ),
            Coordinate(
                name="y",
                encoding=Encoding(dtype="float64", fill_value=float("nan"), chunks=(GRID.nj,)),
                attrs=CoordinateAttrs(
                    units="m", standard_name="projection_y_coordinate", long_name="y coordinate of projection", axis="Y"
                ),
            ),
            Coordinate(
                name="x",
                encoding=Encoding(dtype="float64", fill_value=float("nan"), chunks=(GRID.ni,)),
                attrs=CoordinateAttrs(
                    units="m", standard_name="projection_x_coordinate", long_name="x coordinate of projection", axis="X"
                ),
            ),
            Coordinate(
                name="latitude",
                encoding=_GRID_2D,
                attrs=CoordinateAttrs(units="degrees_north", standard_name="latitude", long_name="Latitude"),
            ),
            Coordinate(
                name="longitude",
                encoding=_GRID_2D,
                attrs=CoordinateAttrs(units="degrees_east", standard_name="longitude", long_name="Longitude"),
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
                attrs=CoordinateAttrs(
                    long_name="Expected forecast length",
                    comment="The last lead time the run of this init time produces (36 h before HRRR v4).",
                ),
            ),
            Coordinate(
                name="ingested_forecast_length",
                encoding=_DURATION,
                attrs=CoordinateAttrs(
                    long_name="Ingested forecast length", comment="The longest lead time processed for this init time."
                ),
            ),
            Coordinate(
                name="spatial_ref",
                encoding=Encoding(dtype="int64", fill_value=0, chunks=()),
                attrs=_spatial_ref_attrs(),
            ),
        ),
        data_vars=DATA_VARS,
    )
