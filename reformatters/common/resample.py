"""Resample fields between regular latitude/longitude grids: bilinear (continuous fields) or nearest neighbour
(categorical fields), with longitude wrapping around the globe.

A `ResamplePlan` is computed once per pair of grids (positions and weights) and applied to each field;
applying it writes into a caller's array (a field's place in a region buffer) and allocates one source-sized
intermediate. Target points that coincide with source points get the source value unchanged, whatever their
neighbours hold; elsewhere a bilinear value is NaN when a source point with non-zero weight is NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FULL_CIRCLE = 360.0
# Positions this close to a source point count as on it (degrees / spacing); grids here are multiples of 1e-3.
_ON_POINT = 1e-9


def _regular_spacing(values: npt.NDArray[np.float64], name: str) -> float:
    if values.size < 2:
        raise ValueError(f"{name}: a regular axis needs at least two points, got {values.size}")
    steps = np.diff(values)
    if not np.allclose(steps, steps[0], rtol=0, atol=1e-9 * max(1.0, abs(float(steps[0])))):
        raise ValueError(f"{name}: expected a regular axis (constant spacing), found spacings {np.unique(steps)[:4]}")
    return float(steps[0])


def latitude_positions(source: npt.ArrayLike, target: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Fractional source row of each target latitude (source ascending or descending, no extrapolation)."""
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    step = _regular_spacing(src, "source latitude")
    positions = (dst - src[0]) / step
    outside = (positions < -_ON_POINT) | (positions > src.size - 1 + _ON_POINT)
    if outside.any():
        raise ValueError(
            f"target latitudes {dst[outside][:4]} lie outside the source's {src[0]}..{src[-1]}; "
            "resampling does not extrapolate: choose a target grid inside the source's"
        )
    clipped: npt.NDArray[np.float64] = np.clip(positions, 0, src.size - 1)
    return clipped


def longitude_positions(source: npt.ArrayLike, target: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Fractional source column of each target longitude on a source that goes once around the globe eastward."""
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    step = _regular_spacing(src, "source longitude")
    if step <= 0 or not np.isclose(step * src.size, FULL_CIRCLE, rtol=0, atol=1e-6):
        raise ValueError(
            f"source longitudes must run eastward once around the globe ({src.size} points x {step} degrees "
            f"= {step * src.size}, expected {FULL_CIRCLE}) for longitude wrap"
        )
    positions: npt.NDArray[np.float64] = ((dst - src[0]) % FULL_CIRCLE) / step
    # A target a hair west of the first column wraps to just below src.size: that is column 0.
    positions[positions > src.size - _ON_POINT] = 0.0
    return positions


@dataclass(frozen=True)
class AxisPlan:
    """Per target index along one axis: the two source indices around it and the weight of the second one."""

    lower: npt.NDArray[np.intp]
    upper: npt.NDArray[np.intp]
    weight: npt.NDArray[np.float32]  # of `upper`; 0 where the target lies on `lower`
    nearest: npt.NDArray[np.intp]

    @classmethod
    def from_positions(cls, positions: npt.NDArray[np.float64], size: int, *, periodic: bool) -> AxisPlan:
        lower = np.floor(positions + _ON_POINT).astype(np.intp)
        fraction = positions - lower
        fraction[np.abs(fraction) < _ON_POINT] = 0.0
        lower = np.clip(lower, 0, size - 1)
        upper = (lower + 1) % size if periodic else np.minimum(lower + 1, size - 1)
        # Ties (a target halfway between two source points) go to the lower index: north and west here.
        nearest = np.where(fraction > 0.5 + _ON_POINT, upper, lower)
        return cls(lower, upper, fraction.astype(np.float32), nearest.astype(np.intp))


@dataclass(frozen=True)
class ResamplePlan:
    """How to resample fields of shape `source_shape` (lat, lon) to `target_shape`."""

    source_shape: tuple[int, int]
    rows: AxisPlan
    columns: AxisPlan

    @property
    def target_shape(self) -> tuple[int, int]:
        return (self.rows.lower.size, self.columns.lower.size)

    @classmethod
    def between(
        cls,
        source_latitudes: npt.ArrayLike,
        source_longitudes: npt.ArrayLike,
        target_latitudes: npt.ArrayLike,
        target_longitudes: npt.ArrayLike,
    ) -> ResamplePlan:
        src_lat = np.asarray(source_latitudes, dtype=np.float64)
        src_lon = np.asarray(source_longitudes, dtype=np.float64)
        rows = AxisPlan.from_positions(latitude_positions(src_lat, target_latitudes), src_lat.size, periodic=False)
        columns = AxisPlan.from_positions(longitude_positions(src_lon, target_longitudes), src_lon.size, periodic=True)
        return cls((src_lat.size, src_lon.size), rows, columns)

    def _check(self, field: npt.NDArray[np.float32], out: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32]:
        if field.shape != self.source_shape:
            raise ValueError(f"a field of shape {field.shape} for a plan from {self.source_shape}")
        if out is None:
            return np.empty(self.target_shape, dtype=np.float32)
        if out.shape != self.target_shape:
            raise ValueError(f"out has shape {out.shape}; this plan resamples to {self.target_shape}")
        return out

    def bilinear(
        self, field: npt.NDArray[np.float32], out: npt.NDArray[np.float32] | None = None
    ) -> npt.NDArray[np.float32]:
        """Bilinear interpolation, latitude first then longitude (the same weights as the four-corner form)."""
        out = self._check(field, out)
        rows = _interpolate(field, self.rows, axis=0)
        out[...] = _interpolate(rows, self.columns, axis=1)
        return out

    def nearest(
        self, field: npt.NDArray[np.float32], out: npt.NDArray[np.float32] | None = None
    ) -> npt.NDArray[np.float32]:
        """The value of the nearest source point (ties to the north and to the west)."""
        out = self._check(field, out)
        out[...] = field[np.ix_(self.rows.nearest, self.columns.nearest)]
        return out


def _interpolate(values: npt.NDArray[np.float32], plan: AxisPlan, axis: int) -> npt.NDArray[np.float32]:
    result = np.take(values, plan.lower, axis=axis)
    between = np.nonzero(plan.weight > 0)[0]
    if between.size:
        weight = plan.weight[between]
        shape = (-1, 1) if axis == 0 else (1, -1)
        first = np.take(values, plan.lower[between], axis=axis)
        second = np.take(values, plan.upper[between], axis=axis)
        mixed = first * (np.float32(1) - weight).reshape(shape) + second * weight.reshape(shape)
        if axis == 0:
            result[between] = mixed
        else:
            result[:, between] = mixed
    return result


@functools.lru_cache(maxsize=16)
def regular_global_plan(source_resolution: float, target_resolution: float) -> ResamplePlan:
    """Between two NCEP-layout global grids (latitude 90 -> -90, source longitude 0 -> 360 - resolution), to a
    target whose longitudes run -180 -> 180 - resolution."""
    source_lat = np.linspace(90.0, -90.0, round(180 / source_resolution) + 1)
    source_lon = np.arange(round(360 / source_resolution)) * source_resolution
    target_lat = np.linspace(90.0, -90.0, round(180 / target_resolution) + 1)
    target_lon = -180.0 + np.arange(round(360 / target_resolution)) * target_resolution
    return ResamplePlan.between(source_lat, source_lon, target_lat, target_lon)
