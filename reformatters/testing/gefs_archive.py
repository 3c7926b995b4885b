"""Generate NOAA GEFS-layout GRIB2 archives: one file per (init, member, product, lead) with its `.idx` beside it.

The products are GEFS's: `s` (the common surface fields at the fine grid, to 240 h), `a` and `b` (the coarse grid,
every lead; `a` the common fields and 500 hPa height, `b` gust and 100 m wind). File names are NOAA's whatever the
grids: the real 0.25/0.5 degree pair, or a coarser pair (1.0/2.0) that keeps tests small. Values are deterministic
per member (analytic shapes from `noaa_archive` plus noise seeded by member), encoded with ecCodes by
`noaa_archive.encode_message`; windows restart every 6 h as GEFS's do (`0-3`, `0-6`, `6-9`, ... `240-246`, ...).
Inventory lines carry GEFS's member suffix (`ENS=low-res ctl`, `ENS=+30`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from reformatters.sources.grib_decode import GridSpec
from reformatters.sources.grib_index import instant_step
from reformatters.testing.noaa_archive import (
    ArchiveVariable,
    MessageSpec,
    PackingType,
    _coords,
    _noise,
    _spec_values,
    _wave,
    default_cache_dir,
    encode_message,
    get_variable,
    gfs_window_start,
)

GEFS_GENERATOR_VERSION = "1"
Product = Literal["s", "a", "b"]
PRODUCTS: tuple[Product, ...] = ("s", "a", "b")
S_LAST_LEAD_HOURS = 240
GEFS_LEAD_HOURS: tuple[int, ...] = tuple(range(0, 241, 3)) + tuple(range(246, 841, 6))
FINE_GRID = GridSpec.global_regular(0.25)
COARSE_GRID = GridSpec.global_regular(0.5)


def member_name(member: int) -> str:
    """GEFS file-name member: 0 is the control `c00`, 1-30 the perturbed `p01`...`p30`."""
    if not 0 <= member <= 30:
        raise ValueError(f"GEFS members are 0 (c00) to 30 (p30), got {member}")
    return "c00" if member == 0 else f"p{member:02d}"


def ens_suffix(member: int) -> str:
    """The inventory's last field for a member file, as NCEP writes it."""
    return "ENS=low-res ctl" if member == 0 else f"ENS=+{member}"


def gefs_file_path(init_time: datetime, member: int, product: Product, lead_hours: int) -> str:
    dir_res, res = ("p25", "0p25") if product == "s" else ("p5", "0p50")
    return (
        f"gefs.{init_time:%Y%m%d}/{init_time:%H}/atmos/pgrb2{product}{dir_res}/"
        f"ge{member_name(member)}.t{init_time:%H}z.pgrb2{product}.{res}.f{lead_hours:03d}"
    )


def _gefs(name: str, **changes: Any) -> ArchiveVariable:
    return replace(get_variable(name), **changes)


GEFS_ARCHIVE_VARIABLES: tuple[ArchiveVariable, ...] = (
    _gefs("temperature_2m"),
    _gefs("relative_humidity_2m"),
    _gefs("wind_u_10m"),
    _gefs("wind_v_10m"),
    _gefs("wind_u_100m"),
    _gefs("wind_v_100m"),
    ArchiveVariable("wind_gust_surface", "GUST", "surface", "instant", 0, 2, 22, level_type=1, units="m s-1"),
    _gefs("pressure_reduced_to_mean_sea_level"),
    # GEFS has no accumulation from the initialisation time beside the 6-hour buckets.
    _gefs("precipitation_surface", also_from_init=False),
    # GEFS publishes the categorical types and cloud cover only as window averages.
    _gefs("categorical_snow_surface", kind="ave", also_average=False, bits_per_value=8),
    _gefs("categorical_ice_pellets_surface", kind="ave", also_average=False, bits_per_value=8),
    _gefs("categorical_freezing_rain_surface", kind="ave", also_average=False, bits_per_value=8),
    _gefs("categorical_rain_surface", kind="ave", also_average=False, bits_per_value=8),
    _gefs("total_cloud_cover_atmosphere", kind="ave", also_average=False),
    _gefs("downward_short_wave_radiation_flux_surface"),
    _gefs("downward_long_wave_radiation_flux_surface"),
    ArchiveVariable(
        "geopotential_height_500hpa",
        "HGT",
        "500 mb",
        "instant",
        0,
        3,
        5,
        level_type=100,
        level_value=50000,
        bits_per_value=12,
        units="gpm",
    ),
)
_BY_NAME = {v.name: v for v in GEFS_ARCHIVE_VARIABLES}
_COMMON = tuple(
    n for n in _BY_NAME if n not in ("wind_u_100m", "wind_v_100m", "wind_gust_surface", "geopotential_height_500hpa")
)
# Which product holds which variable. The `a` files repeat the common fields at the coarse grid at every lead.
PRODUCT_VARIABLES: dict[Product, tuple[str, ...]] = {
    "s": (*_COMMON, "wind_gust_surface"),
    "a": (*_COMMON, "geopotential_height_500hpa"),
    "b": ("wind_gust_surface", "wind_u_100m", "wind_v_100m"),
}
_FILLER_LEVELS = (1000, 925, 850, 700, 400, 300, 250, 200)


