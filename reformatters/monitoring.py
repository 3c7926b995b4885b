"""Cron check-ins and error reports to Sentry for the operational jobs, active only when `SENTRY_DSN` is set.

Each update or validate run checks in `in_progress` when it starts and `ok` or `error` when it ends, under the
monitor slug `CRON_JOB_NAME` (set by the CronJob; default `{dataset_id}-{update|validate}`), shortened to Sentry's
50 characters. A non-zero exit, an exception or SIGTERM also sends an event tagged with the dataset and the job.

Nothing secret leaves the process: local variables are never attached; in every string of an event or breadcrumb,
URL query strings (signed URLs) and URL credentials are cut, and the values of credential-like environment
variables and of the command line's arguments are replaced.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from reformatters.common.names import shorten

log = logging.getLogger("reformatters.monitoring")

SENTRY_DSN_ENV = "SENTRY_DSN"
CRON_JOB_NAME_ENV = "CRON_JOB_NAME"
CRON_SCHEDULE_ENV = "CRON_SCHEDULE"
MAX_SLUG_LENGTH = 50
SCRUBBED = "[scrubbed]"

JobKind = Literal["update", "validate"]

_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"]*", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@'\"]+@", re.IGNORECASE)
_SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|DSN|SESSION", re.IGNORECASE)
# Command-line values shorter than this are flags and small numbers, not secrets; replacing them would mangle text.
_MIN_SECRET_LENGTH = 6


def monitor_slug(dataset_id: str, job: JobKind, environ: Mapping[str, str] = os.environ) -> str:
    return shorten(environ.get(CRON_JOB_NAME_ENV) or f"{dataset_id}-{job}", MAX_SLUG_LENGTH)


class Scrubber:
    """Removes secrets from every string of a Sentry payload (events and breadcrumbs), recursively."""

    def __init__(self, environ: Mapping[str, str], argv: list[str], keep: set[str]) -> None:
        secrets = {value for name, value in environ.items() if _SECRET_ENV_NAME.search(name) and value}
        secrets |= {arg for arg in argv[1:] if not arg.startswith("-") and arg not in keep}
        self._secrets = sorted((s for s in secrets if len(s) >= _MIN_SECRET_LENGTH), key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            value = value.replace(secret, SCRUBBED)
        value = _URL_CREDENTIALS.sub(rf"\1{SCRUBBED}@", value)
        return _URL_QUERY.sub(rf"\1?{SCRUBBED}", value)

    def __call__(self, payload: Any) -> Any:
        if isinstance(payload, str):
            return self.text(payload)
        if isinstance(payload, dict):
            return {key: self(value) for key, value in payload.items() if key not in ("vars", "sys.argv")}
        if isinstance(payload, (list, tuple)):
            return [self(value) for value in payload]
        return payload


def _sentry_options(dsn: str, scrub: Scrubber, tags: Mapping[str, str]) -> dict[str, Any]:
    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("tags", {}).update(tags)
        scrubbed: dict[str, Any] = scrub(event)
        return scrubbed

    def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        scrubbed: dict[str, Any] = scrub(crumb)
        return scrubbed

    return {
        "dsn": dsn,
        "include_local_variables": False,
        "max_request_body_size": "never",
        "before_send": before_send,
        "before_breadcrumb": before_breadcrumb,
        "before_send_transaction": lambda event, hint: None,
        "traces_sample_rate": 0.0,
        "default_integrations": True,
    }


def monitor_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """Sentry's monitor settings from the CronJob's environment (`reformatters deploy` renders them from the
    dataset's declaration): the crontab schedule and how late or long a run may be before Sentry alerts. None set
    (a run by hand): no settings, the monitor keeps what Sentry has."""
    schedule = environ.get(CRON_SCHEDULE_ENV)
    if not schedule:
        return {}
    return {
        "schedule": {"type": "crontab", "value": schedule},
        "timezone": environ.get("CRON_TIME_ZONE") or "Etc/UTC",
        "checkin_margin": int(environ.get("CRON_CHECKIN_MARGIN_MINUTES") or 10),
        "max_runtime": int(environ.get("CRON_MAX_RUNTIME_MINUTES") or 60),
    }


def _exit_status(error: BaseException) -> int | None:
    """The process's exit status for an exception that ends the command; None for an unexpected exception."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    code = getattr(error, "exit_code", None)  # click's and typer's Exit
    return code if isinstance(code, int) else None


@contextmanager
def cron_monitor(
    dataset_id: str,
    job: JobKind,
    *,
    environ: Mapping[str, str] = os.environ,
    argv: list[str] | None = None,
) -> Iterator[None]:
    """Check the enclosed run in and out of its Sentry cron monitor; without `SENTRY_DSN`, do nothing."""
    dsn = environ.get(SENTRY_DSN_ENV)
    if not dsn:
        yield
        return
    import sentry_sdk
    from sentry_sdk.crons import MonitorStatus, capture_checkin

    slug = monitor_slug(dataset_id, job, environ)
    tags = {"dataset_id": dataset_id, "job": job, "cron_job_name": slug}
    scrub = Scrubber(environ, sys.argv if argv is None else argv, keep={dataset_id, job})
    sentry_sdk.init(**_sentry_options(dsn, scrub, tags))
    try:
        # sentry_sdk types this as a TypedDict of its private `_types` module: passed as plain data.
        config: Any = monitor_config(environ) or None
        check_in_id = capture_checkin(monitor_slug=slug, status=MonitorStatus.IN_PROGRESS, monitor_config=config)

        def check_out(status: str) -> None:
            capture_checkin(monitor_slug=slug, check_in_id=check_in_id, status=status, monitor_config=config)

        try:
            yield
        except BaseException as error:
            status = _exit_status(error)
            if status == 0:
                check_out(MonitorStatus.OK)
            else:
                if status is None:  # an exception the command did not turn into an exit status: its traceback
                    sentry_sdk.capture_exception(error)
                else:
                    sentry_sdk.capture_message(f"{slug} exited with status {status}", level="error")
                check_out(MonitorStatus.ERROR)
            raise
        else:
            check_out(MonitorStatus.OK)
    finally:
        sentry_sdk.get_client().close(timeout=10)  # sends what is queued; the next run in this process starts anew
