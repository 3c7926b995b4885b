"""Per-host request caps across the whole cluster: a backfill on two worker processes against a loopback server
that counts the requests it answers at once never sees more than the declared cap; without a distributed client
the cap holds within the process."""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.dataset import EcmwfIfsEnsForecast15DayDataset
from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.template_config import (
    ecmwf_ifs_ens_template_config,
)

from reformatters.region_job import RegionJobFilters
from reformatters.sources import download
from reformatters.sources.download import (
    HOST_REQUEST_CAPS_ENV,
    DownloadConfig,
    HostRequestCapError,
    declare_host_request_caps,
    fetch_bytes,
    host_request_cap,
    parse_host_request_caps,
)
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.ecmwf_archive import ecmwf_grid, generate_ecmwf_archive

INIT = datetime(2026, 5, 12)
MEMBERS = tuple(range(8))
CAP = 3


def test_caps_parse_and_bad_ones_say_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_host_request_caps("data.ecmwf.int=8, 127.0.0.1:9000=3") == {"data.ecmwf.int": 8, "127.0.0.1:9000": 3}
    with pytest.raises(HostRequestCapError, match=r"expected host=N with N >= 1 .* found 'data.ecmwf.int=0'"):
        parse_host_request_caps("data.ecmwf.int=0")
    monkeypatch.setenv(HOST_REQUEST_CAPS_ENV, "example.invalid=2")
    declare_host_request_caps({"example.invalid": 5, "other.invalid": 4})
    assert host_request_cap("example.invalid") == 2  # the environment wins
    assert host_request_cap("other.invalid") == 4


def test_without_a_distributed_client_the_cap_holds_in_the_process(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 1000)
    with ArchiveServer(tmp_path) as server:
        server.add_fault("file", "delay", delay_seconds=0.05)
        host = server.url.removeprefix("http://")
        declare_host_request_caps({host: 2})
        assert isinstance(download._cap_semaphores[host][2], download._LocalCap)
        config = DownloadConfig(max_attempts=1)
        threads = [
            threading.Thread(target=fetch_bytes, args=(server.url_for("file"),), kwargs={"config": config})
            for _ in range(8)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.max_in_flight == 2
        assert time.perf_counter() - started >= 4 * 0.05  # eight 50 ms requests, two at a time
        assert sum(server.requests.values()) == 8


def test_a_backfill_on_two_workers_stays_within_the_cap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Eight members, nine archived steps and 76 steps not published (their `.index` answered 404): hundreds of
    requests from index tasks (parallel fetches) and downloads on two worker processes, each answered after 20 ms.
    The dataset declares 8 per host; the environment lowers the loopback host's cap to 3."""
    templates = Path(tempfile.mkdtemp(prefix="ecmwf-cap-templates-", dir=tmp_path))
    config = ecmwf_ifs_ens_template_config(
        ensemble_members=MEMBERS,
        resolution=6.0,
        chunks=(1, 85, 8, 31, 60),
        shards=(1, 85, 8, 31, 60),
        templates_dir=templates,
        append_dim_start="2026-05-12T00:00",
    )
    config.update_template(templates_dir=templates)
    archive = generate_ecmwf_archive(
        [INIT], range(0, 25, 3), members=MEMBERS, params=("2t",), grid=ecmwf_grid(6.0), workers=2
    )
    with ArchiveServer(archive.root) as server:
        server.add_fault("*", "delay", delay_seconds=0.02)
        monkeypatch.setenv(HOST_REQUEST_CAPS_ENV, f"{server.url.removeprefix('http://')}={CAP}")
        summary = EcmwfIfsEnsForecast15DayDataset(template_config=config).backfill(
            "2026-05-13T00:00",
            cluster="local",
            n_workers=2,
            store_url=str(tmp_path / "store.zarr"),
            source_url=server.url,
            filters=RegionJobFilters.parse(variable_names=["temperature_2m"]),
            show_progress=False,
        )
        requests = sum(server.requests.values())
        assert server.max_in_flight == CAP, (server.max_in_flight, requests)
    entry = summary.variables["temperature_2m"]
    assert entry.files_ok == 9 * len(MEMBERS) and entry.files_failed == 0, entry
    assert requests >= 76 + 9 * len(MEMBERS), requests
