import logging
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from reformatters.sources.download import (
    DownloadConfig,
    IndexCache,
    SourceDownloadError,
    SourceFileNotFoundError,
    download_file,
    fetch_bytes,
    fetch_grib_messages,
    fetch_index,
    prefetch_indexes,
    seed_indexes,
    write_atomic,
)
from reformatters.sources.grib_index import GribIndexParseError, GribMessageNotFoundError, find_message, parse_ncep_idx
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.noaa_archive import GFS_ARCHIVE_VARIABLES, ArchiveManifest, messages_for_lead

from .conftest import INIT

FAST = DownloadConfig(
    max_attempts=4, max_gap_bytes=0, backoff_base_seconds=0.001, backoff_max_seconds=0.01, read_timeout_seconds=5
)
LEAD = 7


def _wanted(lead: int = LEAD) -> dict[str, tuple[str, str, str]]:
    out = {}
    for v in GFS_ARCHIVE_VARIABLES:
        spec = messages_for_lead(v, lead)[0]
        out[v.name] = spec.idx_fields(lead)
    return out


def _rel(m: ArchiveManifest, lead: int = LEAD) -> str:
    return m.file(INIT, lead).path


def _expected_bytes(m: ArchiveManifest, wanted: dict[str, tuple[str, str, str]], lead: int = LEAD) -> dict[str, bytes]:
    path = m.path(INIT, lead)
    entries = parse_ncep_idx(Path(str(path) + ".idx").read_text())
    data = path.read_bytes()
    out = {}
    for key, (el, lev, step) in wanted.items():
        e = find_message(entries, el, lev, step)
        out[key] = data[e.start : e.end]
    return out


def test_fetch_only_selected_bytes(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    wanted = _wanted()
    got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), wanted, config=FAST)
    expected = _expected_bytes(small_archive, wanted)
    assert got == expected
    assert all(b[:4] == b"GRIB" and b[-4:] == b"7777" for b in got.values())
    # fillers sit between wanted messages, so gap 0 means the bytes sent are exactly the messages' bytes
    assert server.bytes_sent[rel] == sum(len(b) for b in expected.values())
    assert server.bytes_sent[rel] < small_archive.file(INIT, LEAD).size / 3
    assert server.requests[rel] == len(wanted)  # one single-range request per (unmerged) message


def test_gap_merging_reduces_requests(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    wanted = _wanted()
    cfg = FAST.model_copy(update={"max_gap_bytes": 10**9})
    got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), wanted, config=cfg)
    assert got == _expected_bytes(small_archive, wanted)
    assert server.requests[rel] == 1


def test_both_apcp_windows_and_open_ended_last_message(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    entries = parse_ncep_idx((small_archive.root / (rel + ".idx")).read_text())
    last = entries[-1]
    wanted = {
        "short": ("APCP", "surface", "6-7 hour acc fcst"),
        "long": ("APCP", "surface", "0-7 hour acc fcst"),
        "last": (last.element, last.level, last.step),
    }
    # the filler lines are unique per (element, level), so the last line can be asked for by name
    got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), wanted, config=FAST)
    assert got["short"] != got["long"]
    data = small_archive.path(INIT, LEAD).read_bytes()
    assert got["last"] == data[last.start :]


@pytest.mark.parametrize(
    ("kind", "status"),
    [("status", 503), ("status", 429), ("truncate", 0), ("html200", 0), ("redirect302", 0), ("corrupt", 0)],
)
def test_transient_faults_are_retried(
    server: ArchiveServer, small_archive: ArchiveManifest, kind: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    rel = _rel(small_archive)
    wanted = dict(list(_wanted().items())[:3])
    server.add_fault(rel, kind, times=2, status=status or 503)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="reformatters.sources"):
        got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), wanted, config=FAST)
    assert got == _expected_bytes(small_archive, wanted)
    assert server.requests[rel] == 3 + 2
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and rel in retries[0].getMessage()


