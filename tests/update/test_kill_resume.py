"""SIGKILL an update at named points, re-run it: the store equals an uninterrupted run's, and a reader in
another process never sees an invalid state meanwhile."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.update.lease import LEASE_KEY, read_lease
from reformatters.update.progress_tracker import PROGRESS_PREFIX, UpdateProgressTracker

from .conftest import NOW, REPO, UpdateFixture, assert_same_store, cli_env, copy_store, update_command

DATASET = ExampleDataset()
FIRST_REGION = "init_time-20240101T120000-20240101T180000"
VARIABLES = {"temperature_2m", "precipitation_surface"}


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the update exited ({proc.returncode}) before pausing: {proc.stderr and proc.stderr.read()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"the update never reached its pause point ({path})")
        time.sleep(0.05)


class _LineCollector(logging.Handler):
    # Not caplog: a LocalCluster's `silence_logs` sets the level of the root's capture handlers to WARNING for as
    # long as the cluster lives, which hides the driver's INFO lines from caplog.
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize(
    "point",
    [
        # Two kill points in the default run, all four with `-m slow` (each one is an update, killed, and a re-run).
        pytest.param("download", marks=pytest.mark.slow),
        "upload",
        "before_publish",
        pytest.param("mid_publish", marks=pytest.mark.slow),
    ],
)
def test_kill_then_rerun_equals_uninterrupted(point: str, update_fixture: UpdateFixture, tmp_path: Path) -> None:
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    stop_reader = tmp_path / "stop-reader"
    reader_result = tmp_path / "reader.json"
    reader = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reader.py")), str(store), str(reader_result), str(stop_reader)],
        cwd=REPO,
        env=cli_env(),
    )
    marker = tmp_path / "paused"
    update = subprocess.Popen(
        update_command(store, update_fixture.source),
        cwd=REPO,
        env=cli_env({"REFORMATTERS_TEST_PAUSE_AT": point, "REFORMATTERS_TEST_PAUSE_FILE": str(marker)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(marker, update)
        if point == "mid_publish":
            # Per-array metadata already says 4 inits; readers open the root's consolidated metadata: still 3.
            assert json.loads((store / "temperature_2m" / "zarr.json").read_text())["shape"][0] >= 4
            assert DATASET.open_published(str(store)).sizes["init_time"] == 3
    finally:
        os.killpg(update.pid, signal.SIGKILL)
        update.wait(timeout=30)
    assert ObjectStore(store).exists(LEASE_KEY), "the killed run's lease is left behind"

    tracker = UpdateProgressTracker(str(store), "inspect")
    recorded = {(key, name) for key in tracker.all_keys() for name in tracker.load(key)}
    if point in ("before_publish", "mid_publish"):
        assert {(FIRST_REGION, name) for name in VARIABLES} <= recorded
    elif point == "upload":
        assert recorded, "at least the variable whose upload paused is recorded"
    else:
        assert not recorded

    update_log = logging.getLogger("reformatters.update")
    collector = _LineCollector()
    previous_level = update_log.level
    update_log.addHandler(collector)
    update_log.setLevel(logging.INFO)
    try:
        DATASET.update(
            cluster="local",
            store_url=str(store),
            source_url=str(update_fixture.source),
            now=NOW,
            n_workers=2,
            show_progress=False,
        )
    finally:
        update_log.removeHandler(collector)
        update_log.setLevel(previous_level)
    skipped = {
        (key, name)
        for key, name in recorded
        for line in collector.lines
        if f"region {key} {name}: " in line and "skipped, uploaded by run" in line
    }
    assert skipped == recorded, "the re-run skips exactly what the killed run recorded as uploaded"
    assert_same_store(store, update_fixture.reference_store)
    assert not ObjectStore(store).list(PROGRESS_PREFIX)
    lease = read_lease(ObjectStore(store))
    assert lease is not None and lease.released, "the re-run releases the lease it took over"

    stop_reader.touch()
    reader.wait(timeout=60)
    result = json.loads(reader_result.read_text())
    assert result["errors"] == []
    assert result["opens"] > 0
    # Torn reads (see reader.py) are rare: a handful of shard replacements against a reader polling every 10 ms.
    assert result["torn_reads"] <= 2, result
    assert result["extents"] == sorted(result["extents"]) and set(result["extents"]) <= {3, 4, 6, 7}
    assert result["extents"][0] == 3 and result["extents"][-1] == 7
