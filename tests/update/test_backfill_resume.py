"""SIGKILL a backfill's driver and its workers at three points, run the same command again: the store equals an
undisturbed backfill's, and the re-run fetches nothing for the regions the killed run had uploaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.testing.archive_server import ArchiveServer
from reformatters.update.progress_tracker import BACKFILL_PROGRESS_PREFIX, UpdateProgressTracker, region_key

from .conftest import REPO, assert_same_store, cli_env
from .test_kill_resume import _wait_for

DATASET = ExampleDataset()
INITS = pd.date_range("2024-01-01T00:00", periods=8, freq="6h")  # four regions of two inits
END = INITS[-1] + pd.Timedelta("6h")
REGIONS = [INITS[i : i + 2] for i in range(0, len(INITS), 2)]
VARIABLES = {"temperature_2m", "precipitation_surface"}


@dataclass(frozen=True)
class BackfillSource:
    server: ArchiveServer
    reference: Path


@pytest.fixture(scope="module")
def backfill_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackfillSource]:
    root = tmp_path_factory.mktemp("backfill-resume")
    src = source.generate_source(root / "source", INITS)
    with ArchiveServer(src) as server:
        reference = root / "reference.zarr"
        done = subprocess.run(
            _command(reference, server.url), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield BackfillSource(server, reference)


def _command(store: Path, source_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reformatters.cli",
        "backfill",
        "example",
        END.isoformat(),
        "--store",
        str(store),
        "--source-url",
        source_url,
        "--workers",
        "2",
    ]


def _files(inits: pd.DatetimeIndex) -> list[str]:
    return [source.relative_path(init, int(hour)) for init in inits for hour in source.LEAD_HOURS]


@pytest.mark.parametrize(
    ("point", "skip"),
    [
        # The driver, once the first region is uploaded and recorded (this and the last with `-m slow`).
        pytest.param("backfill_region_done", 0, marks=pytest.mark.slow),
        ("upload", 2),  # a worker, at its third upload (after recording it): mid-run, mid-region
        pytest.param("before_publish", 0, marks=pytest.mark.slow),  # every region uploaded, nothing published
    ],
)
def test_killed_backfill_resumes_to_the_same_store(
    point: str, skip: int, backfill_source: BackfillSource, tmp_path: Path
) -> None:
    server = backfill_source.server
    store = tmp_path / "store.zarr"
    paused = tmp_path / "paused"
    killed = subprocess.Popen(
        _command(store, server.url),
        cwd=REPO,
        env=cli_env(
            {
                "REFORMATTERS_TEST_PAUSE_AT": point,
                "REFORMATTERS_TEST_PAUSE_SKIP": str(skip),
                "REFORMATTERS_TEST_PAUSE_FILE": str(paused),
            }
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(paused, killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    assert not (store / "zarr.json").exists(), "nothing is published before the end of a backfill"

    tracker = UpdateProgressTracker(str(store), "inspect", prefix=BACKFILL_PROGRESS_PREFIX)
    uploaded = [inits for inits in REGIONS if set(tracker.load(region_key("init_time", list(inits)))) == VARIABLES]
    if point == "before_publish":
        assert len(uploaded) == len(REGIONS)
    elif point == "backfill_region_done":
        assert uploaded, "the first region is recorded before the driver hears of it"

    server.reset_counters()
    rerun = subprocess.run(
        _command(store, server.url), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_store(store, backfill_source.reference)
    assert not tracker.all_keys(), "records go once the backfill is published"

    # The re-run's reachability probe asks for the first two files once (HEAD); nothing else of those regions.
    probe = {source.relative_path(INITS[0], 0), source.relative_path(INITS[0], 1)}
    for inits in uploaded:
        asked = {path: server.requests[path] for path in _files(inits) if server.requests[path] > int(path in probe)}
        assert not asked, f"the re-run fetched files of region {inits[0]} the killed run had uploaded: {asked}"
        assert all(server.bytes_sent[path] == 0 for path in _files(inits))
    rest = [inits for inits in REGIONS if not any(inits.equals(done) for done in uploaded)]
    for inits in rest:
        assert all(server.bytes_sent[path] > 0 for path in _files(inits)), "regions not recorded are fetched"