@pytest.mark.parametrize("kind", ["status", "truncate", "html200", "redirect302", "corrupt"])
def test_persistent_faults_end_in_download_error(
    server: ArchiveServer, small_archive: ArchiveManifest, kind: str
) -> None:
    rel = _rel(small_archive)
    server.add_fault(rel, kind)  # type: ignore[arg-type]
    with pytest.raises(SourceDownloadError) as info:
        fetch_grib_messages(
            server.url_for(rel), server.url_for(rel + ".idx"), dict(list(_wanted().items())[:1]), config=FAST
        )
    msg = str(info.value)
    assert server.url_for(rel) in msg and f"after {FAST.max_attempts} attempts" in msg
    reasons = {
        "status": "HTTP 503",
        "truncate": "connection error",
        "html200": "not GRIB",
        "redirect302": "HTTP 302 redirect",
        "corrupt": "GRIB",
    }
    assert reasons[kind] in msg
    assert server.requests[rel] == FAST.max_attempts


@pytest.mark.parametrize("missing_as_403", [False, True])
def test_missing_file_is_not_found_without_retries(small_archive: ArchiveManifest, missing_as_403: bool) -> None:
    with ArchiveServer(small_archive.root, missing_as_403=missing_as_403) as server:
        url = server.url_for("gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f999.idx")
        with pytest.raises(SourceFileNotFoundError, match=r"f999\.idx: HTTP 40[34]"):
            fetch_bytes(url, config=FAST)
        assert sum(server.requests.values()) == 1
        assert (
            (server.statuses[("gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f999.idx", 403 if missing_as_403 else 404)])
            == 1
        )


