import dataclasses
import itertools
from pathlib import Path

import pytest

from reformatters.sources.grib_index import (
    GribMessageNotFoundError,
    IndexEntry,
    find_message,
    instant_step,
    merge_byte_ranges,
    normalize_step,
    parse_ecmwf_index,
    parse_index,
    parse_ncep_idx,
    window_step,
)

# (element, level, kind) of the GFS variables of facts.md; kind None = instantaneous
GFS_VARIABLES: list[tuple[str, str, str | None]] = [
    ("TMP", "2 m above ground", None),
    ("RH", "2 m above ground", None),
    ("TMAX", "2 m above ground", "max"),
    ("TMIN", "2 m above ground", "min"),
    ("UGRD", "10 m above ground", None),
    ("VGRD", "10 m above ground", None),
    ("UGRD", "100 m above ground", None),
    ("VGRD", "100 m above ground", None),
    ("PRES", "surface", None),
    ("PRMSL", "mean sea level", None),
    ("APCP", "surface", "acc"),
    ("CSNOW", "surface", None),
    ("CICEP", "surface", None),
    ("CFRZR", "surface", None),
    ("CRAIN", "surface", None),
    ("CPOFP", "surface", None),
    ("PWAT", "entire atmosphere (considered as a single layer)", None),
    ("TCDC", "entire atmosphere", None),
    ("HGT", "cloud ceiling", None),
    ("DSWRF", "surface", "ave"),
    ("DLWRF", "surface", "ave"),
]


def _read(p: Path) -> str:
    return p.read_text()


def test_parse_every_real_noaa_inventory(fixtures_dir: Path) -> None:
    files = sorted((fixtures_dir / "noaa-idx").glob("*.idx"))
    assert len(files) == 10
    for f in files:
        text = _read(f)
        entries = parse_ncep_idx(text)
        assert len(entries) == len(text.strip().splitlines()), f
        assert entries[0].start == 0
        assert entries[-1].end is None
        for a, b in itertools.pairwise(entries):
            assert a.end == b.start, (f, a.raw)
            assert a.length is not None and a.length > 0
        assert all(e.raw and e.element and e.level and e.step for e in entries)


def test_gfs_f000_selection(fixtures_dir: Path) -> None:
    entries = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/gfs.t00z.pgrb2.0p25.f000.idx"))
    tmp = find_message(entries, "TMP", "2 m above ground", instant_step(0))
    assert (tmp.message, tmp.start, tmp.end) == ("580", 414591098, entries[580].start)
    tcdc = find_message(entries, "TCDC", "entire atmosphere", "anl")
    assert tcdc.start == 431334868 and tcdc.end == 432180130
    for element, level, kind in GFS_VARIABLES:
        if kind is not None:  # windowed fields have no lead-0 message
            with pytest.raises(GribMessageNotFoundError):
                find_message(entries, element, level, window_step(0, 0, kind))  # type: ignore[arg-type]
            continue
        e = find_message(entries, element, level, "anl")
        assert e.element == element and e.level == level and e.step == "anl"


def test_gfs_f007_selection_tells_windows_apart(fixtures_dir: Path) -> None:
    entries = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/gfs.t00z.pgrb2.0p25.f007.idx"))
    selected: dict[str, IndexEntry] = {}
    for element, level, kind in GFS_VARIABLES:
        step = instant_step(7) if kind is None else window_step(6, 7, kind)  # type: ignore[arg-type]
        selected[f"{element}:{level}"] = find_message(entries, element, level, step, source="gfs f007")

    apcp_short = selected["APCP:surface"]
    apcp_long = find_message(entries, "APCP", "surface", window_step(0, 7, "acc"))
    assert (apcp_short.message, apcp_short.start, apcp_short.end) == (
        "596",
        428200066,
        428448703,
    )
    assert (apcp_long.message, apcp_long.start) == ("597", 428448703)
    # Instantaneous, not the window average, for TCDC / CPOFP / categorical precipitation
    assert selected["TCDC:entire atmosphere"].message == "636"
    assert selected["TCDC:entire atmosphere"].step == "7 hour fcst"
    assert find_message(entries, "TCDC", "entire atmosphere", "6-7 hour ave fcst").message == "637"
    assert [selected[f"{c}:surface"].message for c in ("CSNOW", "CICEP", "CFRZR", "CRAIN")] == [
        "601",
        "602",
        "603",
        "604",
    ]
    assert selected["CPOFP:surface"].message == "591"
    assert selected["DSWRF:surface"].step == "6-7 hour ave fcst"
    assert selected["TMAX:2 m above ground"].message == "586"

    total = sum(e.length or 0 for e in selected.values())
    file_lower_bound = entries[-1].start
    assert 0 < total < file_lower_bound / 20  # ~21 fields of 740 messages
    merged = merge_byte_ranges({k: e for k, e in selected.items()}, max_gap_bytes=0)
    # contiguous categorical messages (601-604) and TMAX/TMIN/UGRD/VGRD (586-589) merge without any gap
    assert len(merged) < len(selected)
    assert sum(r.length or 0 for r in merged) == total


