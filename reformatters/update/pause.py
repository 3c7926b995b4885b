"""A test hook: `REFORMATTERS_TEST_PAUSE_AT=<point>` makes the process sleep at that named point.

Tests use it to SIGKILL an update at a deterministic moment. When the point is reached, the file named by
`REFORMATTERS_TEST_PAUSE_FILE` (if set) is created so the test knows the process is parked there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "REFORMATTERS_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "REFORMATTERS_TEST_PAUSE_FILE"


def pause_at(point: str) -> None:
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{point} {os.getpid()}\n")
    while True:
        time.sleep(3600)
