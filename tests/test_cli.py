"""The command line as a user meets it: wrong input, Ctrl-C, what reaches the terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "reformatters.cli"]


@pytest.mark.parametrize("end", ["01/02/2025", "Jan 5 2025", "now"])
def test_a_time_that_is_not_iso_8601_is_refused_in_one_line(end: str, tmp_path: Path) -> None:
    completed = subprocess.run(
        [*CLI, "backfill", "example", end, "--store", str(tmp_path / "store.zarr")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: {end!r} is not an ISO 8601 time; write a date or a date and time, e.g. 2025-01-31, "
        "2025-01-31T06:00 or 2025-01-31T06:00Z"
    ]
    assert not (tmp_path / "store.zarr").exists()


def test_verbose_shows_the_runs_own_steps_and_not_dasks_housekeeping(tmp_path: Path) -> None:
    """`-v` shows the lease and the regions at INFO, not the cluster's worker starts and stops (Dask's INFO lines,
    dozens per run); the run publishes while its workers shut down, with nothing sent to them."""
    (tmp_path / "empty-source").mkdir()
    store = tmp_path / "store.zarr"
    args = ["backfill", "example", "2024-01-01T12:00", "--store", str(store), "--source-url"]
    verbose = subprocess.run(
        [*CLI, "-v", *args, str(tmp_path / "empty-source")], capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    lines = verbose.stderr.splitlines()
    assert any(" INFO reformatters.update: publisher lease " in line and "acquired" in line for line in lines)
    assert any(" INFO reformatters.driver: region init_time 2024-01-01T00:00" in line for line in lines)
    assert not [line for line in lines if " distributed." in line], verbose.stderr[-3000:]


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_backfill_with_one_line_and_exit_130(tmp_path: Path) -> None:
    (tmp_path / "empty-source").mkdir()
    # Every source file missing: about a thousand fast regions, still running when the signal comes.
    process = subprocess.Popen(
        [
            *CLI,
            "backfill",
            "example",
            "2025-06-02T00:00",
            "--store",
            str(tmp_path / "store.zarr"),
            "--source-url",
            str(tmp_path / "empty-source"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # A foreground job gets Ctrl-C; a test run started with `&` by a non-interactive shell ignores SIGINT, its
        # children inherit that and Python then installs no KeyboardInterrupt handler (the run went on to the end).
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert process.stderr is not None
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("region 3/" in line for line in stderr_lines):
        assert process.poll() is None, "".join(stderr_lines)
        assert time.monotonic() < deadline, "no region finished within 120 s:\n" + "".join(stderr_lines)
        time.sleep(0.1)
    seen = len(stderr_lines)
    # A terminal's Ctrl-C: SIGINT to every process of the foreground group, the cluster's workers included.
    os.killpg(process.pid, signal.SIGINT)
    # Diagnostics for a rare failure (the driver once ran on to the end): its signal dispositions now, and, if it
    # is still running after 30 s, every thread's stack (the CLI dumps them on SIGUSR1).
    status = Path(f"/proc/{process.pid}/status")
    dispositions = (
        [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
    )
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGUSR1)
        process.wait(timeout=120)
    reader.join(timeout=10)  # the only reader of stderr: communicate() would race it for the last lines
    assert process.stdout is not None
    stdout = process.stdout.read()
    after = [line for line in stderr_lines[seen:] if "region " not in line or " done (" not in line]
    assert process.returncode == 130, "\n".join(dispositions) + "\n" + "".join(stderr_lines[-80:])
    assert after == ["interrupted: backfill stopped before it finished; run the same command again to finish it\n"]
    assert "Traceback" not in "".join(stderr_lines)
    assert stdout == ""


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "empty-source").mkdir()
    store = tmp_path / "store.zarr"
    args = ["backfill", "example", "2024-01-03T00:00", "--store", str(store), "--source-url"]
    process = subprocess.Popen(
        [*CLI, *args, str(tmp_path / "empty-source")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("regions; Dask dashboard" in line for line in stderr_lines):
        assert process.poll() is None, "".join(stderr_lines)
        assert time.monotonic() < deadline, "".join(stderr_lines)
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGUSR1)
    process.wait(timeout=180)
    reader.join(timeout=10)
    text = "".join(stderr_lines)
    assert process.returncode == 0, text[-3000:]
    assert "most recent call first" in text, text[-3000:]  # faulthandler's stack dump
    assert store.exists()
