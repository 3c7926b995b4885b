"""Generate ECMWF open-data-layout GRIB2 archives: IFS ENS `enfo`/`ef` files (every member of one step) and
deterministic `oper`/`fc` files, each with its JSON-lines `.index` beside it, packed with CCSDS through ecCodes.

Layout: `{YYYYMMDD}/{HH}z/ifs/{resolution}/{stream}/{YYYYMMDD}{HH}0000-{step}h-{stream}-{type}.grib2` and the same
name ending `.index`. Before `control_in_oper_from` (IFS cycle 50r1) the `ef` files hold the control (`type` cf,
its index line without `number`, as MARS writes it) and the perturbed members (`pf`, `number` 1-50); from then on
they hold only the perturbed members and the control is the `oper`/`fc` forecast. `oper` files written before the
switch hold the old deterministic forecast, whose values differ from the control's on purpose: a reader taking
member 0 from the wrong stream reads other numbers.

Values are deterministic per (variable, init, step, member); accumulations (`tp` in metres, `ssrd`/`strd` in
J m-2) run from the start of the forecast and never decrease. Messages of variables nobody asks for (`t` and `gh`
on pressure levels, with `levelist`) sit between the wanted ones, as in a real file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import eccodes
import numpy as np
from pydantic import BaseModel, ConfigDict

from reformatters.sources.ecmwf_index import EcmwfIndex, EcmwfMessageKey
from reformatters.sources.grib_decode import GridSpec
from reformatters.testing.noaa_archive import PackingType, _coords, _noise, _wave, default_cache_dir

ECMWF_GENERATOR_VERSION = "2"
# IFS cycle 50r1 (planned by ECMWF for 12 May 2026): the first init whose control is in `oper`, not `enfo`.
IFS_50R1_FIRST_INIT = datetime(2026, 5, 12, 0)
ENS_STEPS: tuple[int, ...] = tuple(range(0, 145, 3)) + tuple(range(150, 361, 6))
ENS_MEMBERS: tuple[int, ...] = tuple(range(51))

Stream = Literal["enfo", "oper"]
Kind = Literal["instant", "acc"]


def ecmwf_grid(resolution: float, first_longitude: float = -180.0) -> GridSpec:
    """ECMWF open data's global grid: latitude 90 to -90, longitudes from `first_longitude` (-180 as published)."""
    ni = round(360 / resolution)
    return GridSpec(
        ni=ni,
        nj=round(180 / resolution) + 1,
        latitude_of_first_grid_point=90.0,
        longitude_of_first_grid_point=first_longitude,
        latitude_of_last_grid_point=-90.0,
        longitude_of_last_grid_point=first_longitude + 360.0 - resolution,
    )


@dataclass(frozen=True)
class EcmwfArchiveVariable:
    param: str  # ECMWF short name, as in the index
    param_id: int
    kind: Kind
    bits_per_value: int = 16


ECMWF_ARCHIVE_VARIABLES: tuple[EcmwfArchiveVariable, ...] = (
    EcmwfArchiveVariable("2t", 167, "instant"),
    EcmwfArchiveVariable("2d", 168, "instant"),
    EcmwfArchiveVariable("10u", 165, "instant"),
    EcmwfArchiveVariable("10v", 166, "instant"),
    EcmwfArchiveVariable("100u", 228246, "instant"),
    EcmwfArchiveVariable("100v", 228247, "instant"),
    EcmwfArchiveVariable("msl", 151, "instant"),
    EcmwfArchiveVariable("tcc", 228164, "instant"),
    EcmwfArchiveVariable("tp", 228, "acc"),
    EcmwfArchiveVariable("ssrd", 169, "acc"),
    EcmwfArchiveVariable("strd", 175, "acc"),
)
_BY_PARAM = {v.param: v for v in ECMWF_ARCHIVE_VARIABLES}
# (param, paramId, levelist) of the filler messages: fields a dataset reading the surface never asks for.
_FILLERS = tuple(
    (param, param_id, level)
    for param, param_id in (("t", 130), ("gh", 156), ("q", 133), ("r", 157))
    for level in ("850", "500", "1000", "925", "700", "300", "250", "200", "100", "50")
)


def ecmwf_variable(param: str) -> EcmwfArchiveVariable:
    try:
        return _BY_PARAM[param]
    except KeyError:
        raise KeyError(f"unknown ECMWF archive param {param!r}; known: {sorted(_BY_PARAM)}") from None


def ecmwf_file_path(init_time: datetime, stream: Stream, step: int, resolution_dir: str = "0p25") -> str:
    kind = "ef" if stream == "enfo" else "fc"
    return (
        f"{init_time:%Y%m%d}/{init_time:%H}z/ifs/{resolution_dir}/{stream}/"
        f"{init_time:%Y%m%d%H}0000-{step}h-{stream}-{kind}.grib2"
    )


