"""Runs as the pods run them: the root filesystem read-only, HOME read-only, only the scratch directory writable.

The tests run as root here, where `chmod 0555` stops nothing; instead each run happens in a mount namespace of
its own (`unshare --mount`) in which every mount is remounted read-only (as a pod's `readOnlyRootFilesystem`)
except the scratch directory, bound writable (the pod's `emptyDir`), and the kernel's /proc, /sys and /dev (a pod
has its own, /dev/shm writable). HOME, TMPDIR and DASK_TEMPORARY_DIRECTORY are set as the rendered manifests set
them, HOME to a read-only directory: any write outside the scratch directory fails the run with EROFS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from reformatters.testing.noaa_archive import CACHE_ENV_VAR

REPO = Path(__file__).resolve().parents[1]

# Binds the scratch directory onto itself (a mount of its own, left writable), then remounts every other mount
# read-only, except the kernel's.
READ_ONLY_EXCEPT_SCRATCH = r"""
set -euo pipefail
scratch="$1"; shift
mount --bind "$scratch" "$scratch"
while read -r _ mountpoint _; do
  mountpoint="$(printf '%b' "$mountpoint")"
  case "$mountpoint" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|"$scratch") continue ;; esac
  mount -o remount,bind,ro "$mountpoint"
done < /proc/self/mounts
exec "$@"
"""


def read_only_run(
    argv: list[str], scratch: Path, home: Path, timeout: float = 600, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env |= {
        "HOME": str(home),
        "TMPDIR": str(scratch),
        "DASK_TEMPORARY_DIRECTORY": str(scratch),
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }
    command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", READ_ONLY_EXCEPT_SCRATCH, "ro"]
    return subprocess.run(
        [*command, str(scratch), *argv], capture_output=True, text=True, timeout=timeout, cwd=home, env=env
    )


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(scratch, home): the probe proves writes land in scratch only, before any run relies on it."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to make a read-only mount namespace")
    scratch, home = tmp_path / "scratch", tmp_path / "home"
    scratch.mkdir()
    home.mkdir(mode=0o555)
    probe = read_only_run(
        ["bash", "-c", f'touch "{scratch}/ok" && ! touch "$HOME/x" 2>/dev/null && ! touch "{REPO}/x" 2>/dev/null'],
        scratch,
        home,
        timeout=60,
    )
    if "unshare failed" in probe.stderr or "Operation not permitted" in probe.stderr:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    assert probe.returncode == 0, f"the sandbox leaves more than the scratch directory writable: {probe.stderr}"
    assert (scratch / "ok").exists() and not (home / "x").exists() and not (REPO / "x").exists()
    return scratch, home


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reformatters.cli", *args]


def test_example_backfill_and_update_write_only_to_scratch(sandbox: tuple[Path, Path], tmp_path: Path) -> None:
    from reformatters_datasets.example import source

    scratch, home = sandbox
    inits = pd.date_range("2024-01-01T00:00", periods=4, freq="6h")
    archive = source.generate_source(tmp_path / "source", inits)  # read-only during the runs, like a bucket
    store = scratch / "example.zarr"
    backfill = read_only_run(
        cli(
            "backfill",
            "example",
            inits[2].isoformat(),
            "--workers",
            "2",
            "--store",
            str(store),
            "--source-url",
            str(archive),
        ),
        scratch,
        home,
    )
    assert backfill.returncode == 0, backfill.stderr[-4000:]
    update = read_only_run(
        cli(
            "update",
            "example",
            "--store",
            str(store),
            "--source-url",
            str(archive),
            "--now",
            inits[-1].isoformat(),
            "--workers",
            "2",
        ),
        scratch,
        home,
    )
    assert update.returncode == 0, update.stderr[-4000:]
    published = xr.open_zarr(store)
    assert list(published.indexes["init_time"]) == list(inits)
    # Dask's worker directories were made where the manifests point them: the scratch directory.
    assert (scratch / "dask-scratch-space").is_dir()
    assert not any(home.iterdir())


@pytest.mark.slow
def test_the_demo_runs_with_only_the_scratch_directory_writable(sandbox: tuple[Path, Path]) -> None:
    scratch, home = sandbox
    workdir = scratch / "demo"
    result = read_only_run(
        cli("demo", "--preset", "small", "--workdir", str(workdir)),
        scratch,
        home,
        timeout=1800,
        **{CACHE_ENV_VAR: str(scratch / "archives")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "validation of noaa-gfs-forecast" in result.stderr and ": passed" in result.stderr
    assert "update of noaa-gfs-forecast" in result.stderr
    published = xr.open_zarr(workdir / "noaa-gfs-forecast.zarr")
    assert published.sizes["init_time"] == 3
    assert not any(home.iterdir())


def test_a_run_whose_temporary_directory_is_off_scratch_fails_there(sandbox: tuple[Path, Path], tmp_path: Path) -> None:
    """The sandbox is no formality: pointing Dask's temporary directory at read-only HOME breaks the run."""
    from reformatters_datasets.example import source

    scratch, home = sandbox
    inits = pd.date_range("2024-01-01T00:00", periods=2, freq="6h")
    archive = source.generate_source(tmp_path / "source", inits)
    store = scratch / "example.zarr"
    args = ("backfill", "example", inits[-1].isoformat(), "--workers", "2", "--store", str(store))
    result = read_only_run(
        cli(*args, "--source-url", str(archive)), scratch, home, timeout=300, DASK_TEMPORARY_DIRECTORY=str(home)
    )
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr, result.stderr[-3000:]