def gefs_variable(name: str) -> ArchiveVariable:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown GEFS archive variable {name!r}; known: {sorted(_BY_NAME)}") from None


def product_has_lead(product: Product, lead_hours: int) -> bool:
    return product != "s" or lead_hours <= S_LAST_LEAD_HOURS


def gefs_messages(name: str, lead_hours: int) -> list[MessageSpec]:
    """The messages a member file at `lead_hours` holds for `name`: none for a window at lead 0."""
    v = gefs_variable(name)
    if v.kind == "instant":
        return [MessageSpec(v, "instant", None)]
    if lead_hours == 0:
        return []
    return [MessageSpec(v, v.kind, (gfs_window_start(lead_hours), lead_hours))]


def gefs_values(spec: MessageSpec, grid: GridSpec, init_time: datetime, lead_hours: int, member: int) -> np.ndarray:
    """The float64 values packed into a message of `member` (NaN = bitmap-missing), shape (nj, ni)."""
    v = replace(spec.variable, name=f"{spec.variable.name}@{member_name(member)}")
    noise = _noise(grid, v.name, init_time.isoformat(), lead_hours)
    if v.element == "GUST":
        lat, _ = _coords(grid)
        return np.asarray(np.clip(6.0 + 6.0 * np.cos(2 * lat) + 4.0 * _wave(grid, lead_hours, 4) + noise, 0.2, 60.0))
    if v.element == "HGT" and v.level == "500 mb":
        lat, _ = _coords(grid)
        return np.asarray(5750.0 - 550.0 * np.sin(lat) ** 2 + 80.0 * _wave(grid, lead_hours, 3) + 8.0 * noise)
    return _spec_values(replace(spec, variable=v), grid, init_time, lead_hours)


class GefsArchiveFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the archive root
    init_time: datetime
    member: int
    product: Product
    lead_hours: int
    size: int
    idx_size: int


class GefsArchiveManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    root: Path
    generator_version: str
    parameters: dict[str, Any]
    files: tuple[GefsArchiveFile, ...]
    missing: tuple[str, ...]  # relative paths deliberately left out

    def path(self, init_time: datetime, member: int, product: Product, lead_hours: int) -> Path:
        return self.root / gefs_file_path(init_time, member, product, lead_hours)

    def holds(self, init_time: datetime, member: int, product: Product, lead_hours: int) -> bool:
        return self.path(init_time, member, product, lead_hours).exists()