def test_not_yet_published_then_published(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    server.unpublish(rel + "*")
    with pytest.raises(SourceFileNotFoundError):
        fetch_bytes(server.url_for(rel + ".idx"), config=FAST)
    server.publish(rel + "*")
    assert fetch_bytes(server.url_for(rel + ".idx"), config=FAST).startswith(b"1:0:d=2025080100:")
    server.unpublish(rel + "*", until=time.time() + 0.3)
    cfg = FAST.model_copy(
        update={"not_found_attempts": 10, "max_attempts": 10, "backoff_base_seconds": 0.2, "backoff_max_seconds": 0.2}
    )
    assert fetch_bytes(server.url_for(rel + ".idx"), config=cfg).startswith(b"1:0:")


def test_missing_variable_in_inventory(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    with pytest.raises(GribMessageNotFoundError, match=r"f007\.idx.*APCP:surface:5-7 hour acc fcst"):
        fetch_grib_messages(
            server.url_for(rel),
            server.url_for(rel + ".idx"),
            {"x": ("APCP", "surface", "5-7 hour acc fcst")},
            config=FAST,
        )
    assert server.requests[rel] == 0


def test_slow_answer_times_out_then_succeeds(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    server.add_fault(rel + ".idx", "delay", times=1, delay_seconds=1.0)
    cfg = FAST.model_copy(update={"read_timeout_seconds": 0.2})
    assert fetch_bytes(server.url_for(rel + ".idx"), config=cfg) == (small_archive.root / (rel + ".idx")).read_bytes()
    assert server.requests[rel + ".idx"] == 2


def test_range_requests_and_multi_range(small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    data = small_archive.path(INIT, LEAD).read_bytes()
    with ArchiveServer(small_archive.root) as s, httpx.Client() as c:
        url = s.url_for(rel)
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert (
            r.status_code == 206
            and r.content == data[10:20]
            and r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        )
        assert c.get(url, headers={"Range": "bytes=100-"}).content == data[100:]
        assert c.get(url, headers={"Range": "bytes=-5"}).content == data[-5:]
        h = c.head(url)
        assert h.status_code == 200 and int(h.headers["content-length"]) == len(data) and h.content == b""
        multi = c.get(url, headers={"Range": "bytes=0-3,10-19"})
        assert multi.status_code == 200 and multi.content == data  # S3 behaviour: whole object
    with ArchiveServer(small_archive.root, multipart_ranges=True) as s, httpx.Client() as c:
        multi = c.get(s.url_for(rel), headers={"Range": "bytes=0-3,10-19"})
        assert multi.status_code == 206 and multi.headers["content-type"].startswith("multipart/byteranges")
        assert b"Content-Range: bytes 0-3/" in multi.content and data[10:20] in multi.content
        assert len(multi.content) < 1000


def test_range_downloads_from_local_paths(small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    wanted = dict(list(_wanted().items())[:4])
    for root in (str(small_archive.root), f"file://{small_archive.root}"):
        got = fetch_grib_messages(f"{root}/{rel}", f"{root}/{rel}.idx", wanted, config=FAST)
        assert got == _expected_bytes(small_archive, wanted)
    with pytest.raises(SourceFileNotFoundError):
        fetch_bytes(f"{small_archive.root}/nope.idx", config=FAST)


def test_no_partial_file_left(server: ArchiveServer, small_archive: ArchiveManifest, tmp_path: Path) -> None:
    rel = _rel(small_archive)
    server.add_fault(rel, "truncate")
    target = tmp_path / "out" / "file.grib2"
    with pytest.raises(SourceDownloadError, match="connection error"):
        download_file(server.url_for(rel), target, config=FAST, require_grib=True)
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    server.clear_faults()
    download_file(server.url_for(rel), target, config=FAST, require_grib=True)
    assert target.read_bytes() == small_archive.path(INIT, LEAD).read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["file.grib2"]

    # a failure half-way through writing removes the temp file
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "x.bin", "not bytes")  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []


def test_requests_per_minute_and_concurrency_cap(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    url = server.url_for(rel + ".idx")
    cfg = FAST.model_copy(update={"requests_per_minute": 600.0})  # one request per 0.1 s
    start = time.monotonic()
    threads = [threading.Thread(target=fetch_bytes, args=(url,), kwargs={"config": cfg}) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 0.39
    assert server.requests[rel + ".idx"] == 5


def test_an_inventory_is_fetched_once_per_process(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    wanted = _wanted()
    for name in wanted:
        got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), {name: wanted[name]}, config=FAST)
        assert got == {name: _expected_bytes(small_archive, {name: wanted[name]})[name]}
    assert server.requests[rel + ".idx"] == 1
    assert server.requests[rel] == len(wanted)
    assert fetch_index(server.url_for(rel + ".idx")) == parse_ncep_idx(
        Path(str(small_archive.path(INIT, LEAD)) + ".idx").read_text()
    )
    assert server.requests[rel + ".idx"] == 1


def test_a_missing_inventory_is_remembered_briefly(server: ArchiveServer) -> None:
    cache = IndexCache(not_found_seconds=0.3)
    rel = "gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f001.idx"
    for _ in range(3):
        with pytest.raises(SourceFileNotFoundError, match="404"):
            fetch_index(server.url_for(rel), config=FAST, cache=cache)
    assert server.requests[rel] == 1
    time.sleep(0.35)  # forgotten: the file may have been published since
    with pytest.raises(SourceFileNotFoundError):
        fetch_index(server.url_for(rel), config=FAST, cache=cache)
    assert server.requests[rel] == 2


def test_the_inventory_cache_keeps_only_the_most_recent(small_archive: ArchiveManifest) -> None:
    cache = IndexCache(capacity=2)
    entries = parse_ncep_idx(Path(str(small_archive.path(INIT, LEAD)) + ".idx").read_text())
    for name in ("a", "b", "c"):
        cache.put(name, entries)
    assert cache.get("a") is None
    assert cache.get("b") == entries and cache.get("c") == entries


def test_the_inventory_cache_holds_a_bounded_number_of_lines(small_archive: ArchiveManifest) -> None:
    """Inventories count by their lines too (an ECMWF step file lists every member's messages): the oldest go
    once the lines held pass `max_lines`; the newest stays whatever its size; a missing inventory holds none."""
    entries = parse_ncep_idx(Path(str(small_archive.path(INIT, LEAD)) + ".idx").read_text())
    cache = IndexCache(max_lines=2 * len(entries) + 1)
    for name in ("a", "b", "b", "c"):  # storing "b" again does not count its lines twice
        cache.put(name, entries)
    cache.put_missing("gone", "404")
    assert cache.get("a") is None and cache.get("b") == entries and cache.get("c") == entries
    assert cache.lines == 2 * len(entries)
    cache.put("big", entries * 3)
    assert cache.get("big") == entries * 3 and not cache.known("b") and not cache.known("c")
    assert cache.lines == 3 * len(entries)
    cache.clear()
    assert cache.lines == 0


def test_one_merged_range_is_fetched_in_the_calling_thread(
    server: ArchiveServer, small_archive: ArchiveManifest, caplog: pytest.LogCaptureFixture
) -> None:
    rel = _rel(small_archive)
    wanted = dict(list(_wanted().items())[:3])
    for gap, ranges in ((10**9, 1), (0, len(wanted))):
        caplog.clear()
        server.reset_counters()
        server.add_fault(rel, "status", times=1)
        cfg = FAST.model_copy(update={"max_gap_bytes": gap})
        with caplog.at_level(logging.INFO, logger="reformatters.sources"):
            got = fetch_grib_messages(server.url_for(rel), server.url_for(rel + ".idx"), wanted, config=cfg)
        assert got == _expected_bytes(small_archive, wanted)
        assert server.requests[rel] == ranges + 1
        (retry,) = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert (retry.threadName == threading.current_thread().name) == (ranges == 1)


def test_connection_refused_is_retried_then_download_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceDownloadError, match=f"after {FAST.max_attempts} attempts.*connection error"):
        fetch_bytes(f"http://127.0.0.1:{port}/x.idx", config=FAST)


def test_other_statuses_fail_at_once_with_the_answer(server: ArchiveServer, small_archive: ArchiveManifest) -> None:
    rel = _rel(small_archive)
    size = small_archive.file(INIT, LEAD).size
    with pytest.raises(SourceDownloadError, match=r"unexpected HTTP 416"):
        fetch_bytes(server.url_for(rel), (size + 10, size + 20), config=FAST)
    assert server.requests[rel] == 1


def test_downloads_go_through_the_proxy_the_environment_names(
    server: ArchiveServer, small_archive: ArchiveManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured (the archive server answers absolute-URI requests as a proxy would) and NO_PROXY
    exempts a host: the source host here does not exist, so only the proxy can answer."""
    rel = _rel(small_archive)
    source = f"http://noaa-mirror.invalid/{rel}"
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    requests_before = sum(server.requests.values())
    expected = small_archive.path(INIT, LEAD).read_bytes()[:4096]
    assert fetch_bytes(source, (0, 4096), config=FAST) == expected
    assert sum(server.requests.values()) == requests_before + 1
    monkeypatch.setenv("NO_PROXY", "noaa-mirror.invalid")
    with pytest.raises(SourceDownloadError, match="connection error"):
        fetch_bytes(source, (0, 4096), config=FAST)


def test_prefetched_inventories_serve_another_process_without_requests(
    server: ArchiveServer, small_archive: ArchiveManifest
) -> None:
    rel = _rel(small_archive)
    present = server.url_for(rel + ".idx")
    absent = server.url_for("gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f001.idx")
    broken = server.url_for("gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f002.idx")
    server.add_fault("gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f002.idx", "status", status=503)
    fetching_worker = IndexCache()
    fetched = prefetch_indexes([present, absent, broken, present], config=FAST, cache=fetching_worker)
    # One attempt each: a flaky inventory is left to the downloads' own retries, not retried here first.
    assert server.requests[rel + ".idx"] == 1
    assert server.requests["gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f002.idx"] == 1
    assert set(fetched.texts) == {present}
    assert set(fetched.missing) == {absent}
    assert "404" in fetched.missing[absent][0]

    other_worker = IndexCache()
    seed_indexes(fetched, other_worker)
    assert fetch_index(present, config=FAST, cache=other_worker) == parse_ncep_idx(
        Path(str(small_archive.path(INIT, LEAD)) + ".idx").read_text()
    )
    with pytest.raises(SourceFileNotFoundError, match="404"):
        fetch_index(absent, config=FAST, cache=other_worker)
    assert server.requests[rel + ".idx"] == 1
    assert server.requests["gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f001.idx"] == 1
    assert not other_worker.known(broken)


def test_a_prefetched_not_found_ages_from_when_it_was_answered(server: ArchiveServer) -> None:
    rel = "gfs.20990101/00/atmos/gfs.t00z.pgrb2.0p25.f003.idx"
    fetched = prefetch_indexes([server.url_for(rel)], config=FAST, cache=IndexCache())
    reason, seen_at = fetched.missing[server.url_for(rel)]
    # Answered long ago (by the fetching task's clock): the file may be published now, so ask again.
    stale = type(fetched)(texts={}, missing={server.url_for(rel): (reason, seen_at - 31.0)})
    cache = IndexCache(not_found_seconds=30.0)
    seed_indexes(stale, cache)
    assert not cache.known(server.url_for(rel))
    # Answered 29.9 s ago: remembered for the rest of the 30 s only.
    nearly_stale = type(fetched)(texts={}, missing={server.url_for(rel): (reason, time.time() - 29.9)})
    seed_indexes(nearly_stale, cache)
    assert cache.known(server.url_for(rel))
    time.sleep(0.15)
    assert not cache.known(server.url_for(rel))


def test_the_archive_server_serves_nothing_outside_its_root(server: ArchiveServer) -> None:
    outside = server.root.parent / f"outside-{server.port}.txt"
    outside.write_text("not part of the archive")
    try:
        for target in (f"/../{outside.name}", f"/a/../../{outside.name}", "/..", "/"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
                conn.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                response = b""
                while chunk := conn.recv(65536):
                    response += chunk
            assert response.startswith(b"HTTP/1.1 404"), (target, response[:80])
            assert b"not part of the archive" not in response
    finally:
        outside.unlink()


@pytest.mark.parametrize(
    ("served", "problem"),
    [
        (b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>\n", "not a wgrib2 inventory line"),
        (b"1:0:d=2025080100:TMP:2 m above ground:7 hour fcst:\n2:40233:d=20250801", "ends mid-line"),
        (b"1:0:d=2025080100:TMP:2 m above ground:7 hour fcst:\n\xff\xfe\x00garbage\n", "not UTF-8 text"),
        (b"", "is empty"),
    ],
    ids=["html-with-status-200", "cut-mid-line", "not-utf-8", "empty"],
)
def test_a_malformed_inventory_fails_its_file_only(
    small_archive: ArchiveManifest, tmp_path: Path, served: bytes, problem: str
) -> None:
    root = tmp_path / "archive"
    shutil.copytree(small_archive.root, root)
    bad, good = _rel(small_archive, 0), _rel(small_archive, LEAD)
    (root / f"{bad}.idx").write_bytes(served)
    cache = IndexCache()
    with ArchiveServer(root) as server:
        # The region's index task hands on what it could parse and leaves the bad one to its file's download.
        fetched = prefetch_indexes(
            [server.url_for(f"{bad}.idx"), server.url_for(f"{good}.idx")], config=FAST, cache=cache
        )
        assert list(fetched.texts) == [server.url_for(f"{good}.idx")]
        assert not fetched.missing
        with pytest.raises(GribIndexParseError, match=rf"{re.escape(bad)}\.idx: .*{problem}"):
            fetch_grib_messages(server.url_for(bad), server.url_for(f"{bad}.idx"), _wanted(), config=FAST)
        assert server.requests[bad] == 0
        wanted = _wanted()
        got = fetch_grib_messages(server.url_for(good), server.url_for(f"{good}.idx"), wanted, config=FAST)
        assert got == _expected_bytes(small_archive, wanted)
