"""The fenced publisher with the real `reformatters update` of the example dataset in subprocesses: a publisher
stopped (SIGSTOP) past its lease's TTL writes nothing once resumed (local disk and GCS), and SIGTERM releases the
lease and stops the cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from reformatters.common.storage import ObjectStore
from reformatters.testing.object_store_server import GCSServer
from reformatters.update.lease import HOLDER_ENV, TTL_ENV, commit_records, read_lease
from reformatters.update.progress_tracker import PROGRESS_PREFIX

from .conftest import (
    REPO,
    UpdateFixture,
    assert_same_store,
    cli_env,
    copy_store,
    run_cli,
    store_objects,
    update_command,
)

pytest_plugins = ["tests.object_store_backends"]  # the gcs fixture

STALE_TTL = 4.0


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the update exited ({proc.returncode}) before pausing: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the update never reached its pause point ({path})")
        time.sleep(0.05)


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "the update did not stop itself"
        time.sleep(0.05)


def _snapshot(store: ObjectStore) -> dict[str, tuple[bytes, str]]:
    """Every object outside `_internal/` with its bytes and version (local: inode and times, GCS: generation):
    any write, even of the same bytes, changes the entry."""
    snapshot = {}
    for key in store.list():
        if not key.startswith("_internal"):
            data, version = store.get_with_version(key) or (b"", "")
            snapshot[key] = (data, version)
    return snapshot


@pytest.fixture(params=["local", "gcs"])
def base_store(request: pytest.FixtureRequest, update_fixture: UpdateFixture, tmp_path: Path) -> Iterator[ObjectStore]:
    """A copy of the published base on local disk or in fake-gcs-server (its environment set meanwhile)."""
    if request.param == "local":
        yield ObjectStore(copy_store(update_fixture.base_store, tmp_path / "store.zarr"))
        return
    server: GCSServer = request.getfixturevalue("gcs")
    with server.environment():
        store = ObjectStore(server.url(f"stale-{tmp_path.name}/example.zarr"))
        for key, data in store_objects(update_fixture.base_store).items():
            store.put(key, data)
        yield store


def _same_objects(store: ObjectStore, reference: Path) -> None:
    if store.is_local:
        assert_same_store(Path(store.url), reference)
        return
    want: dict[str, Any] = store_objects(reference)
    got = {key: store.get(key) for key in store.list() if not key.startswith("_internal")}
    assert sorted(got) == sorted(want)
    assert [key for key in want if got[key] != want[key]] == []


def _group_processes(pgid: int) -> list[int]:
    alive = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


@pytest.mark.slow
def test_stale_publisher_writes_nothing_after_resuming(
    base_store: ObjectStore, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = base_store
    marker = tmp_path / "stopped"
    # The first update publishes its first region, then stops itself (SIGSTOP) before publishing the second:
    # its chunk uploads have begun and its lease stops being renewed.
    stale = subprocess.Popen(
        update_command(store.url, update_fixture.source),
        cwd=REPO,
        env=cli_env(
            {
                "REFORMATTERS_TEST_PAUSE_AT": "before_publish",
                "REFORMATTERS_TEST_PAUSE_SKIP": "1",
                "REFORMATTERS_TEST_PAUSE_MODE": "stop",
                "REFORMATTERS_TEST_PAUSE_FILE": str(marker),
                TTL_ENV: str(STALE_TTL),
                HOLDER_ENV: "pod-a",
            }
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(marker, stale)
        _wait_stopped(stale.pid)
        stale_lease = read_lease(store)
        assert stale_lease is not None and stale_lease.holder == "pod-a" and not stale_lease.released

        # Another pod watches the lease go unrenewed for its TTL, takes over and runs to the end.
        second = run_cli(update_command(store.url, update_fixture.source), env={HOLDER_ENV: "pod-b"})
        assert second.returncode == 0, second.stderr[-3000:]
        assert "took over the publisher lease" in second.stderr
        after_second = _snapshot(store)
        successor = read_lease(store)
        assert successor is not None and successor.holder == "pod-b" and successor.released
        assert successor.generation > stale_lease.generation

        os.kill(stale.pid, signal.SIGCONT)
        _, err = stale.communicate(timeout=120)
    finally:
        if stale.poll() is None:
            os.killpg(stale.pid, signal.SIGKILL)
            stale.wait(timeout=30)
    assert stale.returncode != 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "publisher lease lost" in lines[0] and "pod-b" in lines[0], err[-3000:]
    assert "Traceback" not in err

    assert _snapshot(store) == after_second, "the resumed publisher wrote objects readers see"
    _same_objects(store, update_fixture.reference_store)
    assert not store.list(PROGRESS_PREFIX)
    records = commit_records(store)
    generations = [r.generation for r in records]
    assert generations == sorted(generations) and generations[0] == stale_lease.generation
    assert {r.body["holder"] for r in records} == {"pod-a", "pod-b"}
    assert all(r.body["holder"] == "pod-b" for r in records if r.generation == successor.generation)


def test_sigterm_during_update_releases_lease_and_stops_cluster(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    marker = tmp_path / "paused"
    update = subprocess.Popen(
        update_command(store, update_fixture.source),
        cwd=REPO,
        env=cli_env({"REFORMATTERS_TEST_PAUSE_AT": "before_publish", "REFORMATTERS_TEST_PAUSE_FILE": str(marker)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(marker, update)
        held = read_lease(ObjectStore(store))
        assert held is not None and not held.released
        assert len(_group_processes(update.pid)) > 1, "the update runs a cluster of worker processes"
        update.send_signal(signal.SIGTERM)
        _, err = update.communicate(timeout=120)
    finally:
        if update.poll() is None:
            os.killpg(update.pid, signal.SIGKILL)
            update.wait(timeout=30)
    assert update.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err
    released = read_lease(ObjectStore(store))
    assert released is not None and released.released and released.owner == held.owner
    deadline = time.monotonic() + 30
    while _group_processes(update.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_processes(update.pid), "worker processes outlived the update"