def _build_file(
    root: str,
    init: datetime,
    member: int,
    product: Product,
    lead: int,
    variables: Sequence[str],
    grid: GridSpec,
    filler_ratio: float,
    packing: PackingType,
) -> tuple[str, int, int]:
    wanted: list[tuple[bytes, tuple[str, str, str]]] = []
    for name in variables:
        for spec in gefs_messages(name, lead):
            values = gefs_values(spec, grid, init, lead, member)
            wanted.append((encode_message(spec, values, init, lead, grid, packing), spec.idx_fields(lead)))
    n_fillers = round(filler_ratio * len(wanted))
    fillers = [
        (wanted[0][0], ("TMP", f"{_FILLER_LEVELS[i % len(_FILLER_LEVELS)]} mb", instant_step(lead)))
        for i in range(n_fillers if wanted else 0)
    ]
    ordered = [message for pair in zip(fillers, wanted, strict=False) for message in pair]
    ordered += fillers[len(wanted) :] + wanted[len(fillers) :]
    relative = gefs_file_path(init, member, product, lead)
    path = Path(root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    offset = 0
    with open(path, "wb") as f:
        for n, (data, (element, level, step)) in enumerate(ordered, start=1):
            f.write(data)
            lines.append(f"{n}:{offset}:d={init:%Y%m%d%H}:{element}:{level}:{step}:{ens_suffix(member)}")
            offset += len(data)
    idx_text = "\n".join(lines) + "\n"
    Path(f"{path}.idx").write_text(idx_text)
    return relative, offset, len(idx_text.encode())


def generate_gefs_archive(
    init_times: Iterable[datetime],
    members: Iterable[int],
    lead_hours: Iterable[int],
    *,
    variables: Iterable[str] | None = None,
    fine_grid: GridSpec = FINE_GRID,
    coarse_grid: GridSpec = COARSE_GRID,
    products: Iterable[Product] = PRODUCTS,
    filler_ratio: float = 1.0,
    missing: Iterable[tuple[datetime, int, Product, int]] = (),
    packing: PackingType = "grid_complex_spatial_differencing",
    cache_dir: Path | None = None,
    workers: int = 1,
) -> GefsArchiveManifest:
    """Build (or reuse from the cache) a GEFS-layout archive; `missing` (init, member, product, lead) files are
    left out. `s` files exist to 240 h; each product holds the requested variables it carries."""
    inits = sorted(init_times)
    member_list = sorted(set(members))
    leads = sorted(set(lead_hours))
    names = [gefs_variable(n).name for n in (variables if variables is not None else _BY_NAME)]
    product_list = [p for p in PRODUCTS if p in set(products)]
    missing_set = {(m[0], m[1], m[2], m[3]) for m in missing}
    params: dict[str, Any] = {
        "init_times": [t.isoformat() for t in inits],
        "members": member_list,
        "lead_hours": leads,
        "variables": names,
        "products": product_list,
        "fine_grid": fine_grid.model_dump(),
        "coarse_grid": coarse_grid.model_dump(),
        "filler_ratio": filler_ratio,
        "missing": sorted(f"{t.isoformat()}/{m}/{p}/{lead}" for t, m, p, lead in missing_set),
        "packing": packing,
    }
    key = hashlib.sha256(json.dumps({"v": GEFS_GENERATOR_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:20]
    cache = cache_dir or default_cache_dir()
    final = cache / f"gefs-v{GEFS_GENERATOR_VERSION}-{key}"
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        return GefsArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    try:
        jobs = []
        for init in inits:
            for member in member_list:
                for product in product_list:
                    held = [n for n in names if n in PRODUCT_VARIABLES[product]]
                    for lead in leads:
                        if (
                            not held
                            or not product_has_lead(product, lead)
                            or (init, member, product, lead) in missing_set
                        ):
                            continue
                        grid = fine_grid if product == "s" else coarse_grid
                        jobs.append((str(tmp), init, member, product, lead, held, grid, filler_ratio, packing))
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_build_file, *zip(*jobs, strict=True)))
        else:
            results = [_build_file(*job) for job in jobs]
        files = tuple(
            GefsArchiveFile(
                path=relative,
                init_time=job[1],
                member=job[2],
                product=job[3],
                lead_hours=job[4],
                size=size,
                idx_size=idx_size,
            )
            for job, (relative, size, idx_size) in zip(jobs, results, strict=True)
        )
        manifest = GefsArchiveManifest(
            root=final,
            generator_version=GEFS_GENERATOR_VERSION,
            parameters=params,
            files=files,
            missing=tuple(gefs_file_path(t, m, p, lead) for t, m, p, lead in sorted(missing_set)),
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same archive first: use theirs.
            if not manifest_path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return GefsArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
