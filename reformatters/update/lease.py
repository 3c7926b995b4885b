"""One publisher at a time: a lease object in the final store with an owner id and an expiry.

Local stores acquire it with an exclusive create (`O_CREAT | O_EXCL`), which the filesystem makes atomic.
Object stores (s3://, gs://) offer no exclusive create through fsspec here, so the lease is read, written
and read back: two updates that start within the same fraction of a second could both believe they hold it.
The CronJob's `concurrencyPolicy: Forbid` is the first line of defence there; the lease catches the
overlap of a slow run with the next scheduled one, which is what happens in practice. (S3's conditional
`If-None-Match: *` PUT would make it atomic; fsspec does not expose it uniformly.)

A lease expires after `ttl_seconds` unless renewed; a holder renews it from a heartbeat thread and checks it
before every publish. A lease whose owner ran on this host and whose process is gone is stale at once, so
re-running after a crash (or SIGKILL) on the same machine does not wait for the expiry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from reformatters.common.storage import ObjectStore

log = logging.getLogger("reformatters.update")

LEASE_KEY = "_internal/update.lease"
DEFAULT_TTL_SECONDS = 900.0


class UpdateRefusedError(ValueError):
    """The update will not run or publish; the message says what was expected, what was found, what to do."""


class LeaseHeldError(UpdateRefusedError):
    pass


class LeaseLostError(UpdateRefusedError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UpdateLease:
    def __init__(self, store: ObjectStore, *, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the lease object ----
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewed_at": now,
                "expires_at": now + self.ttl_seconds,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        data = self.store.get(LEASE_KEY)
        if data is None:
            return None
        try:
            parsed: dict[str, Any] = json.loads(data)
        except ValueError:
            return {"owner": "unreadable", "expires_at": 0.0}
        return parsed

    @staticmethod
    def _stale(lease: dict[str, Any]) -> str | None:
        if float(lease.get("expires_at", 0.0)) < time.time():
            return "expired"
        if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1))):
            return f"its process {lease.get('pid')} on this host is gone"
        return None

    def _held_error(self, lease: dict[str, Any]) -> LeaseHeldError:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(lease.get("expires_at", 0.0))))
        return LeaseHeldError(
            f"another update is publishing to {self.store.url}: lease {LEASE_KEY} is held by "
            f"{lease.get('owner')} (host {lease.get('host')}, pid {lease.get('pid')}) until {expires}. "
            "This run stops without changing the store. Let the other run finish; if it died on another "
            "machine, its lease expires at the time shown (or delete the lease object once you are sure)."
        )

    def acquire(self) -> None:
        if self.store.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        self._held = True
        log.info("update lease %s acquired by %s (ttl %.0f s)", LEASE_KEY, self.owner, self.ttl_seconds)

    def _acquire_local(self) -> None:
        path = Path(self.store.url) / LEASE_KEY
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = self._read()
                if current is None:
                    continue
                reason = self._stale(current)
                if reason is None:
                    raise self._held_error(current) from None
                # Take a stale lease over: only one contender's rename of the same file succeeds.
                aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                moved = json.loads(aside.read_bytes() or b"{}")
                if moved.get("owner") != current.get("owner"):
                    # We moved a fresh lease someone else just took: put it back and give way.
                    try:
                        os.link(aside, path)
                    finally:
                        aside.unlink(missing_ok=True)
                    raise self._held_error(moved) from None
                aside.unlink(missing_ok=True)
                log.warning("taking over stale update lease of %s (%s)", current.get("owner"), reason)
                continue
            with os.fdopen(fd, "wb") as file:
                file.write(self._body())
                file.flush()
                os.fsync(file.fileno())
            return
        current = self._read() or {}
        raise self._held_error(current)

    def _acquire_remote(self) -> None:
        current = self._read()
        if current is not None and self._stale(current) is None:
            raise self._held_error(current)
        self.store.put(LEASE_KEY, self._body())
        time.sleep(0.5)
        check = self._read()
        if check is None or check.get("owner") != self.owner:
            raise self._held_error(check or {})

    def verify(self) -> None:
        """Raise unless this process still holds the lease; called before every publish."""
        if self._lost:
            raise LeaseLostError(self._lost)
        current = self._read()
        if current is None or current.get("owner") != self.owner:
            owner = None if current is None else current.get("owner")
            raise LeaseLostError(
                f"the update lease on {self.store.url} is no longer ours (now held by {owner}); "
                "stopping before publishing anything more. Re-run the update once the other run is done."
            )

    def renew(self) -> None:
        self.verify()
        self.store.put(LEASE_KEY, self._body())

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        current = self._read()
        if current is not None and current.get("owner") == self.owner:
            self.store.delete(LEASE_KEY)

    # ---- heartbeat ----
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 3):
            try:
                self.renew()
            except LeaseLostError as error:
                self._lost = str(error)
                return
            except Exception as error:  # noqa: BLE001 - a transient store error; the next beat retries
                log.warning("update lease renewal failed: %s", error)

    def __enter__(self) -> UpdateLease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="update-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()
