"""ECMWF JSON-lines `.index` parsing and selection, byte-range fetches from a generated ECMWF-layout archive served on
loopback, and the reader against ecCodes on a real ECMWF file."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import eccodes
import numpy as np
import pytest

from reformatters.sources import ecmwf_index
from reformatters.sources.download import DownloadConfig, IndexCache, SourceFileNotFoundError
from reformatters.sources.ecmwf_index import (
    EcmwfIndex,
    EcmwfMessageKey,
    fetch_ecmwf_index,
    fetch_ecmwf_messages,
    normalize_ecmwf_step,
)
from reformatters.sources.grib_decode import GridSpec, decode_message
from reformatters.sources.grib_index import GribIndexParseError, GribMessageNotFoundError
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.ecmwf_archive import (
    EcmwfArchiveManifest,
    ecmwf_file_path,
    ecmwf_grid,
    ecmwf_values,
    generate_ecmwf_archive,
    index_path,
)

from .conftest import ECMWF

BEFORE = datetime(2026, 5, 11, 0)  # cycle 49r1: the control is in enfo (cf)
AFTER = datetime(2026, 5, 12, 0)  # cycle 50r1: the control is oper/fc
GRID = ecmwf_grid(3.0)
FAST = DownloadConfig(max_attempts=2, backoff_base_seconds=0.01, backoff_max_seconds=0.02)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> EcmwfArchiveManifest:
    return generate_ecmwf_archive(
        [BEFORE, AFTER],
        [0, 144, 150],
        members=(0, 1, 50),
        params=("2t", "tp"),
        grid=GRID,
        filler_ratio=1.0,
        cache_dir=tmp_path_factory.mktemp("ecmwf-archives"),
    )


@pytest.fixture
def server(archive: EcmwfArchiveManifest) -> Iterator[ArchiveServer]:
    with ArchiveServer(archive.root) as s:
        yield s


def ecc_decode(message: bytes) -> np.ndarray:
    handle = eccodes.codes_new_from_message(message)
    try:
        shape = (eccodes.codes_get(handle, "Nj"), eccodes.codes_get(handle, "Ni"))
        values = np.asarray(eccodes.codes_get_values(handle)).reshape(shape)
        if eccodes.codes_get(handle, "bitmapPresent"):  # ecCodes marks points the bitmap leaves out so
            values[values == eccodes.codes_get(handle, "missingValue")] = np.nan
        return values
    finally:
        eccodes.codes_release(handle)


def test_real_mars_index_selects_the_control_by_param_and_step(fixtures_dir: Path) -> None:
    """The real index lists the control without `number` and steps as numbers: member 0 and `0-6` find them."""
    index = EcmwfIndex.parse((ECMWF / "mars_cf_sfc.idx").read_text())
    assert len(index.entries) == 6
    tp3 = index.find(EcmwfMessageKey("tp", "sfc", "3", "cf", number=0))
    assert tp3 is not None and (tp3.offset, tp3.length) == (40454319, 2076642)
    tp6 = index.find(EcmwfMessageKey("tp", "sfc", "0-6", "cf"))
    assert tp6 is not None and tp6.offset == 68448713
    assert index.find(EcmwfMessageKey("tp", "sfc", "3", "pf", number=1)) is None
    assert index.find(EcmwfMessageKey("2t", "sfc", "3", "cf", number=7)) is None
    selected = index.select({"t": EcmwfMessageKey("2t", "sfc", "6", "cf")})
    assert (selected["t"].start, selected["t"].end) == (58065503, 58065503 + 2076642)
    with pytest.raises(GribMessageNotFoundError, match=r"no message param=2t .* step=9.*Lines with param 2t"):
        index.select({"t": EcmwfMessageKey("2t", "sfc", "9", "cf")})


def test_steps_normalise_and_bad_lines_are_named() -> None:
    assert [normalize_ecmwf_step(s) for s in (6, "6", "0-6", "6-12", " 144 ")] == ["6", "6", "6", "6-12", "144"]
    with pytest.raises(GribIndexParseError, match=r"line 2 is not an ECMWF index record .*'levtype'"):
        EcmwfIndex.parse(
            '{"param": "2t", "levtype": "sfc", "step": "0", "type": "cf", "_offset": 0, "_length": 5}\n'
            '{"param": "2t", "step": "3", "type": "cf", "_offset": 5, "_length": 5}\n'
        )


def test_levelist_and_number_and_type_tell_messages_apart(archive: EcmwfArchiveManifest) -> None:
    path = archive.path(BEFORE, "enfo", 144)
    index = EcmwfIndex.parse(Path(index_path(str(path))).read_text())
    t850 = index.find(EcmwfMessageKey("t", "pl", "144", "pf", number=1, levelist="850"))
    t500 = index.find(EcmwfMessageKey("t", "pl", "144", "pf", number=1, levelist="500"))
    assert t850 is not None and t500 is not None and t850.offset != t500.offset
    with pytest.raises(GribMessageNotFoundError, match="2 messages match param=t levtype=pl type=pf number=1"):
        index.find(EcmwfMessageKey("t", "pl", "144", "pf", number=1))
    members = {n: index.find(EcmwfMessageKey("2t", "sfc", "144", "pf" if n else "cf", number=n)) for n in (0, 1, 50)}
    assert len({e.offset for e in members.values() if e is not None}) == 3
    # After 50r1 the ensemble file has no control; the deterministic file has it, without a member number.
    after = EcmwfIndex.parse(Path(index_path(str(archive.path(AFTER, "enfo", 144)))).read_text())
    assert after.find(EcmwfMessageKey("2t", "sfc", "144", "cf", number=0)) is None
    oper = EcmwfIndex.parse(Path(index_path(str(archive.path(AFTER, "oper", 144)))).read_text())
    assert oper.find(EcmwfMessageKey("2t", "sfc", "144", "fc")) is not None


def test_fetch_selects_and_merges_byte_ranges(archive: EcmwfArchiveManifest, server: ArchiveServer) -> None:
    """Members 1 and 50 of `2t` lie one filler apart: one merged request; `tp` of member 50 comes with them."""
    relative = ecmwf_file_path(BEFORE, "enfo", 144, archive.resolution_dir)
    wanted = {
        "m1": EcmwfMessageKey("2t", "sfc", "144", "pf", number=1),
        "m50": EcmwfMessageKey("2t", "sfc", "144", "pf", number=50),
        "tp50": EcmwfMessageKey("tp", "sfc", "144", "pf", number=50),
        "absent": EcmwfMessageKey("2d", "sfc", "144", "pf", number=50),
    }
    server.reset_counters()
    got = fetch_ecmwf_messages(server.url_for(relative), server.url_for(index_path(relative)), wanted, config=FAST)
    assert set(got) == {"m1", "m50", "tp50"}  # a message the index does not list is left out
    assert server.requests[relative] == 1, server.requests  # one merged range (fillers between are small)
    data = archive.path(BEFORE, "enfo", 144).read_bytes()
    index = EcmwfIndex.parse(Path(index_path(str(archive.path(BEFORE, "enfo", 144)))).read_text())
    for name in ("m1", "m50", "tp50"):
        entry = index.find(wanted[name])
        assert entry is not None
        assert got[name] == data[entry.offset : entry.offset + entry.length]
    np.testing.assert_allclose(
        ecc_decode(got["m50"]).reshape(GRID.nj, GRID.ni), ecmwf_values("2t", GRID, BEFORE, 144, 50), atol=0.01
    )
    with pytest.raises(GribMessageNotFoundError):
        fetch_ecmwf_messages(
            server.url_for(relative), server.url_for(index_path(relative)), wanted, config=FAST, skip_unlisted=False
        )
    missing = ecmwf_file_path(BEFORE, "enfo", 9, archive.resolution_dir)
    with pytest.raises(SourceFileNotFoundError):
        fetch_ecmwf_messages(server.url_for(missing), server.url_for(index_path(missing)), wanted, config=FAST)


def test_parsed_indexes_are_held_to_a_bounded_number_of_lines(
    archive: EcmwfArchiveManifest, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker walks an init's steps, each index listing every member: the parsed indexes it keeps stay under
    `_PARSED_MAX_LINES` lines (the newest whatever its size), and each answers as parsed."""
    steps = [(init, step) for init in (BEFORE, AFTER) for step in (0, 144)]
    relatives = [ecmwf_file_path(init, "enfo", step, archive.resolution_dir) for init, step in steps]
    urls = [server.url_for(index_path(relative)) for relative in relatives]
    lines = len(EcmwfIndex.parse(Path(index_path(str(archive.path(BEFORE, "enfo", 0)))).read_text()).entries)
    monkeypatch.setattr(ecmwf_index, "_parsed", OrderedDict())
    monkeypatch.setattr(ecmwf_index, "_PARSED_MAX_LINES", 2 * lines)
    cache = IndexCache()
    for url, (_, step) in zip(urls, steps, strict=True):
        index = fetch_ecmwf_index(url, config=FAST, cache=cache)
        assert index.find(EcmwfMessageKey("2t", "sfc", str(step), "pf", 50)) is not None
        assert sum(len(held.entries) for _, held in ecmwf_index._parsed.values()) <= 2 * lines
    assert list(ecmwf_index._parsed) == urls[-2:]
    monkeypatch.setattr(ecmwf_index, "_PARSED_MAX_LINES", 1)
    assert fetch_ecmwf_index(urls[0], config=FAST, cache=cache).entries  # alone over the bound: still kept
    assert list(ecmwf_index._parsed) == urls[:1]


