"""Generate NOAA-layout GRIB2 archives (real GRIB2 encoded with ecCodes, wgrib2-style `.idx` beside each file).

Field values are deterministic (analytic shapes + seeded noise), so tests can ask `expected_values` for the exact
numbers that were packed. Archives are cached outside the checkout, keyed by `GENERATOR_VERSION` + parameters, and
built in a temporary directory that is renamed into place, so concurrent test processes never see half an archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import eccodes
import numpy as np
from pydantic import BaseModel, ConfigDict

from reformatters.sources.grib_decode import GridSpec, LambertConformalGridSpec
from reformatters.sources.grib_index import instant_step, normalize_step, window_step

GENERATOR_VERSION = "3"
HRRR_GENERATOR_VERSION = "1"
CACHE_ENV_VAR = "REFORMATTERS_ARCHIVE_CACHE"

Kind = Literal["instant", "acc", "ave", "max", "min"]
PackingType = Literal["grid_complex_spatial_differencing", "grid_simple", "grid_ccsds", "grid_jpeg"]
_STAT_PROCESSING = {"acc": 1, "ave": 0, "max": 2, "min": 3}

GFS_LEAD_HOURS: tuple[int, ...] = tuple(range(0, 121)) + tuple(range(123, 385, 3))
FULL_GRID = GridSpec.global_regular(0.25)
COARSE_GRID = GridSpec.global_regular(1.0)

AnyGrid = GridSpec | LambertConformalGridSpec

# Counts messages encoded in this process (tests use it to prove a cached archive is not re-encoded).
ENCODE_COUNTER = {"messages": 0}


# --------------------------------------------------------------------------------------------------
# Variable catalogue


@dataclass(frozen=True)
class ArchiveVariable:
    name: str
    element: str
    level: str
    kind: Kind
    discipline: int
    category: int
    number: int
    level_type: int  # GRIB2 code table 4.5
    level_value: int | None = None
    # The file also holds a window-average message beside the instantaneous one (TCDC, CPOFP, categorical).
    also_average: bool = False
    # APCP: besides the 6-hourly-restart window, an accumulation from the initialisation time.
    also_from_init: bool = False
    bits_per_value: int = 10
    units: str = ""
    # GRIB2 local tables version; NCEP-local parameters that wgrib2 cannot name carry 1 (HRRR's `var ...` lines).
    local_table: int = 0

    @property
    def at_lead_0(self) -> bool:
        return self.kind == "instant"


def _v(
    name: str,
    element: str,
    level: str,
    kind: Kind,
    dcn: tuple[int, int, int],
    lt: int,
    lv: int | None = None,
    **kw: Any,
) -> ArchiveVariable:
    return ArchiveVariable(name, element, level, kind, *dcn, level_type=lt, level_value=lv, **kw)


GFS_ARCHIVE_VARIABLES: tuple[ArchiveVariable, ...] = (
    _v("temperature_2m", "TMP", "2 m above ground", "instant", (0, 0, 0), 103, 2, units="K"),
    _v("relative_humidity_2m", "RH", "2 m above ground", "instant", (0, 1, 1), 103, 2, units="%"),
    _v("maximum_temperature_2m", "TMAX", "2 m above ground", "max", (0, 0, 4), 103, 2, units="K"),
    _v("minimum_temperature_2m", "TMIN", "2 m above ground", "min", (0, 0, 5), 103, 2, units="K"),
    _v("wind_u_10m", "UGRD", "10 m above ground", "instant", (0, 2, 2), 103, 10, units="m s-1"),
    _v("wind_v_10m", "VGRD", "10 m above ground", "instant", (0, 2, 3), 103, 10, units="m s-1"),
    _v("wind_u_100m", "UGRD", "100 m above ground", "instant", (0, 2, 2), 103, 100, units="m s-1"),
    _v("wind_v_100m", "VGRD", "100 m above ground", "instant", (0, 2, 3), 103, 100, units="m s-1"),
    _v("pressure_surface", "PRES", "surface", "instant", (0, 3, 0), 1, bits_per_value=12, units="Pa"),
    _v(
        "pressure_reduced_to_mean_sea_level",
        "PRMSL",
        "mean sea level",
        "instant",
        (0, 3, 1),
        101,
        bits_per_value=12,
        units="Pa",
    ),
    _v(
        "precipitation_surface",
        "APCP",
        "surface",
        "acc",
        (0, 1, 8),
        1,
        also_from_init=True,
        bits_per_value=12,
        units="kg m-2",
    ),
    _v("categorical_snow_surface", "CSNOW", "surface", "instant", (0, 1, 195), 1, also_average=True, bits_per_value=1),
    _v(
        "categorical_ice_pellets_surface",
        "CICEP",
        "surface",
        "instant",
        (0, 1, 194),
        1,
        also_average=True,
        bits_per_value=1,
    ),
    _v(
        "categorical_freezing_rain_surface",
        "CFRZR",
        "surface",
        "instant",
        (0, 1, 193),
        1,
        also_average=True,
        bits_per_value=1,
    ),
    _v("categorical_rain_surface", "CRAIN", "surface", "instant", (0, 1, 192), 1, also_average=True, bits_per_value=1),
    _v(
        "percent_frozen_precipitation_surface",
        "CPOFP",
        "surface",
        "instant",
        (0, 1, 39),
        1,
        also_average=True,
        units="%",
    ),
    _v(
        "precipitable_water_atmosphere",
        "PWAT",
        "entire atmosphere (considered as a single layer)",
        "instant",
        (0, 1, 3),
        200,
        units="kg m-2",
    ),
    _v(
        "total_cloud_cover_atmosphere",
        "TCDC",
        "entire atmosphere",
        "instant",
        (0, 6, 1),
        10,
        also_average=True,
        units="%",
    ),
    _v("geopotential_height_cloud_ceiling", "HGT", "cloud ceiling", "instant", (0, 3, 5), 215, units="gpm"),
    _v("downward_short_wave_radiation_flux_surface", "DSWRF", "surface", "ave", (0, 4, 192), 1, units="W m-2"),
    _v("downward_long_wave_radiation_flux_surface", "DLWRF", "surface", "ave", (0, 5, 192), 1, units="W m-2"),
)
_BY_NAME = {v.name: v for v in GFS_ARCHIVE_VARIABLES}

# Index lines used for filler messages (pressure-level fields a job does not ask for).
_FILLER_ELEMENTS = ("TMP", "HGT", "RH", "UGRD", "VGRD", "VVEL", "ABSV", "CLMR")
_FILLER_LEVELS = (1000, 925, 850, 700, 500, 400, 300, 250, 200, 100, 50, 10)


def get_variable(variable: str | ArchiveVariable) -> ArchiveVariable:
    if isinstance(variable, ArchiveVariable):
        return variable
    try:
        return _BY_NAME[variable]
    except KeyError:
        raise KeyError(f"unknown archive variable {variable!r}; known: {sorted(_BY_NAME)}") from None


# HRRR CONUS `wrfsfc` files: every field instantaneous but precipitation, which each file holds both from the
# initialisation time (`0-N hour acc fcst`) and over the last hour (`N-1-N hour acc fcst`; at f01 the two coincide
# and both lines are listed); lead 0 holds a `0-0 day acc fcst` accumulation of zeros.
HRRR_LEAD_HOURS: tuple[int, ...] = tuple(range(0, 49))
HRRR_GRID = LambertConformalGridSpec(
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
HRRR_UNNAMED_ELEMENT = "var discipline=0 center=7 local_table=1 parmcat=16 parm=201"

HRRR_ARCHIVE_VARIABLES: tuple[ArchiveVariable, ...] = (
    _v("composite_reflectivity", "REFC", "entire atmosphere", "instant", (0, 16, 196), 10, units="dB"),
    _v(
        "vertically_integrated_liquid_hydrometeor",
        HRRR_UNNAMED_ELEMENT,
        "entire atmosphere",
        "instant",
        (0, 16, 201),
        10,
        local_table=1,
        units="kg m-2",
    ),
    _v("visibility_surface", "VIS", "surface", "instant", (0, 19, 0), 1, bits_per_value=14, units="m"),
    _v("wind_gust_surface", "GUST", "surface", "instant", (0, 2, 22), 1, units="m s-1"),
    _v("wind_u_80m", "UGRD", "80 m above ground", "instant", (0, 2, 2), 103, 80, units="m s-1"),
    _v("wind_v_80m", "VGRD", "80 m above ground", "instant", (0, 2, 3), 103, 80, units="m s-1"),
    _v("pressure_surface", "PRES", "surface", "instant", (0, 3, 0), 1, bits_per_value=12, units="Pa"),
    _v("snow_depth_surface", "SNOD", "surface", "instant", (0, 1, 11), 1, bits_per_value=12, units="m"),
    _v("temperature_2m", "TMP", "2 m above ground", "instant", (0, 0, 0), 103, 2, units="K"),
    _v("relative_humidity_2m", "RH", "2 m above ground", "instant", (0, 1, 1), 103, 2, units="%"),
    _v("wind_u_10m", "UGRD", "10 m above ground", "instant", (0, 2, 2), 103, 10, units="m s-1"),
    _v("wind_v_10m", "VGRD", "10 m above ground", "instant", (0, 2, 3), 103, 10, units="m s-1"),
    _v("precipitation_surface", "APCP", "surface", "acc", (0, 1, 8), 1, bits_per_value=12, units="kg m-2"),
    _v("categorical_snow_surface", "CSNOW", "surface", "instant", (0, 1, 195), 1, bits_per_value=1),
    _v("categorical_ice_pellets_surface", "CICEP", "surface", "instant", (0, 1, 194), 1, bits_per_value=1),
    _v("categorical_freezing_rain_surface", "CFRZR", "surface", "instant", (0, 1, 193), 1, bits_per_value=1),
    _v("categorical_rain_surface", "CRAIN", "surface", "instant", (0, 1, 192), 1, bits_per_value=1),
    _v("total_cloud_cover_atmosphere", "TCDC", "entire atmosphere", "instant", (0, 6, 1), 10, units="%"),
    _v("geopotential_height_cloud_ceiling", "HGT", "cloud ceiling", "instant", (0, 3, 5), 215, units="gpm"),
    _v("downward_short_wave_radiation_flux_surface", "DSWRF", "surface", "instant", (0, 4, 192), 1, units="W m-2"),
    _v("downward_long_wave_radiation_flux_surface", "DLWRF", "surface", "instant", (0, 5, 192), 1, units="W m-2"),
)
_HRRR_BY_NAME = {v.name: v for v in HRRR_ARCHIVE_VARIABLES}


def get_hrrr_variable(variable: str | ArchiveVariable) -> ArchiveVariable:
    if isinstance(variable, ArchiveVariable):
        return variable
    try:
        return _HRRR_BY_NAME[variable]
    except KeyError:
        raise KeyError(f"unknown HRRR archive variable {variable!r}; known: {sorted(_HRRR_BY_NAME)}") from None


def gfs_window_start(lead_hours: int) -> int:
    """Start of the GFS statistical window ending at `lead_hours` (windows restart every 6 h)."""
    if lead_hours <= 0:
        raise ValueError(f"windowed fields have no lead-0 message (lead {lead_hours})")
    return lead_hours - ((lead_hours - 1) % 6 + 1)


@dataclass(frozen=True)
class MessageSpec:
    variable: ArchiveVariable
    kind: Kind  # of this message: "instant" or a window kind
    window: tuple[int, int] | None  # (start, end) hours for windows

    def step_text(self, lead_hours: int) -> str:
        if self.window is None:
            return instant_step(lead_hours)
        return window_step(self.window[0], self.window[1], self.kind)  # type: ignore[arg-type]

    def idx_fields(self, lead_hours: int) -> tuple[str, str, str]:
        return (self.variable.element, self.variable.level, self.step_text(lead_hours))


def messages_for_lead(variable: str | ArchiveVariable, lead_hours: int) -> list[MessageSpec]:
    """The messages a GFS file at `lead_hours` holds for `variable`, in file order."""
    v = get_variable(variable)
    if v.kind == "instant":
        out = [MessageSpec(v, "instant", None)]
        if v.also_average and lead_hours > 0:
            out.append(MessageSpec(v, "ave", (gfs_window_start(lead_hours), lead_hours)))
        return out
    if lead_hours == 0:
        return []
    w = gfs_window_start(lead_hours)
    out = [MessageSpec(v, v.kind, (w, lead_hours))]
    if v.also_from_init and w != 0:
        out.append(MessageSpec(v, v.kind, (0, lead_hours)))
    return out


def hrrr_messages_for_lead(variable: str | ArchiveVariable, lead_hours: int) -> list[MessageSpec]:
    """The messages an HRRR `wrfsfc` file at `lead_hours` holds for `variable`, in file order."""
    v = get_hrrr_variable(variable)
    if v.kind == "instant":
        return [MessageSpec(v, "instant", None)]
    if v.kind != "acc":
        raise ValueError(f"{v.name}: the HRRR catalogue has only instantaneous fields and accumulations")
    if lead_hours == 0:
        return [MessageSpec(v, "acc", (0, 0))]
    return [MessageSpec(v, "acc", (0, lead_hours)), MessageSpec(v, "acc", (lead_hours - 1, lead_hours))]


def hrrr_idx_fields(spec: MessageSpec, lead_hours: int) -> tuple[str, str, str]:
    """Inventory fields as wgrib2 writes them for HRRR (a zero-length window reads `0-0 day acc fcst`)."""
    element, level, step = spec.idx_fields(lead_hours)
    if spec.window == (0, 0):
        step = f"0-0 day {spec.kind} fcst"
    return element, level, step


def hrrr_expected_values(
    variable: str | ArchiveVariable,
    init_time: datetime,
    lead_hours: int,
    step: str | None = None,
    *,
    grid: LambertConformalGridSpec = HRRR_GRID,
) -> np.ndarray:
    """The exact float64 values packed into an HRRR message (NaN = bitmap-missing), (nj, ni) in scanning order
    (south-west corner first). `step` picks the message (`"7-8 hour acc fcst"`); default: the last in the file."""
    v = get_hrrr_variable(variable)
    specs = hrrr_messages_for_lead(v, lead_hours)
    if step is not None:
        want = normalize_step(step)
        specs = [s for s in specs if normalize_step(hrrr_idx_fields(s, lead_hours)[2]) == want]
        if not specs:
            raise ValueError(f"{v.name} at lead {lead_hours}: no message {step!r}")
    return _spec_values(specs[-1], grid, init_time, lead_hours)


# --------------------------------------------------------------------------------------------------
# Deterministic values


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


@lru_cache(maxsize=8)
def _coords(grid: GridSpec | LambertConformalGridSpec) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(grid, LambertConformalGridSpec):
        latitudes, longitudes = lambert_latitudes_longitudes(grid)
        return np.radians(latitudes), np.radians(longitudes)
    lat = np.radians(grid.latitudes())[:, None]
    lon = np.radians(grid.longitude_of_first_grid_point + grid.longitude_step * np.arange(grid.ni))[None, :]
    return lat, lon


def lambert_latitudes_longitudes(grid: LambertConformalGridSpec) -> tuple[np.ndarray, np.ndarray]:
    """(nj, ni) latitudes and longitudes (degrees east, -180..180) of a Lambert grid in its scanning order."""
    import pyproj

    projection = pyproj.Proj(grid.proj4())
    x0, y0 = projection(grid.longitude_of_first_grid_point, grid.latitude_of_first_grid_point)
    x = x0 + grid.dx_metres * np.arange(grid.ni) * (-1 if grid.i_scans_negatively else 1)
    y = y0 + grid.dy_metres * np.arange(grid.nj) * (1 if grid.j_scans_positively else -1)
    xx, yy = np.meshgrid(x, y)
    longitudes, latitudes = projection(xx, yy, inverse=True)
    return np.asarray(latitudes), np.asarray(longitudes)


def _noise(grid: AnyGrid, *parts: object) -> np.ndarray:
    rng = np.random.default_rng(_seed(*parts))
    return rng.standard_normal((grid.nj, grid.ni), dtype=np.float32).astype(np.float64)


@lru_cache(maxsize=4)
def _noise_pool(grid: AnyGrid, name: str, init: str) -> tuple[np.ndarray, ...]:
    return tuple(np.abs(_noise(grid, "pool", name, init, j)) for j in range(8))


def _wave(grid: AnyGrid, hours: float, k: int = 2, phase: float = 0.0) -> np.ndarray:
    lat, lon = _coords(grid)
    return _f64(np.cos(lat) * np.sin(k * lon + 2 * np.pi * hours / 24.0 + phase))


def _instant(v: ArchiveVariable, grid: AnyGrid, init: datetime, hours: int) -> np.ndarray:
    lat, _ = _coords(grid)
    n = _noise(grid, v.name, init.isoformat(), hours)
    e = v.element
    if e in ("TMP", "TMAX", "TMIN"):
        return _f64(np.clip(300.0 - 55.0 * np.sin(lat) ** 2 + 6.0 * _wave(grid, hours) + 0.5 * n, 215.0, 315.0))
    if e == "RH":
        return np.clip(70.0 + 25.0 * _wave(grid, hours, 3) + 3.0 * n, 1.0, 100.0)
    if e in ("UGRD", "VGRD"):
        scale = 1.3 if v.level_value == 100 else 1.0
        return _f64(
            scale * (8.0 * np.cos(2 * lat) + 5.0 * _wave(grid, hours, 4, 1.0 if e == "VGRD" else 0.0) + 0.8 * n)
        )
    if e == "PRES":
        return _f64(101000.0 - 6000.0 * np.abs(_wave(grid, 0, 5)) + 300.0 * _wave(grid, hours) + 40.0 * n)
    if e == "PRMSL":
        return 101325.0 + 1500.0 * _wave(grid, hours, 3) + 30.0 * n
    if e == "PWAT":
        return _f64(np.clip(8.0 + 40.0 * np.cos(lat) ** 2 + 8.0 * _wave(grid, hours) + 1.5 * n, 0.1, 80.0))
    if e == "TCDC":
        return np.clip(50.0 + 70.0 * _wave(grid, hours, 3) + 8.0 * n, 0.0, 100.0)
    if e == "CPOFP":
        return _f64(np.clip(100.0 * np.sin(lat) ** 2 + 20.0 * _wave(grid, hours) + 5.0 * n, 0.0, 100.0))
    if e in ("CSNOW", "CICEP", "CFRZR", "CRAIN"):
        phase = {"CSNOW": 0.0, "CICEP": 1.5, "CFRZR": 3.0, "CRAIN": 4.5}[e]
        return ((_wave(grid, hours, 5, phase) + 0.1 * n) > 0.55).astype(np.float64)
    if e == "HGT":  # cloud ceiling: NaN (bitmap-missing) where there is no ceiling
        ceiling = 3000.0 + 2500.0 * _wave(grid, hours, 4) + 200.0 * n
        return np.where(_wave(grid, hours, 3) > -0.2, np.clip(ceiling, 30.0, 20000.0), np.nan)
    if e == "GUST":
        return _f64(np.clip(3.0 + 9.0 * np.abs(_wave(grid, hours, 4)) + 1.0 * n, 0.1, 45.0))
    if e == "SNOD":
        return _f64(np.clip(0.6 * (np.degrees(lat) - 38.0) / 10.0 + 0.2 * _wave(grid, hours) + 0.02 * n, 0.0, None))
    if e == "VIS":
        return _f64(np.clip(24000.0 - 30000.0 * np.clip(_wave(grid, hours, 5), 0.0, 1.0) + 800.0 * n, 50.0, 24135.0))
    if e == "REFC":
        wave = _wave(grid, hours, 6, 0.5)
        return _f64(np.where(wave > 0.3, np.clip(15.0 + 60.0 * (wave - 0.3) + 3.0 * n, -10.0, 75.0), -10.0))
    if e.startswith("var "):  # HRRR's unnamed vertically integrated liquid (0/16/201), kg m-2
        return _f64(np.clip(12.0 * (_wave(grid, hours, 6, 0.5) - 0.3) + 0.5 * n, 0.0, None))
    if e in ("DSWRF", "DLWRF"):  # instantaneous fluxes (HRRR): the shape of the hour ending now
        return _interval(v, grid, init, hours, instant_noise=n)
    raise ValueError(f"{v.name} ({e}) has no instantaneous values")


def _interval(
    v: ArchiveVariable, grid: AnyGrid, init: datetime, k: int, instant_noise: np.ndarray | None = None
) -> np.ndarray:
    """Value over the hour (k-1, k]: precipitation amount, mean flux, mean cloud cover..."""
    pool = _noise_pool(grid, v.name, init.isoformat())[k % 8] if instant_noise is None else np.abs(instant_noise)
    e = v.element
    if e == "APCP":
        wet = np.clip(_wave(grid, k, 3) - 0.3, 0.0, None)
        return 2.0 * wet * (1.0 + 0.5 * pool) * (wet > 0)
    if e == "DSWRF":
        lat, lon = _coords(grid)
        sun = np.cos(lat) * np.cos(lon + 2 * np.pi * (k - 0.5) / 24.0 - np.pi)
        return _f64(np.clip(1000.0 * sun, 0.0, None) * (1.0 - 0.1 * np.clip(pool, 0, 3)))
    if e == "DLWRF":
        lat, _ = _coords(grid)
        return _f64(250.0 + 150.0 * np.cos(lat) ** 2 + 20.0 * _wave(grid, k) + 10.0 * pool)
    return _instant(v, grid, init, k)


def expected_values(
    variable: str | ArchiveVariable,
    init_time: datetime,
    lead_hours: int,
    step: str | None = None,
    *,
    grid: GridSpec = FULL_GRID,
) -> np.ndarray:
    """The exact float64 values packed into the message (NaN = bitmap-missing), shape (nj, ni), 0..360 longitudes.

    `step` selects the message (e.g. `"0-7 hour acc fcst"`); default: the variable's primary message at this lead.
    """
    v = get_variable(variable)
    specs = messages_for_lead(v, lead_hours)
    if not specs:
        raise ValueError(f"{v.name} has no message at lead {lead_hours} h")
    if step is None:
        spec = specs[0]
    else:
        want = normalize_step(step)
        matching = [s for s in specs if normalize_step(s.step_text(lead_hours)) == want]
        if not matching:
            raise ValueError(
                f"{v.name} at lead {lead_hours}: no message {step!r}; has {[s.step_text(lead_hours) for s in specs]}"
            )
        spec = matching[0]
    return _spec_values(spec, grid, init_time, lead_hours)


def _spec_values(spec: MessageSpec, grid: AnyGrid, init: datetime, lead_hours: int) -> np.ndarray:
    v = spec.variable
    if spec.window is None:
        return _instant(v, grid, init, lead_hours)
    a, b = spec.window
    if spec.kind in ("max", "min"):
        base = _instant(v, grid, init, b)
        spread = 0.3 * (b - a) + np.abs(_noise(grid, v.name, "extreme", init.isoformat(), a, b))
        return _f64(base + spread if spec.kind == "max" else base - spread)
    total = np.zeros((grid.nj, grid.ni))
    for k in range(a + 1, b + 1):
        total += _interval(v, grid, init, k)
    return total if spec.kind == "acc" else total / (b - a)


# --------------------------------------------------------------------------------------------------
# GRIB2 encoding


def _set_regular_grid(h: Any, grid: GridSpec) -> None:
    s = eccodes.codes_set
    for key, val in (
        ("Ni", grid.ni),
        ("Nj", grid.nj),
        ("latitudeOfFirstGridPointInDegrees", grid.latitude_of_first_grid_point),
        ("longitudeOfFirstGridPointInDegrees", grid.longitude_of_first_grid_point),
        ("latitudeOfLastGridPointInDegrees", grid.latitude_of_last_grid_point),
        ("longitudeOfLastGridPointInDegrees", grid.longitude_of_last_grid_point),
        ("iDirectionIncrementInDegrees", grid.longitude_step),
        (
            "jDirectionIncrementInDegrees",
            abs(grid.latitude_of_first_grid_point - grid.latitude_of_last_grid_point) / (grid.nj - 1),
        ),
        ("iScansNegatively", int(grid.i_scans_negatively)),
        ("jScansPositively", int(grid.j_scans_positively)),
    ):
        s(h, key, val)


def _set_lambert_grid(h: Any, grid: LambertConformalGridSpec) -> None:
    """GRIB2 template 3.30 as HRRR writes it: spherical earth of a given radius, winds relative to the grid."""
    s = eccodes.codes_set
    s(h, "gridDefinitionTemplateNumber", 30)
    if round(grid.earth_radius_metres) == 6371229:
        s(h, "shapeOfTheEarth", 6)  # code table 3.2: sphere of radius 6371229 m, as HRRR writes it
    else:
        s(h, "shapeOfTheEarth", 1)
        s(h, "scaleFactorOfRadiusOfSphericalEarth", 0)
        s(h, "scaledValueOfRadiusOfSphericalEarth", round(grid.earth_radius_metres))
    for key, val in (
        ("Nx", grid.ni),
        ("Ny", grid.nj),
        ("latitudeOfFirstGridPointInDegrees", grid.latitude_of_first_grid_point),
        ("longitudeOfFirstGridPointInDegrees", grid.longitude_of_first_grid_point % 360.0),
        ("resolutionAndComponentFlags", 8),
        ("LaDInDegrees", grid.lad),
        ("LoVInDegrees", grid.lov % 360.0),
        ("DxInMetres", grid.dx_metres),
        ("DyInMetres", grid.dy_metres),
        ("projectionCentreFlag", 0),
        ("iScansNegatively", int(grid.i_scans_negatively)),
        ("jScansPositively", int(grid.j_scans_positively)),
        ("Latin1InDegrees", grid.latin1),
        ("Latin2InDegrees", grid.latin2),
        ("latitudeOfSouthernPoleInDegrees", -90.0),
        ("longitudeOfSouthernPoleInDegrees", 0.0),
    ):
        s(h, key, val)


def encode_message(
    spec: MessageSpec,
    values: np.ndarray,
    init_time: datetime,
    lead_hours: int,
    grid: AnyGrid,
    packing: PackingType = "grid_complex_spatial_differencing",
) -> bytes:
    """Encode one field as a GRIB2 message (NCEP centre, regular_ll or Lambert conformal, template 4.0 or 4.8).

    `values` are in the grid's scanning order (HRRR's Lambert grid: rows from the south-west corner northward).
    """
    v = spec.variable
    h = eccodes.codes_grib_new_from_samples("GRIB2")
    try:
        s = eccodes.codes_set
        s(h, "centre", 7)
        s(h, "dataDate", int(init_time.strftime("%Y%m%d")))
        s(h, "dataTime", int(init_time.strftime("%H%M")))
        s(h, "significanceOfReferenceTime", 1)
        if isinstance(grid, LambertConformalGridSpec):
            _set_lambert_grid(h, grid)
        else:
            _set_regular_grid(h, grid)
        if spec.window is not None:
            s(h, "productDefinitionTemplateNumber", 8)
        if v.local_table:
            s(h, "localTablesVersion", v.local_table)
        s(h, "discipline", v.discipline)
        s(h, "parameterCategory", v.category)
        s(h, "parameterNumber", v.number)
        s(h, "typeOfFirstFixedSurface", v.level_type)
        if v.level_value is not None:
            s(h, "scaleFactorOfFirstFixedSurface", 0)
            s(h, "scaledValueOfFirstFixedSurface", v.level_value)
        else:
            eccodes.codes_set_missing(h, "scaleFactorOfFirstFixedSurface")
            eccodes.codes_set_missing(h, "scaledValueOfFirstFixedSurface")
        s(h, "typeOfSecondFixedSurface", 255)
        s(h, "stepUnits", 1)
        if spec.window is not None:
            s(h, "typeOfStatisticalProcessing", _STAT_PROCESSING[spec.kind])
            s(h, "stepRange", f"{spec.window[0]}-{spec.window[1]}")
        else:
            s(h, "forecastTime", lead_hours)
        s(h, "packingType", packing)
        # ecCodes' GRIB2 sample has bitsPerValue 0 (constant field): set it or every value packs to the mean.
        s(h, "bitsPerValue", v.bits_per_value)
        flat = np.asarray(values, dtype=np.float64).ravel()
        missing = np.isnan(flat)
        if missing.any():
            s(h, "bitmapPresent", 1)
            s(h, "missingValue", 9.999e20)
            flat = np.where(missing, 9.999e20, flat)
        eccodes.codes_set_values(h, flat)
        message: bytes = eccodes.codes_get_message(h)
    finally:
        eccodes.codes_release(h)
    ENCODE_COUNTER["messages"] += 1
    return message


# --------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class ArchiveLayout:
    """Where a product keeps one file per (init, lead) under a root; the `.idx` sits beside it."""

    product: str
    file_path: Callable[[datetime, int], str]

    def idx_path(self, init_time: datetime, lead_hours: int) -> str:
        return self.file_path(init_time, lead_hours) + ".idx"


def _gfs_path(init: datetime, lead: int) -> str:
    return f"gfs.{init:%Y%m%d}/{init:%H}/atmos/gfs.t{init:%H}z.pgrb2.0p25.f{lead:03d}"


def _hrrr_path(init: datetime, lead: int) -> str:
    return f"hrrr.{init:%Y%m%d}/conus/hrrr.t{init:%H}z.wrfsfcf{lead:02d}.grib2"


GFS_LAYOUT = ArchiveLayout("gfs", _gfs_path)
HRRR_LAYOUT = ArchiveLayout("hrrr", _hrrr_path)
LAYOUTS: dict[str, ArchiveLayout] = {"gfs": GFS_LAYOUT, "hrrr": HRRR_LAYOUT}


# --------------------------------------------------------------------------------------------------
# Archive generation


class ArchiveFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the archive root
    init_time: datetime
    lead_hours: int
    size: int
    idx_size: int


class ArchiveManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    root: Path
    product: str
    generator_version: str
    parameters: dict[str, Any]
    files: tuple[ArchiveFile, ...]
    missing: tuple[str, ...]  # relative paths deliberately left out

    def file(self, init_time: datetime, lead_hours: int) -> ArchiveFile:
        for f in self.files:
            if f.init_time == init_time and f.lead_hours == lead_hours:
                return f
        raise KeyError(f"archive {self.root} has no file for init {init_time:%Y-%m-%dT%H} lead {lead_hours} h")

    def path(self, init_time: datetime, lead_hours: int) -> Path:
        return self.root / LAYOUTS[self.product].file_path(init_time, lead_hours)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "reformatters" / "archives"


def _build_file(
    root: str,
    layout_name: str,
    init: datetime,
    lead: int,
    variables: Sequence[str],
    grid: AnyGrid,
    filler_ratio: float,
    packing: PackingType,
) -> tuple[str, int, int, int]:
    layout = LAYOUTS[layout_name]
    wanted: list[tuple[bytes, tuple[str, str, str]]] = []
    for name in variables:
        if layout_name == "hrrr":
            specs = [(spec, hrrr_idx_fields(spec, lead)) for spec in hrrr_messages_for_lead(name, lead)]
        else:
            specs = [(spec, spec.idx_fields(lead)) for spec in messages_for_lead(name, lead)]
        encoded: dict[tuple[int, int] | None, bytes] = {}
        for spec, fields in specs:
            if spec.window not in encoded:  # HRRR's f01 lists its one-hour accumulation twice
                values = _spec_values(spec, grid, init, lead)
                encoded[spec.window] = encode_message(spec, values, init, lead, grid, packing)
            wanted.append((encoded[spec.window], fields))
    filler_bytes = wanted[0][0] if wanted else b""
    n_fillers = round(filler_ratio * len(wanted))
    fillers = [
        (
            filler_bytes,
            (
                _FILLER_ELEMENTS[i % len(_FILLER_ELEMENTS)],
                f"{_FILLER_LEVELS[(i // len(_FILLER_ELEMENTS)) % len(_FILLER_LEVELS)]} mb",
                instant_step(lead),
            ),
        )
        for i in range(n_fillers)
    ]
    # Interleave: fillers spread evenly between wanted messages so no two wanted ones are adjacent when ratio >= 1.
    ordered: list[tuple[bytes, tuple[str, str, str]]] = []
    per_gap = n_fillers / max(len(wanted), 1)
    used = 0
    for i, w in enumerate(wanted):
        take = round((i + 1) * per_gap) - used
        ordered.extend(fillers[used : used + take])
        used += take
        ordered.append(w)
    ordered.extend(fillers[used:])

    path = Path(root) / layout.file_path(init, lead)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    offset = 0
    with open(path, "wb") as f:
        for n, (data, (element, level, step)) in enumerate(ordered, start=1):
            f.write(data)
            lines.append(f"{n}:{offset}:d={init:%Y%m%d%H}:{element}:{level}:{step}:")
            offset += len(data)
    idx_text = "\n".join(lines) + "\n"
    Path(root, layout.idx_path(init, lead)).write_text(idx_text)
    return layout.file_path(init, lead), offset, len(idx_text.encode()), len(wanted)


def generate_gfs_archive(
    init_times: Iterable[datetime],
    lead_hours: Iterable[int],
    *,
    variables: Iterable[str] | None = None,
    grid: GridSpec = FULL_GRID,
    filler_ratio: float = 3.0,
    missing: Iterable[tuple[datetime, int]] = (),
    packing: PackingType = "grid_complex_spatial_differencing",
    cache_dir: Path | None = None,
    workers: int = 1,
) -> ArchiveManifest:
    """Build (or reuse from cache) a GFS-layout archive; `missing` (init, lead) files are left out."""
    names = [get_variable(n).name for n in (variables if variables is not None else _BY_NAME)]
    return _generate_archive(
        "gfs",
        GENERATOR_VERSION,
        init_times,
        lead_hours,
        names,
        grid,
        filler_ratio,
        missing,
        packing,
        cache_dir,
        workers,
    )


def generate_hrrr_archive(
    init_times: Iterable[datetime],
    lead_hours: Iterable[int],
    *,
    variables: Iterable[str] | None = None,
    grid: LambertConformalGridSpec = HRRR_GRID,
    filler_ratio: float = 1.0,
    missing: Iterable[tuple[datetime, int]] = (),
    packing: PackingType = "grid_complex_spatial_differencing",
    cache_dir: Path | None = None,
    workers: int = 1,
) -> ArchiveManifest:
    """Build (or reuse from cache) an HRRR CONUS `wrfsfc` archive on the Lambert conformal grid.

    Variables are named as in `HRRR_ARCHIVE_VARIABLES`; `missing` (init, lead) files are left out.
    """
    names = [get_hrrr_variable(n).name for n in (variables if variables is not None else _HRRR_BY_NAME)]
    return _generate_archive(
        "hrrr",
        HRRR_GENERATOR_VERSION,
        init_times,
        lead_hours,
        names,
        grid,
        filler_ratio,
        missing,
        packing,
        cache_dir,
        workers,
    )


def _generate_archive(
    product: str,
    version: str,
    init_times: Iterable[datetime],
    lead_hours: Iterable[int],
    names: list[str],
    grid: AnyGrid,
    filler_ratio: float,
    missing: Iterable[tuple[datetime, int]],
    packing: PackingType,
    cache_dir: Path | None,
    workers: int,
) -> ArchiveManifest:
    inits = sorted(init_times)
    leads = sorted(set(lead_hours))
    missing_set = {(m[0], m[1]) for m in missing}
    params: dict[str, Any] = {
        "init_times": [t.isoformat() for t in inits],
        "lead_hours": leads,
        "variables": names,
        "grid": grid.model_dump(),
        "filler_ratio": filler_ratio,
        "missing": sorted(f"{t.isoformat()}/{lead}" for t, lead in missing_set),
        "packing": packing,
    }
    key = hashlib.sha256(json.dumps({"v": version, **params}, sort_keys=True).encode()).hexdigest()[:20]
    cache = cache_dir or default_cache_dir()
    final = cache / f"{product}-v{version}-{key}"
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        return ArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    try:
        jobs = [(t, lead) for t in inits for lead in leads if (t, lead) not in missing_set]
        args = [(str(tmp), product, t, lead, names, grid, filler_ratio, packing) for t, lead in jobs]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_build_file, *zip(*args, strict=True)))
        else:
            results = [_build_file(*a) for a in args]
        files = tuple(
            ArchiveFile(path=rel, init_time=t, lead_hours=lead, size=size, idx_size=idx_size)
            for (t, lead), (rel, size, idx_size, _) in zip(jobs, results, strict=True)
        )
        manifest = ArchiveManifest(
            root=final,
            product=product,
            generator_version=version,
            parameters=params,
            files=files,
            missing=tuple(LAYOUTS[product].file_path(t, lead) for t, lead in sorted(missing_set)),
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same archive first: use theirs.
            if not manifest_path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return ArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gfs_init_lead_to_valid(init_time: datetime, lead_hours: int) -> datetime:
    return init_time + timedelta(hours=lead_hours)
