import json
from pathlib import Path

import eccodes
import numpy as np
import pytest

from reformatters.sources.grib_decode import GribDecodeError, GridMismatchError, GridSpec, decode_message, message_keys
from reformatters.sources.grib_index import find_message, parse_ncep_idx
from reformatters.testing.noaa_archive import COARSE_GRID, ArchiveManifest, expected_values, generate_gfs_archive

from .conftest import INIT

VARIABLES = {
    "temperature_2m": ("TMP", "2 m above ground", "7 hour fcst"),
    "geopotential_height_cloud_ceiling": ("HGT", "cloud ceiling", "7 hour fcst"),  # has bitmap-missing points
    "precipitation_surface": ("APCP", "surface", "0-7 hour acc fcst"),
    "downward_short_wave_radiation_flux_surface": ("DSWRF", "surface", "6-7 hour ave fcst"),
}


def _message(m: ArchiveManifest, fields: tuple[str, str, str]) -> bytes:
    path = m.path(INIT, 7)
    e = find_message(parse_ncep_idx(Path(str(path) + ".idx").read_text()), *fields)
    return path.read_bytes()[e.start : e.end]


@pytest.mark.parametrize(
    ("packing", "template"),
    [("grid_simple", 0), ("grid_complex_spatial_differencing", 3), ("grid_ccsds", 42), ("grid_jpeg", 40)],
)
def test_decode_equals_expected_within_packing_precision(
    tmp_path_factory: pytest.TempPathFactory, packing: str, template: int
) -> None:
    m = generate_gfs_archive(
        [INIT],
        [7],
        variables=list(VARIABLES),
        grid=COARSE_GRID,
        filler_ratio=0.0,
        packing=packing,  # type: ignore[arg-type]
        cache_dir=tmp_path_factory.mktemp("dec"),
    )
    for name, fields in VARIABLES.items():
        msg = _message(m, fields)
        keys = message_keys(msg)
        assert keys["dataRepresentationTemplateNumber"] == template
        got = decode_message(msg, COARSE_GRID)
        want = expected_values(name, INIT, 7, fields[2], grid=COARSE_GRID)
        assert got.dtype == np.float32 and got.shape == (181, 360)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        step = 2.0 ** keys_scale(msg)[0] * 10.0 ** -keys_scale(msg)[1]
        err = np.nanmax(np.abs(got - want))
        assert err <= step + 1e-4 * np.nanmax(np.abs(want)), (name, packing, err, step)
    hgt = decode_message(_message(m, VARIABLES["geopotential_height_cloud_ceiling"]))
    assert 0 < np.isnan(hgt).sum() < hgt.size


def keys_scale(msg: bytes) -> tuple[int, int]:
    h = eccodes.codes_new_from_message(msg)
    try:
        return eccodes.codes_get(h, "binaryScaleFactor"), eccodes.codes_get(h, "decimalScaleFactor")
    finally:
        eccodes.codes_release(h)


def test_grid_mismatch_and_roll(small_archive: ArchiveManifest) -> None:
    msg = _message(small_archive, VARIABLES["temperature_2m"])
    with pytest.raises(GridMismatchError, match=r"ni: expected 1440, found 360.*nj: expected 721, found 181"):
        decode_message(msg, GridSpec.global_regular(0.25))
    shifted = COARSE_GRID.model_copy(update={"longitude_of_first_grid_point": 1.0})
    with pytest.raises(GridMismatchError, match=r"longitude_of_first_grid_point: expected 1.0, found 0"):
        decode_message(msg, shifted)

    rolled_grid = GridSpec.global_regular(1.0, roll_longitude_to_180=True)
    plain = decode_message(msg, COARSE_GRID)
    rolled = decode_message(msg, rolled_grid)
    assert rolled_grid.roll_columns == 180
    np.testing.assert_array_equal(rolled[:, :180], plain[:, 180:])
    np.testing.assert_array_equal(rolled[:, 180:], plain[:, :180])
    lons = rolled_grid.longitudes()
    assert lons[0] == -180.0 and lons[-1] == 179.0 and np.all(np.diff(lons) == 1.0)
    assert GridSpec.global_regular(0.25, roll_longitude_to_180=True).roll_columns == 720


