"""A run that cannot start writes nothing: the CLI exits non-zero with one line, and the store has no object.

Each case runs the real CLI on the example dataset in a subprocess: an unreachable scheduler, no Kubernetes
credentials, a store that cannot be written, a source that answers nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from reformatters_datasets.example import source

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "reformatters.cli", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_failed_with_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def objects_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def example_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failed-start") / "source"
    return source.generate_source(root, pd.date_range("2024-01-01", periods=2, freq="6h"))


def backfill_args(store: Path, *extra: str) -> list[str]:
    return ["backfill", "example", "2024-01-01T12:00", "--store", str(store), "--workers", "1", *extra]


def test_unreachable_scheduler_writes_nothing(tmp_path: Path, example_archive: Path) -> None:
    address = f"tcp://127.0.0.1:{closed_port()}"
    store = tmp_path / "store.zarr"
    result = run_cli(backfill_args(store, "--cluster", address, "--source-url", str(example_archive)), tmp_path)
    assert_failed_with_one_line(result, address)
    assert objects_under(tmp_path) == [], "nothing may be written before the cluster is up"


def test_no_kubernetes_credentials_writes_nothing(tmp_path: Path, example_archive: Path) -> None:
    nowhere = tmp_path / "no-such-kubeconfig"
    store = tmp_path / "store.zarr"
    result = run_cli(
        backfill_args(store, "--cluster", "k8s", "--source-url", str(example_archive)),
        tmp_path,
        KUBECONFIG=str(nowhere),
    )
    assert_failed_with_one_line(result, "Kubernetes credentials", str(nowhere))
    assert objects_under(tmp_path) == []


def test_unwritable_store_fails_with_one_line(tmp_path: Path, example_archive: Path) -> None:
    # A regular file where the store's parent directory should be: no user, root included, can write there.
    (tmp_path / "a-file").write_text("not a directory")
    store = tmp_path / "a-file" / "store.zarr"
    result = run_cli(backfill_args(store, "--cluster", "local", "--source-url", str(example_archive)), tmp_path)
    assert_failed_with_one_line(result, "cannot write to the store", str(store), "nothing was written")
    assert objects_under(tmp_path) == ["a-file"]


@pytest.mark.parametrize("command", ["backfill", pytest.param("update", marks=pytest.mark.slow)])
def test_source_that_answers_nothing_fails_fast_and_writes_nothing(
    tmp_path: Path, example_archive: Path, command: str
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    store = tmp_path / "store.zarr"
    if command == "backfill":
        args = backfill_args(store, "--cluster", "local", "--source-url", dead)
    else:
        # An update needs a published store: a backfill from the archive first.
        backfilled = run_cli(backfill_args(store, "--cluster", "local", "--source-url", str(example_archive)), tmp_path)
        assert backfilled.returncode == 0, backfilled.stderr[-2000:]
        args = ["update", "example", "--store", str(store), "--source-url", dead, "--now", "2024-01-01T12:00"]
        args += ["--workers", "1"]
    before = {key: (store / key).read_bytes() for key in objects_under(store)}
    result = run_cli(args, tmp_path)
    assert_failed_with_one_line(result, "answers nothing", dead, "nothing was written")
    assert {key: (store / key).read_bytes() for key in objects_under(store)} == before


def test_a_source_answering_404_is_normal(tmp_path: Path) -> None:
    """An HTTP source that exists but lacks every file: the run completes, every file counted as missing."""
    from reformatters.testing.archive_server import ArchiveServer

    empty = tmp_path / "empty-archive"
    empty.mkdir()
    store = tmp_path / "store.zarr"
    with ArchiveServer(empty) as server:
        result = run_cli(backfill_args(store, "--cluster", "local", "--source-url", server.url), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2/2 regions" in result.stdout or "1/1 regions" in result.stdout, result.stdout