def test_generated_messages_are_ccsds_with_ecmwf_keys(archive: EcmwfArchiveManifest) -> None:
    message = archive.message(BEFORE, "enfo", 150, EcmwfMessageKey("tp", "sfc", "150", "pf", number=50))
    assert message is not None
    handle = eccodes.codes_new_from_message(message)
    try:
        keys = {k: eccodes.codes_get(handle, k) for k in ("centre", "shortName", "stepRange", "number", "packingType")}
        assert eccodes.codes_get(handle, "dataRepresentationTemplateNumber") == 42
    finally:
        eccodes.codes_release(handle)
    assert keys == {
        "centre": "ecmf",
        "shortName": "tp",
        "stepRange": "0-150",
        "number": 50,
        "packingType": "grid_ccsds",
    }


@pytest.mark.parametrize("first_longitude", [-180.0, 0.0])
def test_decode_reads_the_first_longitude_from_the_message(first_longitude: float, tmp_path: Path) -> None:
    """Fields published from -180 or from 0 land on the same -180..180 columns."""
    grid = ecmwf_grid(3.0, first_longitude)
    built = generate_ecmwf_archive(
        [BEFORE], [0], members=(1,), params=("2t",), grid=grid, filler_ratio=0, cache_dir=tmp_path
    )
    message = built.message(BEFORE, "enfo", 0, EcmwfMessageKey("2t", "sfc", "0", "pf", number=1))
    assert message is not None
    reader = ecmwf_grid(3.0).model_copy(update={"roll_longitude_to_180": True, "first_longitude_from_message": True})
    out = decode_message(message, reader)
    expected = ecc_decode(message).astype(np.float32)
    shift = 0 if first_longitude == -180.0 else grid.ni // 2
    np.testing.assert_array_equal(out, np.roll(expected, shift, axis=1))


def test_real_ecmwf_file_decodes_exactly_as_eccodes(fixtures_dir: Path) -> None:
    """Every message of a real ECMWF file (simple packing, 1.5 degrees from longitude 0, constant fields among them),
    cut at the offsets its index gives, decodes with the reader to ecCodes' values, bit for bit, on -180..180."""
    path = ECMWF / "s2s_control_2026-08-10T00Z.grib2"
    data = path.read_bytes()
    lines = [json.loads(line) for line in Path(f"{path}.index").read_text().splitlines() if line.strip()]
    grid = GridSpec.global_regular(1.5, roll_longitude_to_180=True).model_copy(
        update={"first_longitude_from_message": True}
    )
    assert len(lines) == 11
    for line in lines:
        message = data[line["offset"] : line["offset"] + line["length"]]
        expected = ecc_decode(message).astype(np.float32)
        assert expected.shape == (121, 240)
        out = np.full((121, 240), -1.0, dtype=np.float32)
        decode_message(message, grid, out=out)
        np.testing.assert_array_equal(out, np.roll(expected, 120, axis=1), err_msg=line["variable"])
    assert len({line["variable"] for line in lines}) == 6
