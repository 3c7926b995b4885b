"""Replicas through the CLI: a region is published on every replica before the primary (a run paused between the
two shows it on the replica only), a replica whose server stops fails the run before the primary moves, and the
next run catches the replica up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.replicas import Replica
from reformatters.testing.object_store_server import moto_server
from reformatters.update.pause import PAUSE_ENV, PAUSE_FILE_ENV, PAUSE_MODE_ENV, PAUSE_ONCE_ENV
from tests.replica_dataset import replicas_env

from . import conftest
from .conftest import NOW, UpdateFixture, assert_same_store, copy_store, run_cli, store_objects, update_command
from .test_fenced_publisher import _wait_stopped


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as err:  # a file, not a pipe: a stopped run must not block on a full pipe first
        return subprocess.Popen(
            command,
            cwd=conftest.REPO,
            env=conftest.cli_env(env),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            start_new_session=True,
        )


def _wait_paused(marker: Path, run: subprocess.Popen[str], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert run.poll() is None, f"the run exited ({run.returncode}) before pausing: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the run never paused: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    _wait_stopped(run.pid)


def _finish(run: subprocess.Popen[str], log: Path) -> str:
    try:
        os.killpg(run.pid, signal.SIGCONT)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
    return log.read_text()


def _objects(store: ObjectStore) -> dict[str, bytes | None]:
    return {key: store.get(key) for key in store.list() if not key.startswith("_internal")}


def test_a_run_paused_between_replica_and_primary_shows_the_region_on_the_replica_only(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    primary = copy_store(update_fixture.base_store, tmp_path / "primary.zarr")
    replica = tmp_path / "copy.zarr"  # empty: the run catches it up to the primary before publishing
    base_root = (primary / "zarr.json").read_bytes()
    marker, log = tmp_path / "paused", tmp_path / "run.log"
    env = {
        **replicas_env(Replica(name="copy", url=str(replica))),
        PAUSE_ENV: "replicas_published",
        PAUSE_MODE_ENV: "stop",
        PAUSE_ONCE_ENV: "1",  # the first region only
        PAUSE_FILE_ENV: str(marker),
    }
    run = _start(update_command(primary, update_fixture.source), env, log)
    try:
        _wait_paused(marker, run, log)
        assert (primary / "zarr.json").read_bytes() == base_root, "the primary moved before the replica"
        on_primary = xr.open_zarr(primary, decode_timedelta=True).init_time.values
        on_replica = xr.open_zarr(replica, decode_timedelta=True).init_time.values
        assert len(on_replica) == len(on_primary) + 1
        assert list(on_replica[: len(on_primary)]) == list(on_primary)
    finally:
        err = _finish(run, log)
    assert run.returncode == 0, err[-3000:]
    assert "catching it up" in err
    assert_same_store(primary, update_fixture.reference_store)
    assert_same_store(replica, update_fixture.reference_store)
    validate = [*update_command(primary, update_fixture.source)[:4], "validate", "example", "--store", str(primary)]
    checked = run_cli([*validate, "--now", NOW.isoformat()], env=replicas_env(Replica(name="copy", url=str(replica))))
    assert checked.returncode == 0, checked.stdout + checked.stderr[-2000:]
    assert "ok   replica copy matches primary: same extent and coordinates, 40 sampled chunks equal" in checked.stdout


def test_a_replica_whose_server_stops_fails_the_run_before_the_primary_moves_and_is_caught_up_next(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    primary = copy_store(update_fixture.base_store, tmp_path / "primary.zarr")
    base = xr.open_zarr(update_fixture.base_store, decode_timedelta=True).load()
    base_root = (primary / "zarr.json").read_bytes()
    replica = Replica(name="far", url="s3://bucket/far/example.zarr")
    marker, log = tmp_path / "paused", tmp_path / "run.log"
    with moto_server() as server:
        server_env = {f"{replica.env_prefix}{k}": v for k, v in server.env().items()}
        env = {
            **replicas_env(replica),
            **server_env,
            "AWS_MAX_ATTEMPTS": "1",  # the stopped server fails the run at the first refused connection
            PAUSE_ENV: "before_replicas",
            PAUSE_MODE_ENV: "stop",
            PAUSE_ONCE_ENV: "1",
            PAUSE_FILE_ENV: str(marker),
        }
        run = _start(update_command(primary, update_fixture.source), env, log)
        try:
            _wait_paused(marker, run, log)
        except BaseException:
            _finish(run, log)
            raise
    err = _finish(run, log)  # the replica's server is gone when the run publishes its first region
    assert run.returncode != 0, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "replica far" in errors[0] and "Nothing more was published on the primary" in errors[0]
    assert "Traceback" not in err
    assert (primary / "zarr.json").read_bytes() == base_root
    xr.testing.assert_identical(xr.open_zarr(primary, decode_timedelta=True).load(), base)

    with moto_server() as server:
        env = {**replicas_env(replica), **{f"{replica.env_prefix}{k}": v for k, v in server.env().items()}}
        second = run_cli(update_command(primary, update_fixture.source), env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        saved = dict(os.environ)
        try:
            os.environ.update(env)
            replica_objects = _objects(replica.store())
        finally:
            os.environ.clear()
            os.environ.update(saved)
    assert_same_store(primary, update_fixture.reference_store)
    assert replica_objects == store_objects(update_fixture.reference_store)


@pytest.mark.slow
def test_a_run_killed_between_replica_and_primary_is_finished_by_the_next(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """The replica is then a region ahead of the primary: the next run leaves it as it is, publishes the region on
    it again and then on the primary; both end as the uninterrupted update."""
    primary = copy_store(update_fixture.base_store, tmp_path / "primary.zarr")
    replica = tmp_path / "copy.zarr"
    declared = replicas_env(Replica(name="copy", url=str(replica)))
    marker, log = tmp_path / "paused", tmp_path / "run.log"
    env = {**declared, PAUSE_ENV: "replicas_published", PAUSE_FILE_ENV: str(marker)}
    run = _start(update_command(primary, update_fixture.source), env, log)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    ahead = xr.open_zarr(replica, decode_timedelta=True).sizes["init_time"]
    assert ahead == xr.open_zarr(primary, decode_timedelta=True).sizes["init_time"] + 1
    second = run_cli(update_command(primary, update_fixture.source), env=declared)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "catching it up" not in second.stderr
    assert_same_store(primary, update_fixture.reference_store)
    assert_same_store(replica, update_fixture.reference_store)


def _backfill_command(store: Path, source: Path, end: str) -> list[str]:
    command = update_command(store, source)
    now = command.index("--now")
    del command[now : now + 2]
    command[command.index("update") : command.index("update") + 2] = ["backfill", "example", end]
    return command


# The backfill repeats the update through the same upload tasks: selected with `-m slow`.
@pytest.mark.parametrize("kind", ["update", pytest.param("backfill", marks=pytest.mark.slow)])
def test_a_replica_whose_server_stops_before_the_workers_upload_fails_the_run_before_the_primary_moves(
    update_fixture: UpdateFixture, tmp_path: Path, kind: str
) -> None:
    """The workers write each region's shards to the replica: its server gone once the run has caught it up (and
    before any upload), the upload tasks fail, the run exits non-zero with one line naming the replica, and the
    primary publishes what it published before; the next run, the server back, ends with both stores equal."""
    primary = copy_store(update_fixture.base_store, tmp_path / "primary.zarr")
    base_objects = store_objects(primary)
    replica = Replica(name="far", url=f"s3://bucket/far-{kind}/example.zarr")  # moto keeps objects in-process
    command = (
        update_command(primary, update_fixture.source)
        if kind == "update"
        else _backfill_command(primary, update_fixture.source, (NOW + pd.Timedelta("6h")).isoformat())
    )
    marker, log = tmp_path / "paused", tmp_path / "run.log"
    with moto_server() as server:
        env = {
            **replicas_env(replica),
            **{f"{replica.env_prefix}{k}": v for k, v in server.env().items()},
            "AWS_MAX_ATTEMPTS": "1",
            PAUSE_ENV: "replicas_caught_up",
            PAUSE_MODE_ENV: "stop",
            PAUSE_ONCE_ENV: "1",
            PAUSE_FILE_ENV: str(marker),
        }
        run = _start(command, env, log)
        try:
            _wait_paused(marker, run, log)
            caught_up = _objects_with(env, replica)
        except BaseException:
            _finish(run, log)
            raise
    assert caught_up == base_objects  # the replica held the primary's dataset when the server stopped
    err = _finish(run, log)
    assert run.returncode != 0, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert f"replica far (s3://bucket/far-{kind}/example.zarr) failed while uploading variable" in errors[0]
    assert "Nothing was published on the primary for this region" in errors[0]
    assert "Traceback (most recent call last)" not in err  # the workers' logs show the failed tasks, the run one line
    assert {k: v for k, v in store_objects(primary).items() if k.endswith("zarr.json") or "/c/" not in k} == {
        k: v for k, v in base_objects.items() if k.endswith("zarr.json") or "/c/" not in k
    }, "the primary's metadata moved"

    with moto_server() as server:
        env = {**replicas_env(replica), **{f"{replica.env_prefix}{k}": v for k, v in server.env().items()}}
        second = run_cli(command, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        replica_objects = _objects_with(env, replica)
    assert_same_store(primary, update_fixture.reference_store)
    assert replica_objects == store_objects(update_fixture.reference_store)


def _objects_with(env: dict[str, str], replica: Replica) -> dict[str, bytes | None]:
    """The replica's objects, read with the run's credentials."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return _objects(replica.store())
    finally:
        os.environ.clear()
        os.environ.update(saved)
