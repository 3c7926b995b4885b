"""Cron check-ins and error reports reach a loopback Sentry through the real SDK, and nothing secret does."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest

from reformatters.monitoring import MAX_SLUG_LENGTH, SENTRY_DSN_ENV, cron_monitor, monitor_slug, shorten

from ..sentry_ingest import sentry_ingest
from .conftest import REPO, UpdateFixture, cli_env, copy_store, update_command
from .test_fenced_publisher import _wait_for as wait_for


def statuses(check_ins: list[dict[str, object]]) -> list[object]:
    return [c["status"] for c in check_ins]


def test_an_update_checks_in_then_ok_and_a_failing_one_reports_an_error(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    with sentry_ingest() as ingest:
        cron_env = {
            "CRON_JOB_NAME": "example-update-prod",
            "CRON_SCHEDULE": "38 5,11,17,23 * * *",
            "CRON_CHECKIN_MARGIN_MINUTES": "30",
            "CRON_MAX_RUNTIME_MINUTES": "300",
        }
        env = cli_env({SENTRY_DSN_ENV: ingest.dsn, **cron_env})
        ok = subprocess.run(
            update_command(store, update_fixture.source), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert ok.returncode == 0, ok.stderr[-3000:]
        check_ins = ingest.of_type("check_in")
        assert statuses(check_ins) == ["in_progress", "ok"], check_ins
        assert {c["monitor_slug"] for c in check_ins} == {"example-update-prod"}
        assert check_ins[0]["check_in_id"] == check_ins[1]["check_in_id"]
        # The schedule and margins the CronJob was rendered with (reformatters deploy) configure the monitor.
        assert check_ins[0]["monitor_config"] == {
            "schedule": {"type": "crontab", "value": "38 5,11,17,23 * * *"},
            "timezone": "Etc/UTC",
            "checkin_margin": 30,
            "max_runtime": 300,
        }
        assert not ingest.of_type("event")

        ingest.items.clear()
        missing = tmp_path / "no-such-store.zarr"
        failed = subprocess.run(
            update_command(missing, update_fixture.source),
            cwd=REPO,
            env=cli_env({SENTRY_DSN_ENV: ingest.dsn}),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert failed.returncode == 2, failed.stderr[-3000:]
        check_ins = ingest.of_type("check_in")
        assert statuses(check_ins) == ["in_progress", "error"], check_ins
        assert {c["monitor_slug"] for c in check_ins} == {"example-update"}  # no CRON_JOB_NAME: dataset-job
        events = ingest.of_type("event")
        assert len(events) == 1, events
        assert events[0]["tags"]["dataset_id"] == "example" and events[0]["tags"]["job"] == "update"
        assert "exited with status 2" in str(events[0].get("message") or events[0].get("logentry"))
        # The command line named the store: its path never leaves the process.
        assert not any(str(missing) in raw.decode(errors="replace") for raw in ingest.raw)


def test_no_dsn_no_sentry(tmp_path: Path) -> None:
    import sentry_sdk

    with sentry_ingest() as ingest:
        with pytest.raises(RuntimeError), cron_monitor("example", "update", environ={}):
            assert not sentry_sdk.get_client().is_active()
            raise RuntimeError("nothing is sent without SENTRY_DSN")
        assert ingest.raw == []


def test_no_secret_leaves_the_process(tmp_path: Path) -> None:
    log = logging.getLogger("reformatters.test_monitoring")
    environ = {SENTRY_DSN_ENV: "", "AWS_SECRET_ACCESS_KEY": "PLANTED-ENV-SECRET", "HOME": "/home/x"}
    argv = ["reformatters", "update", "example", "--store", "/data/PLANTED-ARGUMENT/store.zarr"]

    def fail_with_secrets() -> None:
        # Built at run time: the source lines around a frame are sent, its variables' values must not be.
        password = "-".join(["PLANTED", "LOCAL", "VARIABLE"])
        log.warning("GET https://host/file?X-Amz-Signature=PLANTED-LOG-SIGNATURE (key PLANTED-ENV-SECRET)")
        log.error("store /data/PLANTED-ARGUMENT/store.zarr refused")
        raise RuntimeError(f"failed https://user:PLANTED-PASSWORD@host/x?token=PLANTED-TOKEN after {len(password)}")

    with sentry_ingest() as ingest:
        environ[SENTRY_DSN_ENV] = ingest.dsn
        with pytest.raises(RuntimeError), cron_monitor("example", "update", environ=environ, argv=argv):
            fail_with_secrets()
        sent = b"".join(ingest.raw).decode(errors="replace")
        assert statuses(ingest.of_type("check_in")) == ["in_progress", "error"]
        events = ingest.of_type("event")
        exceptions = [e for e in events if e.get("exception")]
        assert exceptions, events  # the traceback arrived ...
        assert "[scrubbed]" in sent and "failed https://[scrubbed]@host/x?[scrubbed]" in sent  # ... scrubbed
        assert "GET https://host/file?[scrubbed]" in sent  # the warning, as a breadcrumb
    for planted in (
        "PLANTED-ENV-SECRET",
        "PLANTED-ARGUMENT",
        "PLANTED-LOCAL-VARIABLE",
        "PLANTED-LOG-SIGNATURE",
        "PLANTED-PASSWORD",
        "PLANTED-TOKEN",
    ):
        assert planted not in sent, planted


def test_slugs_fit_sentrys_limit() -> None:
    longest = "ecmwf-ifs-ens-forecast-15-day-0-25-degree"
    slug = monitor_slug(longest, "validate", environ={})
    assert len(slug) <= MAX_SLUG_LENGTH and slug.startswith("ecmwf-ifs-ens-forecast-15-day")
    assert slug != monitor_slug(longest, "update", environ={})  # shortened names stay distinct
    assert shorten("short", MAX_SLUG_LENGTH) == "short"


def test_sigterm_checks_out_with_an_error(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    """An evicted pod (SIGTERM) reports `error` and an event before it exits 143."""
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    marker = tmp_path / "paused"
    with sentry_ingest() as ingest:
        env = {
            SENTRY_DSN_ENV: ingest.dsn,
            "REFORMATTERS_TEST_PAUSE_AT": "before_publish",
            "REFORMATTERS_TEST_PAUSE_FILE": str(marker),
        }
        update = subprocess.Popen(
            update_command(store, update_fixture.source),
            cwd=REPO,
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            wait_for(marker, update)
            assert statuses(ingest.of_type("check_in")) == ["in_progress"]
            update.send_signal(signal.SIGTERM)
            _, err = update.communicate(timeout=120)
        finally:
            if update.poll() is None:
                os.killpg(update.pid, signal.SIGKILL)
                update.wait(timeout=30)
        assert update.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert statuses(ingest.of_type("check_in")) == ["in_progress", "error"]
        assert any(
            "exited with status 143" in str(e.get("message") or e.get("logentry")) for e in ingest.of_type("event")
        )
