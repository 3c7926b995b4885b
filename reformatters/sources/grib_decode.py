"""Decode single GRIB2 messages with ecCodes into float32 arrays, checking the grid they are on."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import eccodes
import numpy as np
import numpy.typing as npt
from gribapi import gribapi as _gribapi  # ecCodes' own cffi binding: the C call that fills a caller's buffer
from pydantic import BaseModel, ConfigDict

from reformatters.sources.errors import SourceGridError, SourceUnreadableError


class GribDecodeError(SourceUnreadableError, ValueError):
    """The bytes are not a decodable GRIB message."""


class GridMismatchError(SourceGridError, ValueError):
    """A message is not on the grid the dataset expects."""


class GridSpec(BaseModel):
    """A regular lat/lon grid as GRIB2 section 3 describes it (degrees, first/last *grid point*)."""

    model_config = ConfigDict(frozen=True)

    ni: int
    nj: int
    latitude_of_first_grid_point: float
    longitude_of_first_grid_point: float
    latitude_of_last_grid_point: float
    longitude_of_last_grid_point: float
    i_scans_negatively: bool = False
    j_scans_positively: bool = False
    # Roll 0..360 longitudes so the first column is -180 (GFS: 720 columns at 0.25°).
    roll_longitude_to_180: bool = False
    # Take the first (and so the last) longitude from each message instead of checking it (ECMWF has published
    # both -180 and 0); the roll to -180 then follows the message.
    first_longitude_from_message: bool = False
    tolerance_degrees: float = 1e-4

    def with_first_longitude(self, longitude: float) -> GridSpec:
        """This grid starting at `longitude` (degrees east), its span unchanged."""
        span = self.longitude_of_last_grid_point - self.longitude_of_first_grid_point
        return self.model_copy(
            update={"longitude_of_first_grid_point": longitude, "longitude_of_last_grid_point": longitude + span}
        )

    @classmethod
    def global_regular(cls, resolution: float, *, roll_longitude_to_180: bool = False) -> GridSpec:
        """NCEP global layout: lat 90 → -90, lon 0 → 360 - resolution."""
        ni = round(360 / resolution)
        nj = round(180 / resolution) + 1
        return cls(
            ni=ni,
            nj=nj,
            latitude_of_first_grid_point=90.0,
            longitude_of_first_grid_point=0.0,
            latitude_of_last_grid_point=-90.0,
            longitude_of_last_grid_point=360.0 - resolution,
            roll_longitude_to_180=roll_longitude_to_180,
        )

    @property
    def longitude_step(self) -> float:
        span = (self.longitude_of_last_grid_point - self.longitude_of_first_grid_point) % 360
        return span / (self.ni - 1)

    @property
    def roll_columns(self) -> int:
        """Columns to roll so the first column is at -180 (0 when not rolling)."""
        if not self.roll_longitude_to_180:
            return 0
        first = self.longitude_of_first_grid_point % 360
        target = 180.0  # -180 == 180 east
        return (-round(((target - first) % 360) / self.longitude_step)) % self.ni

    def latitudes(self) -> np.ndarray:
        return np.linspace(self.latitude_of_first_grid_point, self.latitude_of_last_grid_point, self.nj)

    def longitudes(self) -> np.ndarray:
        lons = self.longitude_of_first_grid_point + self.longitude_step * np.arange(self.ni)
        if self.roll_longitude_to_180:
            lons = np.roll(lons, self.roll_columns)
            lons = (lons + 180.0) % 360.0 - 180.0
        return lons


class LambertConformalGridSpec(BaseModel):
    """A Lambert conformal grid as GRIB2 template 3.30 describes it (degrees, metres, spherical earth).

    Decoded fields keep the message's scanning order (rows south to north when `j_scans_positively`).
    """

    model_config = ConfigDict(frozen=True)

    ni: int
    nj: int
    latitude_of_first_grid_point: float
    longitude_of_first_grid_point: float
    lov: float  # longitude of the meridian parallel to the y axis, degrees east
    lad: float  # latitude where dx and dy are specified
    latin1: float
    latin2: float
    dx_metres: float
    dy_metres: float
    earth_radius_metres: float
    i_scans_negatively: bool = False
    j_scans_positively: bool = True
    tolerance_degrees: float = 1e-4

    roll_columns: ClassVar[int] = 0

    def proj4(self) -> str:
        lon0 = (self.lov + 180.0) % 360.0 - 180.0
        return (
            f"+proj=lcc +lat_0={self.lad:g} +lon_0={lon0:g} +lat_1={self.latin1:g} +lat_2={self.latin2:g} "
            f"+R={self.earth_radius_metres:g} +units=m +no_defs"
        )


_LAMBERT_KEYS = {
    "ni": "Nx",
    "nj": "Ny",
    "latitude_of_first_grid_point": "latitudeOfFirstGridPointInDegrees",
    "longitude_of_first_grid_point": "longitudeOfFirstGridPointInDegrees",
    "lov": "LoVInDegrees",
    "lad": "LaDInDegrees",
    "latin1": "Latin1InDegrees",
    "latin2": "Latin2InDegrees",
    "dx_metres": "DxInMetres",
    "dy_metres": "DyInMetres",
    "earth_radius_metres": "radius",
    "i_scans_negatively": "iScansNegatively",
    "j_scans_positively": "jScansPositively",
}

_GRID_KEYS = {
    "ni": "Ni",
    "nj": "Nj",
    "latitude_of_first_grid_point": "latitudeOfFirstGridPointInDegrees",
    "longitude_of_first_grid_point": "longitudeOfFirstGridPointInDegrees",
    "latitude_of_last_grid_point": "latitudeOfLastGridPointInDegrees",
    "longitude_of_last_grid_point": "longitudeOfLastGridPointInDegrees",
    "i_scans_negatively": "iScansNegatively",
    "j_scans_positively": "jScansPositively",
}

_INFO_KEYS = (
    "edition",
    "centre",
    "shortName",
    "name",
    "units",
    "discipline",
    "parameterCategory",
    "parameterNumber",
    "typeOfLevel",
    "level",
    "stepType",
    "stepRange",
    "startStep",
    "endStep",
    "dataDate",
    "dataTime",
    "gridType",
    "Ni",
    "Nj",
    "productDefinitionTemplateNumber",
    "dataRepresentationTemplateNumber",
    "packingType",
    "bitmapPresent",
    "bitsPerValue",
    "totalLength",
)


def _new_handle(message: bytes) -> Any:
    if not (message[:4] == b"GRIB" and message[-4:] == b"7777"):
        raise GribDecodeError(
            f"not a single GRIB message: {len(message)} bytes starting {message[:16]!r} and ending {message[-8:]!r}; "
            "expected bytes starting with b'GRIB' and ending with b'7777' (check the byte range)"
        )
    try:
        return eccodes.codes_new_from_message(message)
    except eccodes.GribInternalError as e:
        raise GribDecodeError(f"ecCodes cannot read the {len(message)}-byte message: {e}") from e


def _get(handle: Any, key: str) -> Any:
    try:
        return eccodes.codes_get(handle, key)
    except eccodes.KeyValueNotFoundError:
        return None


def message_keys(message: bytes) -> dict[str, Any]:
    """Descriptive keys of one message (shortName, typeOfLevel, level, stepRange, packing, grid size...)."""
    handle = _new_handle(message)
    try:
        return {key: _get(handle, key) for key in _INFO_KEYS}
    finally:
        eccodes.codes_release(handle)


def _check_grid(handle: Any, grid: GridSpec | LambertConformalGridSpec) -> None:
    found: dict[str, Any] = {}
    mismatched: list[str] = []
    grid_type = _get(handle, "gridType")
    expected_type, keys = ("regular_ll", _GRID_KEYS) if isinstance(grid, GridSpec) else ("lambert", _LAMBERT_KEYS)
    if grid_type != expected_type:
        raise GridMismatchError(f"expected a {expected_type} grid {grid.ni}x{grid.nj}, found gridType={grid_type!r}")
    for field, key in keys.items():
        want = getattr(grid, field)
        got = _get(handle, key)
        found[field] = got
        if isinstance(want, bool):
            ok = bool(got) == want
        elif isinstance(want, int):
            ok = got == want
        elif field.startswith("longitude") or field == "lov":
            ok = got is not None and abs(((float(got) - want + 180) % 360) - 180) <= grid.tolerance_degrees
        elif field.endswith("metres"):
            ok = got is not None and abs(float(got) - want) <= 1e-3
        else:
            ok = got is not None and abs(float(got) - want) <= grid.tolerance_degrees
        if not ok:
            mismatched.append(f"{field}: expected {want}, found {got}")
    if mismatched:
        raise GridMismatchError(
            "message grid differs from the expected grid: "
            + "; ".join(mismatched)
            + f" (shortName={_get(handle, 'shortName')}, stepRange={_get(handle, 'stepRange')}). "
            "Check the source product/resolution or update the dataset's GridSpec."
        )


def decode_message(
    message: bytes,
    grid: GridSpec | LambertConformalGridSpec | None = None,
    *,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Decode one GRIB2 message to a float32 array of shape (nj, ni), NaN where the bitmap marks missing values.

    With `grid`, the message's grid is checked first (GridMismatchError) and, when asked, rolled so longitudes run
    -180..180. With `out` (float32, shape (nj, ni), any strides: a field's place in a larger buffer), the values
    go straight there and `out` is returned; if decoding fails, `out` may hold part of a field. Any packing
    ecCodes supports works (5.0 simple, 5.3 complex + spatial differencing, 5.40 JPEG 2000, 5.42 CCSDS).
    """
    handle = _new_handle(message)
    try:
        if isinstance(grid, GridSpec) and grid.first_longitude_from_message:
            first = _get(handle, "longitudeOfFirstGridPointInDegrees")
            if first is None:
                raise GridMismatchError(f"expected a regular_ll grid {grid.ni}x{grid.nj}, found no first longitude")
            grid = grid.with_first_longitude(float(first))
        if grid is not None:
            _check_grid(handle, grid)
        ni = eccodes.codes_get(handle, "Ni")
        nj = eccodes.codes_get(handle, "Nj")
        if ni is None or nj is None or ni <= 0 or nj <= 0:
            raise GribDecodeError(f"message has no regular Ni x Nj grid (Ni={ni}, Nj={nj})")
        if out is None:
            out = np.empty((nj, ni), dtype=np.float32)
        elif out.shape != (nj, ni) or out.dtype != np.float32:
            raise ValueError(f"out is {out.dtype} {out.shape}; this message decodes to float32 {(nj, ni)}")
        # ecCodes returns values in the message's scanning order; rows are j, columns i (no alternating rows here).
        values = _decode_values(handle, nj * ni, len(message)).reshape(nj, ni)
        if eccodes.codes_get(handle, "bitmapPresent"):
            missing = eccodes.codes_get(handle, "missingValue")
            np.copyto(values, np.nan, where=values == missing)
    finally:
        eccodes.codes_release(handle)
    shift = grid.roll_columns if grid is not None else 0
    # The float64 -> float32 cast, the longitude roll and the placement are one pass over the field.
    out[:, shift:] = values[:, : ni - shift]
    out[:, :shift] = values[:, ni - shift :]
    return out