def test_gefs_and_hrrr_lines(fixtures_dir: Path) -> None:
    geavg = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/geavg.t00z.pgrb2s.0p25.f009.idx"))
    assert all(e.extra == "ens mean" for e in geavg)
    tmp = find_message(geavg, "TMP", "2 m above ground", "9 hour fcst")
    assert tmp.extra == "ens mean"
    # the day form written by wgrib2 matches an hours request
    geavg0 = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/geavg.t00z.pgrb2s.0p25.f000.idx"))
    assert find_message(geavg0, "TMAX", "2 m above ground", "0-0 hour max fcst").step == "0-0 day max fcst"
    gep = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/gep01.t00z.pgrb2s.0p25.f015.idx"))
    assert {e.extra for e in gep} == {"ENS=+1"}

    hrrr = parse_ncep_idx(_read(fixtures_dir / "noaa-idx/hrrr.t00z.wrfsfcf08.grib2.idx"))
    unnamed = find_message(
        hrrr,
        "var discipline=0 center=7 local_table=1 parmcat=16 parm=201",
        "entire atmosphere",
        "8 hour fcst",
    )
    assert (unnamed.message, unnamed.start, unnamed.end) == ("3", 820896, 1393281)
    assert find_message(hrrr, "REFC", "entire atmosphere", instant_step(8)).end == 617287


def test_ecmwf_jsonl_index(fixtures_dir: Path) -> None:
    text = _read(fixtures_dir / "ecmwf/mars_cf_sfc.idx")
    entries = parse_ecmwf_index(text)
    assert entries == parse_index(text)
    assert len(entries) == 6
    tp3 = find_message(entries, "tp", "surface", instant_step(3))
    assert (tp3.start, tp3.end) == (40454319, 40454319 + 2076642)
    assert tp3.extra == "type=cf"
    assert find_message(entries, "2t", "surface", "anl").start == 2076642


def test_sub_messages_share_start_and_last_is_open_ended() -> None:
    text = (
        "1:0:d=2025080100:PRMSL:mean sea level:anl:\n"
        "2:100:d=2025080100:UGRD:10 m above ground:anl:\n"
        "2.1:100:d=2025080100:VGRD:10 m above ground:anl:\n"
        "3:250:d=2025080100:TMP:2 m above ground:anl:\n"
    )
    entries = parse_ncep_idx(text)
    assert [(e.message, e.start, e.end) for e in entries] == [
        ("1", 0, 100),
        ("2", 100, 250),
        ("2.1", 100, 250),
        ("3", 250, None),
    ]
    assert entries[3].byte_range_header == "bytes=250-"
    merged = merge_byte_ranges([("u", 100, 250), ("v", 100, 250), ("t", 250, None)], max_gap_bytes=0)
    assert len(merged) == 1 and merged[0].end is None and merged[0].byte_range_header == "bytes=100-"
    parts = merged[0].split(bytes(range(200)))
    assert parts["u"] == parts["v"] == bytes(range(150)) and parts["t"] == bytes(range(150, 200))
    sized = merge_byte_ranges([("t", 250, None)], file_size=400)
    assert sized[0].byte_range_header == "bytes=250-399"


def test_merge_respects_gap_threshold() -> None:
    ranges = [("c", 5000, 6000), ("a", 0, 1000), ("b", 1500, 2000)]
    merged = merge_byte_ranges(ranges, max_gap_bytes=500)
    assert [(r.start, r.end) for r in merged] == [(0, 2000), (5000, 6000)]
    assert [(s.key, s.offset, s.length) for s in merged[0].slices] == [
        ("a", 0, 1000),
        ("b", 1500, 500),
    ]
    data = bytes(i % 251 for i in range(2000))
    assert merged[0].split(data) == {"a": data[:1000], "b": data[1500:2000]}
    assert len(merge_byte_ranges(ranges, max_gap_bytes=499)) == 3
    with pytest.raises(ValueError, match="expected 2000 bytes"):
        merged[0].split(data[:10])


def test_steps() -> None:
    assert instant_step(0) == "anl"
    assert instant_step(7) == "7 hour fcst"
    assert window_step(6, 7, "acc") == "6-7 hour acc fcst"
    assert normalize_step("0-10 day acc fcst") == normalize_step(window_step(0, 240, "acc")) == "0-240 hour acc fcst"
    assert normalize_step("1 day fcst") == "24 hour fcst"
    with pytest.raises(ValueError):
        window_step(0, 6, "sum")  # type: ignore[arg-type]


def test_missing_variable_error_names_file_and_closest_lines(
    fixtures_dir: Path,
) -> None:
    path = fixtures_dir / "noaa-idx/gfs.t00z.pgrb2.0p25.f007.idx"
    entries = parse_ncep_idx(_read(path))
    with pytest.raises(GribMessageNotFoundError) as info:
        find_message(entries, "APCP", "surface", "5-7 hour acc fcst", source=str(path))
    msg = str(info.value)
    assert str(path) in msg and "APCP:surface:5-7 hour acc fcst" in msg
    assert "596:428200066:d=2025080100:APCP:surface:6-7 hour acc fcst:" in msg
    assert msg.index("APCP:surface:6-7") < msg.index("Closest") + 200  # same element+level listed first

    # GFS f006 lists the 0-6 h APCP accumulation twice; identical lines name the same field: the first serves.
    duplicate = [*entries, entries[0]]
    assert find_message(duplicate, "PRMSL", "mean sea level", "7 hour fcst") is entries[0]
    # Lines that differ in their extra field (ensemble members, statistics) are truly ambiguous.
    other_member = dataclasses.replace(entries[0], extra="ENS=+1")
    with pytest.raises(GribMessageNotFoundError, match="2 messages match"):
        find_message([*entries, other_member], "PRMSL", "mean sea level", "7 hour fcst")
