"""What a local worker process drops from its logs: closing chatter, and scheduler loss only after Ctrl-C."""

from __future__ import annotations

import logging
import signal

from reformatters.pipeline import worker_setup


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message, None, None)


def test_a_lost_scheduler_is_news_until_ctrl_c_reached_the_worker() -> None:
    heartbeat = record("Failed to communicate with scheduler during heartbeat.")
    cancelled = record("Async instruction for <Task 'x'> ended with CancelledError")
    other = record("Unexpected exception during heartbeat. Closing worker.")
    worker_setup._INTERRUPTED.clear()
    try:
        assert not worker_setup._is_shutdown_chatter(heartbeat), "a lost scheduler during a run is reported"
        assert worker_setup._is_shutdown_chatter(cancelled)
        worker_setup._note_interrupt(signal.SIGINT, None)
        assert worker_setup._is_shutdown_chatter(heartbeat)
        assert not worker_setup._is_shutdown_chatter(other)
    finally:
        worker_setup._INTERRUPTED.clear()