def test_message_keys_and_bad_bytes(small_archive: ArchiveManifest) -> None:
    msg = _message(small_archive, ("APCP", "surface", "6-7 hour acc fcst"))
    keys = message_keys(msg)
    assert (keys["shortName"], keys["typeOfLevel"], keys["stepRange"], keys["stepType"]) == (
        "tp",
        "surface",
        "6-7",
        "accum",
    )
    assert keys["dataRepresentationTemplateNumber"] == 3 and keys["centre"] == "kwbc"
    with pytest.raises(GribDecodeError, match="expected bytes starting with b'GRIB'"):
        decode_message(b"<html>throttled</html>")
    with pytest.raises(GribDecodeError):
        decode_message(msg[:-10] + b"7777")


def test_real_ecmwf_file_decodes_exactly_like_eccodes(fixtures_dir: Path) -> None:
    grib = fixtures_dir / "ecmwf/s2s_control_2026-08-10T00Z.grib2"
    data = grib.read_bytes()
    records = [
        json.loads(line)
        for line in (fixtures_dir / "ecmwf/s2s_control_2026-08-10T00Z.grib2.index").read_text().splitlines()
    ]
    reference: list[np.ndarray] = []
    with open(grib, "rb") as f:
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            values = eccodes.codes_get_values(h).reshape(eccodes.codes_get(h, "Nj"), eccodes.codes_get(h, "Ni"))
            if eccodes.codes_get(h, "bitmapPresent"):  # ecCodes marks bitmap-missing points with missingValue
                missing = values == eccodes.codes_get(h, "missingValue")
                assert missing.sum() == eccodes.codes_get(h, "numberOfMissing") > 0
                values = np.where(missing, np.nan, values)
            reference.append(values)
            eccodes.codes_release(h)
    assert len(records) == len(reference) == 11
    grid = GridSpec(
        ni=240,
        nj=121,
        latitude_of_first_grid_point=90,
        longitude_of_first_grid_point=0,
        latitude_of_last_grid_point=-90,
        longitude_of_last_grid_point=358.5,
    )
    for rec, ref in zip(records, reference, strict=True):
        msg = data[rec["offset"] : rec["offset"] + rec["length"]]
        got = decode_message(msg, grid)
        assert message_keys(msg)["dataRepresentationTemplateNumber"] == 0
        np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_decode_into_a_view_of_a_larger_buffer(small_archive: ArchiveManifest) -> None:
    rolled_grid = GridSpec.global_regular(1.0, roll_longitude_to_180=True)
    for fields in (VARIABLES["temperature_2m"], VARIABLES["geopotential_height_cloud_ceiling"]):
        msg = _message(small_archive, fields)
        for grid in (COARSE_GRID, rolled_grid):
            expected = decode_message(msg, grid)
            buffer = np.full((3, 185, 366), -1.0, dtype=np.float32)  # padded like a region buffer
            view = buffer[1, :181, :360]
            assert decode_message(msg, grid, out=view) is view
            np.testing.assert_array_equal(view, expected)
            untouched = np.ones(buffer.shape, dtype=bool)
            untouched[1, :181, :360] = False
            assert (buffer[untouched] == -1.0).all()
        if fields == VARIABLES["geopotential_height_cloud_ceiling"]:
            assert 0 < np.isnan(view).sum() < view.size  # the bitmap's missing points arrive as NaN
    with pytest.raises(ValueError, match=r"out is float32 \(181, 361\); this message decodes to float32 \(181, 360\)"):
        decode_message(msg, COARSE_GRID, out=np.empty((181, 361), dtype=np.float32))
    with pytest.raises(ValueError, match="out is float64"):
        decode_message(msg, COARSE_GRID, out=np.empty((181, 360)))  # type: ignore[arg-type]


def test_decoding_without_the_bindings_buffer_call_gives_the_same_values(
    small_archive: ArchiveManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reformatters.sources import grib_decode

    msg = _message(small_archive, VARIABLES["geopotential_height_cloud_ceiling"])
    fast = decode_message(msg, COARSE_GRID)
    truncated = msg[: len(msg) // 2] + b"7777"
    with pytest.raises(GribDecodeError, match="cannot decode the data"):
        decode_message(truncated)
    monkeypatch.setattr(grib_decode, "_FILLS_CALLERS_BUFFER", False)
    np.testing.assert_array_equal(decode_message(msg, COARSE_GRID), fast)
    assert grib_decode._FILLS_CALLERS_BUFFER is False and 0 < np.isnan(fast).sum() < fast.size
    with pytest.raises(GribDecodeError, match="cannot decode the data"):
        decode_message(truncated)
