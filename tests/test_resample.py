"""Resampling between regular lat/lon grids, against computations made point by point from coordinates."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from reformatters.common.resample import ResamplePlan, regular_global_plan


def _grid(resolution: float, *, west_first: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    lat = np.linspace(90.0, -90.0, round(180 / resolution) + 1)
    lon = west_first + np.arange(round(360 / resolution)) * resolution
    return lat, lon


def _east_distance(a: float, b: float) -> float:
    """Degrees from longitude a eastward to longitude b, in [0, 360)."""
    return (b - a) % 360.0


def bilinear_by_corners(
    field: npt.NDArray[np.float64],
    src_lat: npt.NDArray[np.float64],
    src_lon: npt.NDArray[np.float64],
    lat: float,
    lon: float,
) -> float:
    """The textbook four-corner bilinear value, found by searching the source coordinates for the enclosing cell."""
    north = max(i for i in range(src_lat.size) if src_lat[i] >= lat - 1e-12)
    south = min(north + 1, src_lat.size - 1)
    west = min(range(src_lon.size), key=lambda j: _east_distance(src_lon[j], lon))
    east = (west + 1) % src_lon.size
    dlat = src_lat[north] - src_lat[south]
    t = 0.0 if dlat == 0 else (src_lat[north] - lat) / dlat
    u = _east_distance(src_lon[west], lon) / _east_distance(src_lon[west], src_lon[east])
    corners = [
        ((north, west), (1 - t) * (1 - u)),
        ((north, east), (1 - t) * u),
        ((south, west), t * (1 - u)),
        ((south, east), t * u),
    ]
    return float(sum(weight * field[index] for index, weight in corners if weight != 0))


def nearest_by_distance(
    field: npt.NDArray[np.float64],
    src_lat: npt.NDArray[np.float64],
    src_lon: npt.NDArray[np.float64],
    lat: float,
    lon: float,
) -> float:
    """The nearest source point by latitude and by (wrapped) longitude; a tie goes north, and west."""
    lat_distance = np.abs(src_lat - lat)
    rows = np.nonzero(np.isclose(lat_distance, lat_distance.min(), atol=1e-12))[0]
    row = rows[np.argmax(src_lat[rows])]
    signed = (src_lon - lon + 180.0) % 360.0 - 180.0
    columns = np.nonzero(np.isclose(np.abs(signed), np.abs(signed).min(), atol=1e-12))[0]
    column = columns[np.argmin(signed[columns])]  # the western one (negative offset) of a tie
    return float(field[row, column])


@pytest.mark.parametrize(("source_res", "target_res"), [(2.0, 1.0), (3.0, 1.0), (1.5, 1.0)])
def test_bilinear_equals_the_four_corner_form_with_longitude_wrap(source_res: float, target_res: float) -> None:
    src_lat, src_lon = _grid(source_res, west_first=0.0)
    dst_lat, dst_lon = _grid(target_res, west_first=-180.0)
    rng = np.random.default_rng(4)
    field = rng.normal(280.0, 15.0, (src_lat.size, src_lon.size)).astype(np.float32)
    plan = ResamplePlan.between(src_lat, src_lon, dst_lat, dst_lon)
    out = plan.bilinear(field)
    rows = sorted({*range(0, dst_lat.size, 7), dst_lat.size - 1})  # every column, a sample of rows and both poles
    expected = np.array(
        [
            [bilinear_by_corners(field.astype(np.float64), src_lat, src_lon, dst_lat[i], x) for x in dst_lon]
            for i in rows
        ]
    )
    # float32 arithmetic in two passes: a few units in the last place.
    np.testing.assert_allclose(out[rows], expected, rtol=5e-7, atol=0)
    # Just west of 0 E the cell runs from the last source column to the first one (the wrap).
    wrapped = int(np.argmin(np.abs(dst_lon - (-target_res))))
    assert plan.columns.lower[wrapped] == src_lon.size - 1 and plan.columns.upper[wrapped] == 0


def test_points_on_source_points_keep_their_value_even_beside_nan() -> None:
    src_lat, src_lon = _grid(0.5, west_first=0.0)
    rng = np.random.default_rng(7)
    field = rng.normal(0.0, 1.0, (src_lat.size, src_lon.size)).astype(np.float32)
    field[100, 200] = np.nan
    out = regular_global_plan(0.5, 0.25).bilinear(field)
    # Target (2i, 2k + 720 mod 1440) is source (i, k): -180 + 0.25 * (2k + 720) = 0.5 k.
    coinciding = out[::2, :][:, np.r_[720:1440:2, 0:720:2]]
    np.testing.assert_array_equal(coinciding, field)
    # NaN reaches the points whose cell uses it with a non-zero weight, and no others.
    row, column = 200, (2 * 200 + 720) % 1440
    assert np.isnan(out[row, column])
    assert np.isnan(out[row + 1, column]) and np.isnan(out[row, column + 1]) and np.isnan(out[row - 1, column - 1])
    assert not np.isnan(out[row + 2, column]) and not np.isnan(out[row, column + 2])
    assert np.count_nonzero(np.isnan(out)) == 9


@pytest.mark.parametrize(("source_res", "target_res"), [(2.0, 1.0), (3.0, 1.0), (0.5, 0.25)])
def test_nearest_picks_the_nearest_source_point_ties_north_and_west(source_res: float, target_res: float) -> None:
    src_lat, src_lon = _grid(source_res, west_first=0.0)
    dst_lat, dst_lon = _grid(target_res, west_first=-180.0)
    field = np.arange(src_lat.size * src_lon.size, dtype=np.float32).reshape(src_lat.size, src_lon.size)
    out = ResamplePlan.between(src_lat, src_lon, dst_lat, dst_lon).nearest(field)
    step = max(1, dst_lat.size // 37)  # a sample of rows keeps the brute force quick on the 0.25 degree grid
    for i in range(0, dst_lat.size, step):
        for j in range(0, dst_lon.size, max(1, dst_lon.size // 97)):
            assert out[i, j] == nearest_by_distance(field.astype(np.float64), src_lat, src_lon, dst_lat[i], dst_lon[j])
    # Categorical values stay categorical.
    flags = (field % 3 == 0).astype(np.float32)
    assert set(np.unique(ResamplePlan.between(src_lat, src_lon, dst_lat, dst_lon).nearest(flags))) <= {0.0, 1.0}


def test_writes_into_a_strided_out_and_refuses_other_shapes() -> None:
    plan = regular_global_plan(2.0, 1.0)
    field = np.ones((91, 180), dtype=np.float32)
    padded = np.full((200, 400), -1.0, dtype=np.float32)
    plan.bilinear(field, out=padded[:181, :360])
    assert (padded[:181, :360] == 1.0).all() and (padded[181:] == -1.0).all() and (padded[:, 360:] == -1.0).all()
    with pytest.raises(ValueError, match="out has shape"):
        plan.bilinear(field, out=np.empty((180, 360), dtype=np.float32))
    with pytest.raises(ValueError, match="a field of shape"):
        plan.nearest(np.ones((90, 180), dtype=np.float32))
    with pytest.raises(ValueError, match="does not extrapolate"):
        ResamplePlan.between(np.linspace(80, -80, 9), np.arange(0, 360, 45), [85.0], [0.0])
    with pytest.raises(ValueError, match="once around the globe"):
        ResamplePlan.between(np.linspace(90, -90, 9), np.arange(0, 180, 45), [0.0], [0.0])