def index_path(grib_path: str) -> str:
    return grib_path.removesuffix(".grib2") + ".index"


def resolution_dir(grid: GridSpec) -> str:
    """`0p25` for 0.25 degrees, `1p5` for 1.5, `3` for 3.0: the folder ECMWF names after the resolution."""
    text = f"{grid.longitude_step:g}"
    return text.replace(".", "p")


# --------------------------------------------------------------------------------------------------
# Deterministic values


def _member_tag(member: int | None) -> str:
    return "hres" if member is None else f"m{member}"


@lru_cache(maxsize=16)
def _rate_field(grid: GridSpec, param: str, init: str, tag: str) -> np.ndarray:
    """The mean rate (per hour) of an accumulated variable, fixed over the forecast for one member."""
    lat, _ = _coords(grid)
    spread = 1.0 + 0.5 * np.abs(_noise(grid, "rate", param, init, tag))
    if param == "tp":  # metres per hour: up to a few mm/h where the wave is wet
        return np.asarray(np.clip(_wave(grid, 6.0, 3) - 0.3, 0.0, None) * 2.0e-3 * spread)
    if param == "ssrd":  # J m-2 per hour from a mean flux of 50-300 W m-2
        return np.asarray((50.0 + 250.0 * np.cos(lat) ** 2 * np.ones_like(spread)) * 3600.0 * (0.8 + 0.2 * spread))
    if param == "strd":
        return np.asarray((250.0 + 150.0 * np.cos(lat) ** 2 * np.ones_like(spread)) * 3600.0 * (0.9 + 0.1 * spread))
    raise ValueError(f"{param} is not accumulated")


def ecmwf_values(param: str, grid: GridSpec, init_time: datetime, step: int, member: int | None) -> np.ndarray:
    """The float64 values packed for `param` at `step` of `member` (None: the deterministic `oper` forecast before
    50r1), shape (nj, ni), in the grid's order (longitudes from its first one)."""
    v = ecmwf_variable(param)
    tag = _member_tag(member)
    init = init_time.isoformat()
    if v.kind == "acc":
        # A(h) = r (h + (6/pi) sin(pi h / 6)): rises at r (1 + cos(pi h / 6)) >= 0, so every step's rate differs.
        factor = step + (6.0 / np.pi) * np.sin(np.pi * step / 6.0)
        return np.asarray(_rate_field(grid, param, init, tag) * factor)
    lat, _ = _coords(grid)
    n = _noise(grid, param, init, step, tag)
    if param in ("2t", "2d"):
        t = 300.0 - 55.0 * np.sin(lat) ** 2 + 6.0 * _wave(grid, step) + 0.5 * n
        if param == "2d":
            t = t - 2.0 - 3.0 * np.abs(_noise(grid, "depression", init, step, tag))
        return np.asarray(np.clip(t, 200.0, 320.0))
    if param in ("10u", "10v", "100u", "100v"):
        scale = 1.3 if param.startswith("100") else 1.0
        return np.asarray(scale * (8.0 * np.cos(2 * lat) + 5.0 * _wave(grid, step, 4, float(param.endswith("v")))) + n)
    if param == "msl":
        return np.asarray(101325.0 + 1500.0 * _wave(grid, step, 3) + 30.0 * n)
    if param == "tcc":
        return np.asarray(np.clip(50.0 + 70.0 * _wave(grid, step, 3) + 8.0 * n, 0.0, 100.0))
    raise ValueError(f"no values for {param}")


# --------------------------------------------------------------------------------------------------
# GRIB2 encoding


