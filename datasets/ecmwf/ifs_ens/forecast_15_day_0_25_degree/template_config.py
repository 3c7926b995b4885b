"""ECMWF IFS ENS 15-day forecast, 0.25 degree: structure of `ecmwf-ifs-ens-forecast-15-day-0-25-degree`."""

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

DATASET_ID = "ecmwf-ifs-ens-forecast-15-day-0-25-degree"
DIMS = ("init_time", "lead_time", "ensemble_member", "latitude", "longitude")
ENSEMBLE_MEMBERS = tuple(range(51))  # 0 is the control, 1-50 the perturbed members
CHUNKS = (1, 85, 51, 32, 32)
SHARDS = (1, 85, 51, 320, 320)
RESOLUTION = 0.25
# 00z runs: every 3 h to 144 h, then every 6 h to 360 h.
LEAD_HOURS = np.concatenate([np.arange(0, 145, 3), np.arange(150, 361, 6)])
EXPECTED_FORECAST_LENGTH = pd.Timedelta(hours=360)
# The first 00z run on the 0.25 degree open-data grid (IFS cycle 48r1 raised open data from 0.4 degrees).
APPEND_DIM_START = "2024-02-01T00:00"
# IFS cycle 50r1 (ECMWF's planned implementation day, 12 May 2026): from this init the control is no longer in the
# ensemble files (`enfo`/`ef`, type cf) but is the deterministic forecast (`oper`/`fc`).
CONTROL_IN_OPER_FROM = pd.Timestamp("2026-05-12T00:00")

Kind = Literal["instant", "accumulated"]


class EcmwfInternalAttrs(BaseInternalAttrs):
    param: str  # ECMWF short name in the `.index`
    levtype: str = "sfc"
    levelist: str | None = None
    kind: Kind = "instant"
    kelvin_to_celsius: bool = False
    # Multiplies the decoded values (tp: metres of water to kg m-2).
    scale: float = 1.0


EcmwfDataVar = DataVar[EcmwfInternalAttrs]

RATE = (
    "Average precipitation rate since the previous lead time, from ECMWF's total precipitation accumulated since "
    "the start of the forecast (metres of water, 1 m = 1000 kg m-2)."
)
FLUX = (
    "Average flux since the previous lead time, from ECMWF's radiation accumulated since the start of the forecast "
    "(J m-2)."
)
MEMBER_0 = (
    "Member 0 (the control) comes from the ensemble files before IFS cycle 50r1 (inits before 2026-05-12) and from "
    "the deterministic forecast, which is the control from then on; a lead the deterministic files do not hold is NaN "
    "for member 0."
)


def _var(
    name: str,
    param: str,
    *,
    long_name: str,
    short_name: str,
    units: str,
    bits: int,
    chunks: tuple[int, ...],
    shards: tuple[int, ...],
    kind: Kind = "instant",
    standard_name: str | None = None,
    comment: str | None = None,
    kelvin_to_celsius: bool = False,
    scale: float = 1.0,
) -> EcmwfDataVar:
    accumulated = kind == "accumulated"
    return EcmwfDataVar(
        name=name,
        encoding=Encoding(dtype="float32", fill_value=float("nan"), chunks=chunks, shards=shards),
        attrs=DataVarAttrs(
            long_name=long_name,
            short_name=short_name,
            units=units,
            step_type="avg" if accumulated else "instant",
            standard_name=standard_name,
            comment=" ".join(c for c in (comment, MEMBER_0) if c),
            cell_methods="time: mean (interval: from the previous lead time)" if accumulated else None,
        ),
        internal_attrs=EcmwfInternalAttrs(
            param=param,
            kind=kind,
            keep_mantissa_bits=bits,
            deaccumulate_to_rate=accumulated,
            kelvin_to_celsius=kelvin_to_celsius,
            scale=scale,
        ),
    )


def data_vars(chunks: tuple[int, ...] = CHUNKS, shards: tuple[int, ...] = SHARDS) -> tuple[EcmwfDataVar, ...]:
    """The dataset's variables; named as in `noaa-gfs-forecast` and `noaa-gefs-forecast-35-day` where the quantity
    is the same."""
    enc: dict[str, Any] = {"chunks": chunks, "shards": shards}
    return (
        _var(
            "temperature_2m",
            "2t",
            long_name="2 metre temperature",
            short_name="t2m",
            units="degC",
            bits=7,
            standard_name="air_temperature",
            kelvin_to_celsius=True,
            **enc,
        ),
        _var(
            "dew_point_temperature_2m",
            "2d",
            long_name="2 metre dewpoint temperature",
            short_name="d2m",
            units="degC",
            bits=7,
            standard_name="dew_point_temperature",
            kelvin_to_celsius=True,
            **enc,
        ),
        _var(
            "wind_u_10m",
            "10u",
            long_name="10 metre U wind component",
            short_name="u10",
            units="m s-1",
            bits=6,
            standard_name="eastward_wind",
            **enc,
        ),
        _var(
            "wind_v_10m",
            "10v",
            long_name="10 metre V wind component",
            short_name="v10",
            units="m s-1",
            bits=6,
            standard_name="northward_wind",
            **enc,
        ),
        _var(
            "wind_u_100m",
            "100u",
            long_name="100 metre U wind component",
            short_name="u100",
            units="m s-1",
            bits=6,
            standard_name="eastward_wind",
            **enc,
        ),
        _var(
            "wind_v_100m",
            "100v",
            long_name="100 metre V wind component",
            short_name="v100",
            units="m s-1",
            bits=6,
            standard_name="northward_wind",
            **enc,
        ),
        _var(
            "pressure_reduced_to_mean_sea_level",
            "msl",
            long_name="Mean sea level pressure",
            short_name="msl",
            units="Pa",
            bits=10,
            standard_name="air_pressure_at_mean_sea_level",
            **enc,
        ),
        _var(
            "precipitation_surface",
            "tp",
            long_name="Precipitation rate",
            short_name="tp",
            units="kg m-2 s-1",
            bits=7,
            kind="accumulated",
            standard_name="precipitation_flux",
            comment=RATE,
            scale=1000.0,
            **enc,
        ),
        _var(
            "total_cloud_cover_atmosphere",
            "tcc",
            long_name="Total cloud cover",
            short_name="tcc",
            units="%",
            bits=7,
            standard_name="cloud_area_fraction",
            **enc,
        ),
        _var(
            "downward_short_wave_radiation_flux_surface",
            "ssrd",
            long_name="Surface downward short-wave radiation flux",
            short_name="sdswrf",
            units="W m-2",
            bits=7,
            kind="accumulated",
            standard_name="surface_downwelling_shortwave_flux_in_air",
            comment=FLUX,
            **enc,
        ),
        _var(
            "downward_long_wave_radiation_flux_surface",
            "strd",
            long_name="Surface downward long-wave radiation flux",
            short_name="sdlwrf",
            units="W m-2",
            bits=7,
            kind="accumulated",
            standard_name="surface_downwelling_longwave_flux_in_air",
            comment=FLUX,
            **enc,
        ),
    )


