"""A test hook: `REFORMATTERS_TEST_PAUSE_AT=<point>` makes the process sleep at that named point.

Tests use it to SIGKILL an update at a deterministic moment. When the point is reached, the file named by
`REFORMATTERS_TEST_PAUSE_FILE` (if set) is created so the test knows the process is parked there.
`REFORMATTERS_TEST_PAUSE_SKIP=N` passes the point N times before pausing at it, and
`REFORMATTERS_TEST_PAUSE_MODE=stop` makes the process stop itself with SIGSTOP instead of sleeping, so that a
SIGCONT resumes it right there (a publisher paused past its lease's TTL). With `REFORMATTERS_TEST_PAUSE_ONCE=1` only
the first process to reach the point pauses (the one that creates the file; the others go on): one Dask worker of
several, killed mid-task.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

PAUSE_ENV = "REFORMATTERS_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "REFORMATTERS_TEST_PAUSE_FILE"
PAUSE_SKIP_ENV = "REFORMATTERS_TEST_PAUSE_SKIP"
PAUSE_MODE_ENV = "REFORMATTERS_TEST_PAUSE_MODE"
PAUSE_ONCE_ENV = "REFORMATTERS_TEST_PAUSE_ONCE"

_passed: Counter[str] = Counter()


def pause_at(point: str) -> None:
    if os.environ.get(PAUSE_ENV) != point:
        return
    _passed[point] += 1
    if _passed[point] <= int(os.environ.get(PAUSE_SKIP_ENV) or 0):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker and os.environ.get(PAUSE_ONCE_ENV) == "1":
        try:
            with open(marker, "x") as file:
                file.write(f"{point} {os.getpid()}\n")
        except FileExistsError:
            return  # another process paused here first
    elif marker:
        Path(marker).write_text(f"{point} {os.getpid()}\n")
    if os.environ.get(PAUSE_MODE_ENV) == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    while True:
        time.sleep(3600)