_scratch = threading.local()
# The binding's own cffi objects; should an ecCodes release move them, decoding falls back to its public call.
_FILLS_CALLERS_BUFFER = all(hasattr(_gribapi, name) for name in ("ffi", "lib", "get_handle")) and hasattr(
    getattr(_gribapi, "lib", None), "grib_get_double_array"
)


def _decode_values(handle: Any, count: int, message_bytes: int) -> npt.NDArray[np.float64]:
    """The message's `count` values as float64, in a buffer this thread reuses for every message.

    ecCodes' Python call allocates a fresh float64 array per message; at 8 MB per 0.25° field, glibc hands
    that memory back and faults it in again each time: 17-21 ms per GFS field against 10-11 ms decoding into
    a reused buffer (measured on this project's 2-core VM, a third of that time in page faults).
    """
    if not _FILLS_CALLERS_BUFFER:
        try:
            return np.asarray(eccodes.codes_get_values(handle), dtype=np.float64)
        except eccodes.GribInternalError as e:
            raise _undecodable(message_bytes, str(e)) from e
    buffer: npt.NDArray[np.float64] | None = getattr(_scratch, "values", None)
    if buffer is None or buffer.size < count:
        buffer = np.empty(count, dtype=np.float64)
        _scratch.values = buffer
    values = buffer[:count]
    length = _gribapi.ffi.new("size_t*", count)
    pointer = _gribapi.ffi.cast("double *", values.ctypes.data)
    error = _gribapi.lib.grib_get_double_array(_gribapi.get_handle(handle), b"values", pointer, length)
    if error:
        raise _undecodable(message_bytes, _gribapi.ffi.string(_gribapi.lib.grib_get_error_message(error)).decode())
    if length[0] != count:
        raise GribDecodeError(f"the message holds {length[0]} values for its {count}-point grid")
    return values


def _undecodable(message_bytes: int, reason: str) -> GribDecodeError:
    return GribDecodeError(
        f"ecCodes cannot decode the data of the {message_bytes}-byte message: {reason} (truncated or corrupt?)"
    )
