import itertools
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from reformatters.sources.grib_index import parse_ncep_idx
from reformatters.testing import noaa_archive
from reformatters.testing.noaa_archive import (
    COARSE_GRID,
    ENCODE_COUNTER,
    GFS_LEAD_HOURS,
    ArchiveManifest,
    expected_values,
    generate_gfs_archive,
    gfs_window_start,
    messages_for_lead,
)

from .conftest import INIT

IDX_LINE = re.compile(r"^\d+:\d+:d=\d{10}:[A-Z]+:[^:]+:[^:]+:$")


def test_windows_and_leads() -> None:
    assert [gfs_window_start(h) for h in (1, 6, 7, 12, 123, 129)] == [0, 0, 6, 6, 120, 126]
    assert len(GFS_LEAD_HOURS) == 209 and GFS_LEAD_HOURS[-1] == 384
    assert [s.step_text(7) for s in messages_for_lead("precipitation_surface", 7)] == [
        "6-7 hour acc fcst",
        "0-7 hour acc fcst",
    ]
    assert [s.step_text(6) for s in messages_for_lead("precipitation_surface", 6)] == ["0-6 hour acc fcst"]
    assert messages_for_lead("downward_short_wave_radiation_flux_surface", 0) == []
    assert [s.step_text(0) for s in messages_for_lead("total_cloud_cover_atmosphere", 0)] == ["anl"]
    assert [s.step_text(123) for s in messages_for_lead("categorical_rain_surface", 123)] == [
        "123 hour fcst",
        "120-123 hour ave fcst",
    ]


def test_expected_values_are_plausible_and_deterministic() -> None:
    t = expected_values("temperature_2m", INIT, 7, grid=COARSE_GRID)
    assert t.min() >= 215 and t.max() <= 315
    np.testing.assert_array_equal(t, expected_values("temperature_2m", INIT, 7, grid=COARSE_GRID))
    assert not np.array_equal(t, expected_values("temperature_2m", INIT, 8, grid=COARSE_GRID))
    short = expected_values("precipitation_surface", INIT, 7, "6-7 hour acc fcst", grid=COARSE_GRID)
    long = expected_values("precipitation_surface", INIT, 7, "0-7 hour acc fcst", grid=COARSE_GRID)
    assert short.min() >= 0 and np.all(long >= short) and long.max() > short.max()
    # monotonic growth within a window
    a11 = expected_values("precipitation_surface", INIT, 11, grid=COARSE_GRID)
    a12 = expected_values("precipitation_surface", INIT, 12, grid=COARSE_GRID)
    assert np.all(a12 >= a11) and (a12 > a11).any()
    cat = expected_values("categorical_snow_surface", INIT, 7, grid=COARSE_GRID)
    assert set(np.unique(cat)) == {0.0, 1.0}
    p = expected_values("pressure_reduced_to_mean_sea_level", INIT, 7, grid=COARSE_GRID)
    assert p.min() > 95000 and p.max() < 106000


def test_layout_idx_and_fillers(small_archive: ArchiveManifest) -> None:
    assert {f.path for f in small_archive.files} == {
        "gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f000",
        "gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f007",
    }
    for f in small_archive.files:
        path = small_archive.root / f.path
        assert path.stat().st_size == f.size
        lines = Path(str(path) + ".idx").read_text().splitlines()
        assert all(IDX_LINE.match(line) for line in lines), lines[:3]
        entries = parse_ncep_idx("\n".join(lines))
        data = path.read_bytes()
        assert all(data[e.start : e.start + 4] == b"GRIB" for e in entries)
        fillers = [e.level.endswith(" mb") for e in entries]
        assert sum(fillers) == 3 * (len(entries) - sum(fillers))
        assert not any(not a and not b for a, b in itertools.pairwise(fillers))  # no two wanted adjacent


def test_cache_hits_and_is_keyed_by_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFORMATTERS_ARCHIVE_CACHE", str(tmp_path))
    kwargs = dict(variables=["temperature_2m", "precipitation_surface"], grid=COARSE_GRID, filler_ratio=1.0)
    missing = [(INIT, 6)]
    before = ENCODE_COUNTER["messages"]
    first = generate_gfs_archive([INIT], [0, 6, 7], missing=missing, **kwargs)  # type: ignore[arg-type]
    encoded = ENCODE_COUNTER["messages"] - before
    assert encoded == 1 + 3  # TMP at 0 and 7; APCP 6-7 and 0-7 at 7 (lead 6 left out)
    assert first.root.parent == tmp_path and first.missing == ("gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f006",)
    assert not first.path(INIT, 6).exists() and first.path(INIT, 7).exists()

    second = generate_gfs_archive([INIT], [0, 6, 7], missing=missing, **kwargs)  # type: ignore[arg-type]
    assert ENCODE_COUNTER["messages"] - before == encoded
    assert second == first
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no temp dirs left behind

    monkeypatch.setattr(noaa_archive, "GENERATOR_VERSION", "test-bump")
    third = generate_gfs_archive([INIT], [0, 6, 7], missing=missing, **kwargs)  # type: ignore[arg-type]
    assert third.root != first.root and "test-bump" in third.root.name
    assert ENCODE_COUNTER["messages"] - before == 2 * encoded


def test_parallel_generation(tmp_path: Path) -> None:
    inits = [datetime(2025, 8, 1, 0), datetime(2025, 8, 1, 6)]
    m = generate_gfs_archive(
        inits, [1, 2], variables=["temperature_2m"], grid=COARSE_GRID, cache_dir=tmp_path, workers=2
    )
    assert len(m.files) == 4 and all(f.size > 0 for f in m.files)


@pytest.mark.slow
def test_full_grid_message_size(tmp_path: Path) -> None:
    m = generate_gfs_archive(
        [INIT], [7], variables=["temperature_2m", "pressure_surface"], filler_ratio=0.0, cache_dir=tmp_path
    )
    entries = parse_ncep_idx(Path(str(m.path(INIT, 7)) + ".idx").read_text())
    sizes = [(e.length or m.file(INIT, 7).size - e.start) for e in entries]
    assert all(300_000 <= s <= 1_100_000 for s in sizes), sizes
