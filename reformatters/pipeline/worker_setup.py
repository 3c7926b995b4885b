"""Preloaded into every local worker process as it starts (Dask's `preload`).

A worker that first meets these modules while unpickling its first task spends a second or more importing them
before any work starts; imported at start-up, that time overlaps the driver's own preparation instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

LOG_LEVEL_ENVIRON = "REFORMATTERS_LOG_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Set once Ctrl-C reached this worker's process group: the driver is stopping the cluster.
_INTERRUPTED = threading.Event()


def _is_shutdown_chatter(record: logging.LogRecord) -> bool:
    # Logged for every task still running when a worker closes (Ctrl-C, the driver's end of a run): no news.
    message = record.getMessage()
    if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
        return True
    # After Ctrl-C the scheduler may close before this worker's next heartbeat, which then fails with a traceback.
    return _INTERRUPTED.is_set() and message.startswith("Failed to communicate with scheduler during heartbeat")


def _note_interrupt(signum: int, frame: Any) -> None:
    _INTERRUPTED.set()


def dask_setup(worker: Any) -> None:
    import eccodes  # noqa: F401 - the decoder's shared library loads on import

    # Ctrl-C in a terminal reaches every process of its group; the driver stops the cluster, so a local worker
    # process must not die with a traceback of its own first.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _note_interrupt)
    for name in ("distributed.worker.state_machine", "distributed.worker"):
        logging.getLogger(name).addFilter(lambda record: not _is_shutdown_chatter(record))
    if level := os.environ.get(LOG_LEVEL_ENVIRON):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        project_log = logging.getLogger("reformatters")
        project_log.addHandler(handler)
        project_log.setLevel(level)

    from reformatters.cluster import import_dataset_integrations
    from reformatters.pipeline.kernels import limit_library_threads

    import_dataset_integrations()
    limit_library_threads()
    remove_dead_scratch_at_start()


def remove_dead_scratch_at_start() -> None:
    """Scratch-path files of worker processes that died (killed, out of memory) on this machine: under the
    temporary directory and `REFORMATTERS_SCRATCH_DIR`. A `--scratch-dir` elsewhere is cleaned by the next scratch
    task that uses it."""
    import tempfile
    from pathlib import Path

    from reformatters.pipeline.scratch import SCRATCH_DIR_ENVIRON, remove_dead_scratch

    bases = {Path(tempfile.gettempdir())}
    if configured := os.environ.get(SCRATCH_DIR_ENVIRON):
        bases.add(Path(configured))
    for base in bases:
        remove_dead_scratch(base)