def encode_ecmwf_message(
    param_id: int,
    values: np.ndarray,
    init_time: datetime,
    step: int,
    grid: GridSpec,
    *,
    member_type: Literal["cf", "pf", "fc"],
    number: int | None,
    accumulated: bool,
    bits_per_value: int = 16,
    packing: PackingType = "grid_ccsds",
) -> bytes:
    """One field as ECMWF writes it in open data: centre ecmf, regular_ll, ensemble template 4.1/4.11 (control
    and perturbed) or 4.0/4.8 (deterministic), accumulations over 0-step."""
    h = eccodes.codes_grib_new_from_samples("GRIB2")
    try:
        s = eccodes.codes_set
        s(h, "centre", "ecmf")
        s(h, "dataDate", int(init_time.strftime("%Y%m%d")))
        s(h, "dataTime", int(init_time.strftime("%H%M")))
        s(h, "significanceOfReferenceTime", 1)
        for key, value in (
            ("Ni", grid.ni),
            ("Nj", grid.nj),
            ("latitudeOfFirstGridPointInDegrees", grid.latitude_of_first_grid_point),
            ("longitudeOfFirstGridPointInDegrees", grid.longitude_of_first_grid_point),
            ("latitudeOfLastGridPointInDegrees", grid.latitude_of_last_grid_point),
            ("longitudeOfLastGridPointInDegrees", grid.longitude_of_last_grid_point),
            ("iDirectionIncrementInDegrees", grid.longitude_step),
            ("jDirectionIncrementInDegrees", 180.0 / (grid.nj - 1)),
        ):
            s(h, key, value)
        if member_type in ("cf", "pf"):
            s(h, "productDefinitionTemplateNumber", 11 if accumulated else 1)
            s(h, "typeOfEnsembleForecast", 1 if member_type == "cf" else 3)
            s(h, "perturbationNumber", number or 0)
            s(h, "numberOfForecastsInEnsemble", 51)
            s(h, "typeOfProcessedData", 3 if member_type == "cf" else 4)
        else:
            if accumulated:
                s(h, "productDefinitionTemplateNumber", 8)
            s(h, "typeOfProcessedData", 2)
        s(h, "paramId", param_id)
        s(h, "stepUnits", 1)
        if accumulated:
            s(h, "stepRange", f"0-{step}")
        else:
            s(h, "step", step)
        s(h, "packingType", packing)
        s(h, "bitsPerValue", bits_per_value)
        eccodes.codes_set_values(h, np.asarray(values, dtype=np.float64).ravel())
        message: bytes = eccodes.codes_get_message(h)
    finally:
        eccodes.codes_release(h)
    return message


# --------------------------------------------------------------------------------------------------
# Files


def _index_line(
    init: datetime, stream: Stream, member_type: str, number: int | None, step: int, param: str, levelist: str | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "domain": "g",
        "date": f"{init:%Y%m%d}",
        "time": f"{init:%H}00",
        "expver": "0001",
        "class": "od",
        "type": member_type,
        "stream": stream,
        "step": str(step),
        "levtype": "pl" if levelist is not None else "sfc",
    }
    if levelist is not None:
        record["levelist"] = levelist
    if number is not None and member_type == "pf":
        record["number"] = str(number)
    record["param"] = param
    return record


def _members_in(
    stream: Stream, init: datetime, members: Sequence[int], switch: datetime
) -> list[tuple[str, int | None]]:
    """(type, number) of the fields a file holds, in file order."""
    if stream == "enfo":
        held: list[tuple[str, int | None]] = [] if init >= switch or 0 not in members else [("cf", 0)]
        return held + [("pf", m) for m in members if m > 0]
    return [("fc", None)]