_TIME_UNITS = "seconds since 1970-01-01 00:00:00"
_TIME = Encoding(dtype="int64", fill_value=0, chunks=(100_000,), units=_TIME_UNITS, calendar="proleptic_gregorian")
_DURATION = Encoding(dtype="int64", fill_value=-1, chunks=(100_000,), units="seconds")
SPATIAL_REF_WKT = (
    'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]]'
)


class EcmwfIfsEnsTemplateConfig(TemplateConfig[EcmwfDataVar]):
    """`ensemble_members` and `resolution` are the published dataset's by default; a smaller variant (fewer members,
    a coarser grid) keeps the same code paths at a size tests can hold, its template under `variant_templates_dir`."""

    ensemble_members: tuple[int, ...] = ENSEMBLE_MEMBERS
    resolution: float = Field(RESOLUTION, gt=0)
    variant_templates_dir: Path | None = None

    @property
    def templates_dir(self) -> Path:
        return self.variant_templates_dir or super().templates_dir

    def update_template(self, templates_dir: Path | None = None) -> Path:
        return super().update_template(templates_dir or self.variant_templates_dir)

    def dimension_coordinates(self) -> dict[str, Any]:
        return {
            "lead_time": pd.to_timedelta(LEAD_HOURS, unit="h"),
            "ensemble_member": np.asarray(self.ensemble_members, dtype=np.int64),
            "latitude": np.linspace(90.0, -90.0, round(180 / self.resolution) + 1),
            "longitude": -180.0 + np.arange(round(360 / self.resolution)) * self.resolution,
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
                ("init_time", "ensemble_member"),
                np.full((len(init), ds.sizes["ensemble_member"]), np.timedelta64("NaT"), dtype="timedelta64[ns]"),
            ),
            "spatial_ref": ((), np.int64(0)),
        }


def ecmwf_ifs_ens_template_config(
    *,
    ensemble_members: tuple[int, ...] = ENSEMBLE_MEMBERS,
    resolution: float = RESOLUTION,
    chunks: tuple[int, ...] = CHUNKS,
    shards: tuple[int, ...] = SHARDS,
    templates_dir: Path | None = None,
    append_dim_start: str = APPEND_DIM_START,
) -> EcmwfIfsEnsTemplateConfig:
    n_members = len(ensemble_members)
    n_lat, n_lon = round(180 / resolution) + 1, round(360 / resolution)
    return EcmwfIfsEnsTemplateConfig(
        dims=DIMS,
        append_dim="init_time",
        append_dim_start=append_dim_start,
        append_dim_frequency="1D",
        template_append_length=2,
        ensemble_members=ensemble_members,
        resolution=resolution,
        variant_templates_dir=templates_dir,
        dataset_attributes=DatasetAttributes(
            dataset_id=DATASET_ID,
            dataset_version="0.1.0",
            name="ECMWF IFS ENS forecast, 15 day, 0.25 degree",
            description="Ensemble weather forecasts from the ECMWF Integrated Forecasting System (IFS ENS), "
            "51 members, from ECMWF's open data.",
            attribution="ECMWF IFS ENS open data (CC BY 4.0) processed by reformatters.",
            spatial_domain="Global",
            spatial_resolution="0.25 degrees (~20km)",
            time_domain=f"Forecasts initialized {APPEND_DIM_START.replace('T', ' ')} UTC to present",
            time_resolution="Forecasts initialized every 24 hours (00z)",
            forecast_domain="Forecast lead time 0-360 hours (0-15 days) ahead",
            forecast_resolution="Forecast step 0-144 hours: 3 hourly, 150-360 hours: 6 hourly",
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
                name="ensemble_member",
                encoding=Encoding(dtype="int64", fill_value=-1, chunks=(n_members,)),
                attrs=CoordinateAttrs(
                    long_name="Ensemble member",
                    comment="0 is the control, 1-50 the perturbed members. " + MEMBER_0,
                ),
            ),
            *latitude_longitude_coords(n_lat, n_lon),
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
                    comment="The longest lead time processed for this init time and ensemble member (member 0 from "
                    "50r1 on comes from other files than members 1-50, and may arrive later).",
                ),
            ),
            latitude_longitude_spatial_ref(
                SPATIAL_REF_WKT,
                "ECMWF open data is on a regular latitude-longitude grid (WGS 84 degrees as published).",
            ),
        ),
        data_vars=data_vars(chunks, shards),
    )
