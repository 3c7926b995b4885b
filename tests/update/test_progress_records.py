"""Progress records are data: planted records are never executed, records of another schema are ignored with a
warning, and files a killed run found missing are asked for again on resume."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.update.progress_tracker import PROGRESS_PREFIX, UpdateProgressTracker

from .conftest import INITS, NOW, REPO, UpdateFixture, assert_same_store, cli_env, copy_store, update_command
from .test_kill_resume import _wait_for

DATASET = ExampleDataset()
FIRST_REGION = "init_time-20240101T120000-20240101T180000"
SECOND_REGION = "init_time-20240102T000000-20240102T060000"


class _Planted:
    """Unpickling this creates the marker file: what a record written by anyone with bucket access could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def progress_log() -> Iterator[_Collector]:
    logger = logging.getLogger("reformatters.progress_records")
    collector = _Collector()
    previous = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.setLevel(previous)


def test_planted_records_are_not_executed_and_old_schemas_are_ignored(
    update_fixture: UpdateFixture, tmp_path: Path, progress_log: _Collector
) -> None:
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps([_Planted(marker)])
    pickle.loads(payload)
    assert marker.exists(), "the planted payload runs code when unpickled"
    marker.unlink()

    objects = ObjectStore(store)
    planted = {
        # The format of earlier releases: JSON carrying a pickle of the coords, claiming a finished upload.
        f"{PROGRESS_PREFIX}/{FIRST_REGION}/temperature_2m.json": json.dumps(
            {
                "run_id": "old",
                "region": FIRST_REGION,
                "variable": "temperature_2m",
                "metadata_digest": "0",
                "gated": False,
                "files": [],
                "bytes_fetched": 0,
                "bytes_written": 0,
                "objects_written": 0,
                "results_pickle": base64.b64encode(payload).decode(),
            }
        ).encode(),
        # A bare pickle.
        f"{PROGRESS_PREFIX}/{FIRST_REGION}/precipitation_surface.json": payload,
        # Another schema, otherwise shaped like this release's records.
        f"{PROGRESS_PREFIX}/{SECOND_REGION}/temperature_2m.json": json.dumps(
            {
                "schema": 1,
                "run_id": "old",
                "region": SECOND_REGION,
                "variable": "temperature_2m",
                "metadata_digest": "0",
                "recorded_at": 0.0,
                "files": [],
                "bytes_fetched": 0,
                "bytes_written": 0,
                "objects_written": 0,
            }
        ).encode(),
    }
    for key, data in planted.items():
        objects.put(key, data)

    DATASET.update(
        cluster="local",
        store_url=str(store),
        source_url=str(update_fixture.source),
        now=NOW,
        n_workers=2,
        show_progress=False,
    )

    assert not marker.exists(), "a progress record was unpickled"
    warnings = [line for line in progress_log.lines if line.startswith("WARNING")]
    for key in planted:
        assert any(key in line for line in warnings), f"no warning names {key}: {warnings}"
    assert any("not JSON" in line for line in warnings)
    assert any("schema None" in line for line in warnings)
    assert any("schema 1" in line for line in warnings)
    assert_same_store(store, update_fixture.reference_store)
    assert not objects.list(PROGRESS_PREFIX), "records go once their region is published"


def test_resumed_update_asks_again_for_files_missing_when_it_was_killed(
    update_fixture: UpdateFixture, tmp_path: Path, progress_log: _Collector
) -> None:
    """Killed after the region holding INITS[4] was uploaded while its leads 3-5 were not published; they are
    published before the re-run, which then equals an uninterrupted update of the full source."""
    source = Path(shutil.copytree(update_fixture.source, tmp_path / "source"))
    held_back = tmp_path / "held-back"
    held_back.mkdir()
    init_dir = source / f"{INITS[4]:%Y%m%d%H}"
    for hour in (3, 4, 5):
        (init_dir / f"example.f{hour:03d}.npz").rename(held_back / f"example.f{hour:03d}.npz")
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    paused = tmp_path / "paused"
    update = subprocess.Popen(
        update_command(store, source),
        cwd=REPO,
        # The second region's publication: every record of it is written by then.
        env=cli_env(
            {
                "REFORMATTERS_TEST_PAUSE_AT": "before_publish",
                "REFORMATTERS_TEST_PAUSE_SKIP": "1",
                "REFORMATTERS_TEST_PAUSE_FILE": str(paused),
            }
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(paused, update)
    finally:
        os.killpg(update.pid, signal.SIGKILL)
        update.wait(timeout=30)
    records = UpdateProgressTracker(str(store), "inspect").load(SECOND_REGION)
    assert set(records) == {"temperature_2m", "precipitation_surface"}
    assert all(record.files_not_found == 3 for record in records.values())

    for path in held_back.iterdir():
        path.rename(init_dir / path.name)
    DATASET.update(
        cluster="local", store_url=str(store), source_url=str(source), now=NOW, n_workers=2, show_progress=False
    )
    assert_same_store(store, update_fixture.reference_store)
    asked_again = [line for line in progress_log.lines if "asking for them again" in line]
    assert len(asked_again) == 2 and all(SECOND_REGION in line for line in asked_again), progress_log.lines