def _build_file(
    root: str,
    init: datetime,
    stream: Stream,
    step: int,
    params: Sequence[str],
    members: Sequence[int],
    grid: GridSpec,
    switch: datetime,
    filler_ratio: float,
    packing: PackingType,
) -> tuple[str, int, int]:
    relative = ecmwf_file_path(init, stream, step, resolution_dir(grid))
    path = Path(root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    offset = 0
    lines: list[str] = []
    fillers_due = 0.0
    fillers_used: dict[int | None, int] = {}  # per member: each filler (param, level) once at most
    with open(path, "wb") as f:
        for param in params:
            v = ecmwf_variable(param)
            for member_type, number in _members_in(stream, init, members, switch):
                # `oper` holds the control from 50r1 on, the old deterministic forecast (other values) before.
                value_member = number if stream == "enfo" else (0 if init >= switch else None)
                values = ecmwf_values(param, grid, init, step, value_member)
                data = encode_ecmwf_message(
                    v.param_id,
                    values,
                    init,
                    step,
                    grid,
                    member_type=member_type,  # type: ignore[arg-type]
                    number=number,
                    accumulated=v.kind == "acc",
                    bits_per_value=v.bits_per_value,
                    packing=packing,
                )
                fillers_due += filler_ratio
                while fillers_due >= 1.0 and fillers_used.get(number, 0) < len(_FILLERS):
                    filler_param, _, levelist = _FILLERS[fillers_used.get(number, 0)]
                    fillers_used[number] = fillers_used.get(number, 0) + 1
                    f.write(data)
                    record = _index_line(init, stream, member_type, number, step, filler_param, levelist)
                    lines.append(json.dumps({**record, "_offset": offset, "_length": len(data)}))
                    offset += len(data)
                    fillers_due -= 1.0
                f.write(data)
                record = _index_line(init, stream, member_type, number, step, param, None)
                lines.append(json.dumps({**record, "_offset": offset, "_length": len(data)}))
                offset += len(data)
    text = "\n".join(lines) + "\n"
    Path(root, index_path(relative)).write_text(text)
    return relative, offset, len(text.encode())


class EcmwfArchiveFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    init_time: datetime
    stream: Stream
    step: int
    size: int
    index_size: int


class EcmwfArchiveManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    root: Path
    generator_version: str
    parameters: dict[str, Any]
    files: tuple[EcmwfArchiveFile, ...]
    missing: tuple[str, ...]

    @property
    def resolution_dir(self) -> str:
        return str(self.parameters["resolution_dir"])

    def path(self, init_time: datetime, stream: Stream, step: int) -> Path:
        return self.root / ecmwf_file_path(init_time, stream, step, self.resolution_dir)

    def message(self, init_time: datetime, stream: Stream, step: int, key: EcmwfMessageKey) -> bytes | None:
        """The bytes of one message, found through the file's `.index`; None if the file or message is absent."""
        path = self.path(init_time, stream, step)
        if not path.exists():
            return None
        entry = EcmwfIndex.parse(Path(index_path(str(path))).read_text()).find(key)
        if entry is None:
            return None
        with open(path, "rb") as f:
            f.seek(entry.offset)
            return f.read(entry.length)


def generate_ecmwf_archive(
    init_times: Iterable[datetime],
    steps: Iterable[int],
    *,
    members: Iterable[int] = ENS_MEMBERS,
    params: Iterable[str] | None = None,
    grid: GridSpec | None = None,
    control_in_oper_from: datetime = IFS_50R1_FIRST_INIT,
    oper_before_switch: bool = True,
    filler_ratio: float = 0.5,
    missing: Iterable[tuple[datetime, Stream, int]] = (),
    packing: PackingType = "grid_ccsds",
    cache_dir: Path | None = None,
    workers: int = 1,
) -> EcmwfArchiveManifest:
    """Build (or reuse from the cache) an ECMWF-layout archive. `missing` (init, stream, step) files are left out;
    `oper` files are written for every init (before the switch only with `oper_before_switch`)."""
    inits = sorted(init_times)
    step_list = sorted(set(steps))
    member_list = sorted(set(members))
    names = [ecmwf_variable(p).param for p in (params if params is not None else _BY_PARAM)]
    the_grid = grid or ecmwf_grid(0.25)
    missing_set = {(m[0], m[1], m[2]) for m in missing}
    parameters: dict[str, Any] = {
        "init_times": [t.isoformat() for t in inits],
        "steps": step_list,
        "members": member_list,
        "params": names,
        "grid": the_grid.model_dump(),
        "resolution_dir": resolution_dir(the_grid),
        "control_in_oper_from": control_in_oper_from.isoformat(),
        "oper_before_switch": oper_before_switch,
        "filler_ratio": filler_ratio,
        "missing": sorted(f"{t.isoformat()}/{s}/{step}" for t, s, step in missing_set),
        "packing": packing,
    }
    key = hashlib.sha256(json.dumps({"v": ECMWF_GENERATOR_VERSION, **parameters}, sort_keys=True).encode()).hexdigest()[
        :20
    ]
    cache = cache_dir or default_cache_dir()
    final = cache / f"ecmwf-v{ECMWF_GENERATOR_VERSION}-{key}"
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        return EcmwfArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    try:
        jobs = []
        for init in inits:
            streams: list[Stream] = ["enfo"]
            if init >= control_in_oper_from or oper_before_switch:
                streams.append("oper")
            for stream in streams:
                for step in step_list:
                    if (init, stream, step) in missing_set:
                        continue
                    if stream == "enfo" and not _members_in("enfo", init, member_list, control_in_oper_from):
                        continue
                    jobs.append(
                        (
                            str(tmp),
                            init,
                            stream,
                            step,
                            names,
                            member_list,
                            the_grid,
                            control_in_oper_from,
                            filler_ratio,
                            packing,
                        )
                    )
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_build_file, *zip(*jobs, strict=True)))
        else:
            results = [_build_file(*job) for job in jobs]
        files = tuple(
            EcmwfArchiveFile(
                path=relative, init_time=job[1], stream=job[2], step=job[3], size=size, index_size=index_size
            )
            for job, (relative, size, index_size) in zip(jobs, results, strict=True)
        )
        manifest = EcmwfArchiveManifest(
            root=final,
            generator_version=ECMWF_GENERATOR_VERSION,
            parameters=parameters,
            files=files,
            missing=tuple(ecmwf_file_path(t, s, step, resolution_dir(the_grid)) for t, s, step in sorted(missing_set)),
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not manifest_path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return EcmwfArchiveManifest.model_validate_json(manifest_path.read_text()).model_copy(update={"root": final})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
