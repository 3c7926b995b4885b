"""The HRRR-layout archive: inventory lines as real HRRR `wrfsfc` inventories write them, Lambert conformal GRIB2
that ecCodes decodes to the values the generator says it packed."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import eccodes
import numpy as np
import pytest

from reformatters.sources.grib_decode import LambertConformalGridSpec, decode_message
from reformatters.sources.grib_index import find_message, normalize_step, parse_ncep_idx
from reformatters.testing.noaa_archive import (
    HRRR_ARCHIVE_VARIABLES,
    HRRR_GRID,
    generate_hrrr_archive,
    hrrr_expected_values,
)

from .conftest import FIXTURES

REAL_IDX = FIXTURES / "noaa-idx"
INIT = datetime(2025, 8, 1, 0)  # the real inventories' run
# HRRR's projection on a small patch of points, so every variable encodes in a blink.
SMALL = HRRR_GRID.model_copy(update={"ni": 60, "nj": 40})


def _real_lines(lead: int) -> set[tuple[str, str, str]]:
    path = REAL_IDX / f"hrrr.t00z.wrfsfcf{lead:02d}.grib2.idx"
    if not path.exists():
        pytest.skip(f"the shared HRRR inventories are not at {path}")
    return {(e.element, e.level, normalize_step(e.step)) for e in parse_ncep_idx(path.read_text())}


@pytest.mark.parametrize("lead", [0, 8])
def test_inventory_lines_are_those_of_real_hrrr_files(lead: int, tmp_path: Path) -> None:
    archive = generate_hrrr_archive([INIT], [lead], grid=SMALL, filler_ratio=0.0, cache_dir=tmp_path)
    entries = parse_ncep_idx(Path(f"{archive.path(INIT, lead)}.idx").read_text())
    real = _real_lines(lead)
    generated = {(e.element, e.level, normalize_step(e.step)) for e in entries}
    assert generated <= real, sorted(generated - real)
    # Every catalogue variable, the unnamed parameter among them, and both precipitation windows after lead 0.
    assert ("var discipline=0 center=7 local_table=1 parmcat=16 parm=201", "entire atmosphere") in {
        (e.element, e.level) for e in entries
    }
    apcp = sorted(normalize_step(e.step) for e in entries if e.element == "APCP")
    assert apcp == (["0-0 hour acc fcst"] if lead == 0 else ["0-8 hour acc fcst", "7-8 hour acc fcst"])
    assert {e.element for e in entries} >= {v.element for v in HRRR_ARCHIVE_VARIABLES}


def test_messages_decode_on_the_lambert_grid_to_the_values_packed(tmp_path: Path) -> None:
    archive = generate_hrrr_archive([INIT], [1], grid=SMALL, filler_ratio=0.0, cache_dir=tmp_path)
    path = archive.path(INIT, 1)
    entries = parse_ncep_idx(Path(f"{path}.idx").read_text())
    data = path.read_bytes()
    # f01 lists its one-hour accumulation twice (hourly bucket and run total coincide), as HRRR does.
    assert [e.step for e in entries if e.element == "APCP"] == ["0-1 hour acc fcst", "0-1 hour acc fcst"]
    for var in HRRR_ARCHIVE_VARIABLES:
        entry = find_message(
            entries, var.element, var.level, "0-1 hour acc fcst" if var.kind == "acc" else "1 hour fcst"
        )
        message = data[entry.start : entry.end]
        handle = eccodes.codes_new_from_message(message)
        try:
            keys = {k: eccodes.codes_get(handle, k) for k in ("gridType", "discipline", "parameterCategory")}
            keys["parameterNumber"] = eccodes.codes_get(handle, "parameterNumber")
            keys["localTablesVersion"] = eccodes.codes_get(handle, "localTablesVersion")
            keys["radius"] = eccodes.codes_get(handle, "radius")
        finally:
            eccodes.codes_release(handle)
        assert keys["gridType"] == "lambert" and keys["radius"] == 6371229
        assert (keys["discipline"], keys["parameterCategory"], keys["parameterNumber"]) == (
            var.discipline,
            var.category,
            var.number,
        )
        assert keys["localTablesVersion"] == var.local_table
        decoded = decode_message(message, SMALL)  # the grid check passes on the Lambert keys
        expected = hrrr_expected_values(var, INIT, 1, grid=SMALL)
        np.testing.assert_array_equal(np.isnan(decoded), np.isnan(expected), err_msg=var.name)
        span = float(np.nanmax(expected) - np.nanmin(expected)) or 1.0
        np.testing.assert_allclose(decoded, expected, rtol=0, atol=span / 2**var.bits_per_value, err_msg=var.name)


def test_the_grid_check_refuses_another_lambert_grid(tmp_path: Path) -> None:
    archive = generate_hrrr_archive(
        [INIT], [0], variables=["temperature_2m"], grid=SMALL, filler_ratio=0.0, cache_dir=tmp_path
    )
    message = archive.path(INIT, 0).read_bytes()
    other: LambertConformalGridSpec = SMALL.model_copy(update={"lov": 265.0})
    with pytest.raises(ValueError, match=r"lov: expected 265\.0"):
        decode_message(message, other)
