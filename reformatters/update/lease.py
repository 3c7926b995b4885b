"""One publisher at a time, fenced: a lease object in the final store, taken and renewed with conditional writes.

The lease object (`_internal/update.lease`) is only ever created with `put_if_absent` and replaced with
`put_if_match` on the version its writer last saw (S3 `If-None-Match`/`If-Match`, GCS `ifGenerationMatch`, an
exclusive create and an `flock`-guarded check-and-replace on local disk; see `reformatters.common.storage`).
So of two contenders exactly one wins, and a holder whose renewal finds another version has lost the lease.

Expiry is judged from the lease's own renewals, never by comparing two hosts' clocks: a contender watches the
lease object with its own monotonic clock, and one whose version has not changed for the lease's TTL belongs to
a holder that stopped renewing (crashed, paused, partitioned). An empty or unreadable lease object expires the
same way. A holder renews every `min(ttl / 3, 30 s)`, so a contender facing a live holder sees a renewal and is
refused within that time; one facing a dead holder takes over once the TTL has passed. A lease whose holder ran
on this host (same holder id) is judged at once: its process alive means held, gone means stale.

Fencing: every holder gets a generation one above every generation seen before (the previous lease's, and those
in the commit records), so generations only grow. `commit(store, key, data)` writes the root `zarr.json` on the
version this holder last read or wrote, after checking the lease is still its own, and records holder and
generation under `_internal/commits/`. Uploads of objects readers can already see call `check_fence()` first
(on workers: the picklable `fence()`). A holder that lost the lease raises `LeaseLostError` and writes nothing.

Release rewrites the lease as released (the object, and with it the generation, stays) on the version the
holder last wrote. `REFORMATTERS_LEASE_TTL` (seconds) and `REFORMATTERS_HOLDER_ID` (default: the hostname)
set the TTL and the holder identity.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from reformatters.common.storage import ObjectStore, PreconditionFailedError

log = logging.getLogger("reformatters.update")

LEASE_KEY = "_internal/update.lease"
COMMITS_PREFIX = "_internal/commits/"
ROOT_KEY = "zarr.json"
DEFAULT_TTL_SECONDS = 900.0
MAX_RENEW_INTERVAL_SECONDS = 30.0
TTL_ENV = "REFORMATTERS_LEASE_TTL"
HOLDER_ENV = "REFORMATTERS_HOLDER_ID"


class UpdateRefusedError(ValueError):
    """The update will not run or publish; the message says what was expected, what was found, what to do."""


class LeaseHeldError(UpdateRefusedError):
    pass


class LeaseLostError(UpdateRefusedError):
    pass


def ttl_from_env(default: float = DEFAULT_TTL_SECONDS) -> float:
    text = os.environ.get(TTL_ENV)
    if not text:
        return default
    try:
        ttl = float(text)
    except ValueError:
        raise UpdateRefusedError(f"{TTL_ENV}={text!r} is not a number of seconds; set it to e.g. 900") from None
    if ttl <= 0:
        raise UpdateRefusedError(f"{TTL_ENV}={text!r} must be a positive number of seconds")
    return ttl


def holder_from_env() -> str:
    return os.environ.get(HOLDER_ENV) or socket.gethostname()


def _process_started(pid: int) -> float | None:
    """The process's start time, or None if no such process runs here."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return 0.0  # exists but not inspectable: treat as alive


@dataclass(frozen=True)
class LeaseRecord:
    """The parsed lease object; `None` fields when it was empty or unreadable."""

    owner: str | None
    holder: str | None
    pid: int | None
    pid_started: float | None
    generation: int
    renewals: int
    ttl_seconds: float | None
    released: bool
    readable: bool

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            return cls(
                owner=str(body["owner"]),
                holder=str(body.get("holder") or body.get("host") or ""),
                pid=int(body["pid"]),
                pid_started=float(body["pid_started"]) if body.get("pid_started") is not None else None,
                generation=int(body.get("generation", 0)),
                renewals=int(body.get("renewals", 0)),
                ttl_seconds=float(body["ttl_seconds"]) if body.get("ttl_seconds") else None,
                released=bool(body.get("released", False)),
                readable=True,
            )
        except (ValueError, KeyError, TypeError):
            return cls(None, None, None, None, 0, 0, None, False, False)

    def describe(self) -> str:
        if not self.readable:
            return "an empty or unreadable lease object"
        return f"{self.owner} (holder {self.holder}, pid {self.pid}, generation {self.generation})"


def read_lease(store: ObjectStore) -> LeaseRecord | None:
    data = store.get(LEASE_KEY)
    return None if data is None else LeaseRecord.parse(data)


@dataclass(frozen=True)
class CommitRecord:
    key: str
    generation: int
    sequence: int
    body: dict[str, Any]


def commit_records(store: ObjectStore) -> list[CommitRecord]:
    """Every fenced commit recorded in the store, in (generation, sequence) order."""
    records = []
    for key in store.list(COMMITS_PREFIX):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            generation, sequence = (int(part) for part in name.split("-", 1))
        except ValueError:
            continue
        data = store.get(key)
        body = json.loads(data) if data else {}
        records.append(CommitRecord(key=key, generation=generation, sequence=sequence, body=body))
    return sorted(records, key=lambda r: (r.generation, r.sequence))


@functools.lru_cache(maxsize=8)
def cached_store(url: str, credentials_env_prefix: str | None = None) -> ObjectStore:
    """One store per process, URL and credentials: a worker's tasks reuse its S3/GCS client."""
    return ObjectStore(url, credentials_env_prefix)


@dataclass(frozen=True)
class Fence:
    """What a worker needs to check, before uploading, that its publisher still holds the lease."""

    store_url: str
    owner: str
    generation: int
    credentials_env_prefix: str | None = None  # a replica's own credentials (`Replica.env_prefix`)

    def check(self) -> None:
        store = cached_store(self.store_url, self.credentials_env_prefix)
        current = read_lease(store)
        if current is None or current.released or current.owner != self.owner or current.generation != self.generation:
            raise LeaseLostError(_lost_message(store, self.owner, self.generation, current))


def _lost_message(store: ObjectStore, owner: str, generation: int, current: LeaseRecord | None) -> str:
    now = "nobody" if current is None else current.describe()
    if current is not None and current.released:
        now = f"nobody (released by {current.owner}, generation {current.generation})"
    return (
        f"publisher lease lost: {owner} (generation {generation}) no longer holds {LEASE_KEY} on {store.url}; it is "
        f"now held by {now}. Another publisher took over (this one was paused or stopped renewing past its TTL), "
        "so this run writes nothing more and stops. Re-run it once the other publisher is done."
    )


class UpdateLease:
    """The publisher lease of one store. Use as a context manager (acquire, heartbeat, release), or call
    `acquire()`, `renew()`, `release()` yourself; `verify()`/`check_fence()` before writing, `commit()` to publish."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        ttl_seconds: float | None = None,
        holder: str | None = None,
        poll_seconds: float | None = None,
    ) -> None:
        self.store = store
        self.ttl_seconds = float(ttl_seconds) if ttl_seconds is not None else ttl_from_env()
        self.holder = holder or holder_from_env()
        self.pid = os.getpid()
        self.owner = f"{self.holder}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.poll_seconds = poll_seconds if poll_seconds is not None else min(self.ttl_seconds / 10, 5.0)
        self.generation: int | None = None
        self._version: str | None = None
        self._renewals = 0
        self._held = False
        self._lost: str | None = None
        self._commit_versions: dict[tuple[str, str], str | None] = {}
        self._sequence = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def renew_interval(self) -> float:
        return min(self.ttl_seconds / 3, MAX_RENEW_INTERVAL_SECONDS)

    # ---- the lease object ----
    def _body(self, *, released: bool = False) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "holder": self.holder,
                "pid": self.pid,
                "pid_started": _process_started(self.pid),
                "generation": self.generation,
                "renewals": self._renewals,
                "ttl_seconds": self.ttl_seconds,
                "released": released,
                # For people reading the object; expiry never compares it with another clock.
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()

    def _same_host_verdict(self, lease: LeaseRecord) -> str | None:
        """'alive' or 'gone' for a lease of this holder id (this host), None for another host's."""
        if not lease.readable or lease.holder != self.holder or lease.pid is None:
            return None
        started = _process_started(lease.pid)
        if started is None:
            return "gone"
        if lease.pid_started is not None and started and abs(started - lease.pid_started) > 1.0:
            return "gone"  # the pid was reused by another process
        return "alive"

    def _generation_floor(self, lease: LeaseRecord | None) -> int:
        floor = lease.generation if lease is not None else 0
        records = commit_records(self.store)
        if records:
            floor = max(floor, records[-1].generation)
        return floor

    def _held_error(self, lease: LeaseRecord, why: str) -> LeaseHeldError:
        return LeaseHeldError(
            f"another publisher is writing to {self.store.url}: lease {LEASE_KEY} is held by {lease.describe()} "
            f"({why}). This run stops without changing the store. Let the other run finish; a holder that died "
            f"stops renewing and its lease can be taken over {lease.ttl_seconds or self.ttl_seconds:.0f} s later."
        )

    def acquire(self) -> None:
        """Take the lease, waiting while a holder on another host might still be alive (up to its TTL).

        Raises `LeaseHeldError` as soon as the holder is seen renewing, or is a live process on this host."""
        watched: tuple[str, float] | None = None  # (version, monotonic time first seen)
        while True:
            current = self.store.get_with_version(LEASE_KEY)
            if current is None:
                self.generation = self._generation_floor(None) + 1
                self._renewals = 0
                try:
                    self._version = self.store.put_if_absent(LEASE_KEY, self._body())
                except PreconditionFailedError:
                    continue  # another contender created it first: judge theirs
                break
            data, version = current
            lease = LeaseRecord.parse(data)
            reason: str | None = None
            if lease.released:
                reason = "released"
            else:
                verdict = self._same_host_verdict(lease)
                if verdict == "alive":
                    raise self._held_error(lease, "its process runs on this host")
                if verdict == "gone":
                    reason = f"its process {lease.pid} on this host is gone"
                else:
                    if watched is not None and watched[0] != version:
                        raise self._held_error(lease, "renewed while this run watched it")
                    if watched is None:
                        watched = (version, time.monotonic())
                        log.info("lease %s is held by %s: watching it for renewals", LEASE_KEY, lease.describe())
                    ttl = lease.ttl_seconds or self.ttl_seconds
                    unchanged = time.monotonic() - watched[1]
                    if unchanged < ttl:
                        time.sleep(min(self.poll_seconds, ttl - unchanged))
                        continue
                    reason = f"not renewed for {unchanged:.1f} s (ttl {ttl:.0f} s)"
            self.generation = self._generation_floor(lease) + 1
            self._renewals = 0
            try:
                self._version = self.store.put_if_match(LEASE_KEY, self._body(), version)
            except PreconditionFailedError:
                watched = None  # it changed under us: someone renewed or took it; look again
                continue
            if not lease.released:
                log.warning("took over the publisher lease of %s: %s", lease.describe(), reason)
            break
        self._held = True
        self._lost = None
        root = self.store.get_with_version(ROOT_KEY)
        self._commit_versions = {(self.store.url, ROOT_KEY): None if root is None else root[1]}
        self._sequence = 0
        log.info(
            "publisher lease %s acquired by %s, generation %d (ttl %.0f s)",
            LEASE_KEY,
            self.owner,
            self.generation,
            self.ttl_seconds,
        )

    def verify(self) -> None:
        """Raise `LeaseLostError` unless this holder still holds the lease (reads the lease object)."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if not self._held or self.generation is None:
            raise LeaseLostError(f"the publisher lease on {self.store.url} is not held by this run (not acquired)")
        current = read_lease(self.store)
        if current is None or current.released or current.owner != self.owner or current.generation != self.generation:
            self._lost = _lost_message(self.store, self.owner, self.generation, current)
            raise LeaseLostError(self._lost)

    def check_fence(self) -> None:
        """Call before every upload of an object readers can already see; same as `verify()`."""
        self.verify()

    def fence(self) -> Fence:
        """A picklable check of this holder's generation for upload tasks on other processes."""
        if self.generation is None:
            raise LeaseLostError(f"the publisher lease on {self.store.url} is not held by this run (not acquired)")
        return Fence(
            store_url=self.store.url,
            owner=self.owner,
            generation=self.generation,
            credentials_env_prefix=self.store.credentials_env_prefix,
        )

    def renew(self) -> None:
        """Rewrite the lease on the version this holder last wrote; losing that race means the lease is lost."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost)
            if not self._held or self._version is None or self.generation is None:
                raise LeaseLostError(f"the publisher lease on {self.store.url} is not held by this run")
            self._renewals += 1
            try:
                self._version = self.store.put_if_match(LEASE_KEY, self._body(), self._version)
            except PreconditionFailedError:
                current = self.store.get_with_version(LEASE_KEY)
                record = None if current is None else LeaseRecord.parse(current[0])
                if (
                    current is not None
                    and record is not None
                    and record.owner == self.owner
                    and record.generation == self.generation
                    and not record.released
                ):
                    # Our previous renewal landed although its answer was lost (a timeout): still ours.
                    self._version = current[1]
                    self._version = self.store.put_if_match(LEASE_KEY, self._body(), self._version)
                    return
                self._lost = _lost_message(self.store, self.owner, self.generation, record)
                raise LeaseLostError(self._lost) from None

    def observe(self, store: ObjectStore, key: str = ROOT_KEY) -> None:
        """Remember the current version of `key`: the next `commit` of it succeeds only on that version."""
        current = store.get_with_version(key)
        self._commit_versions[(store.url, key)] = None if current is None else current[1]

    def commit(self, store: ObjectStore, key: str, data: bytes) -> str:
        """The fenced commit: check the lease, write `key` only if it is still at the version this holder last
        read (at `acquire`/`observe`) or wrote, and record holder and generation under `_internal/commits/`."""
        with self._lock:
            self.verify()
            assert self.generation is not None
            slot = (store.url, key)
            if slot not in self._commit_versions:
                self.observe(store, key)
            expected = self._commit_versions[slot]
            try:
                if expected is None:
                    version = store.put_if_absent(key, data)
                else:
                    version = store.put_if_match(key, data, expected)
            except PreconditionFailedError:
                self._lost = (
                    f"fenced commit refused: {store.url}/{key} changed since {self.owner} (generation "
                    f"{self.generation}) last read it, so another publisher committed in between. Nothing was "
                    "written; this run stops. Re-run it once the other publisher is done."
                )
                raise LeaseLostError(self._lost) from None
            self._commit_versions[slot] = version
            self._record_commit(store, key, data, version)
            return version

    def record_commit(self, target: str, snapshot: str) -> None:
        """Record a commit made elsewhere (an Icechunk snapshot on `target`) under `_internal/commits/`."""
        with self._lock:
            self._record_commit(self.store, target, snapshot.encode(), snapshot)

    def _record_commit(self, store: ObjectStore, key: str, data: bytes, version: str) -> None:
        assert self.generation is not None
        record = json.dumps(
            {
                "holder": self.holder,
                "owner": self.owner,
                "generation": self.generation,
                "key": key,
                "version": version,
                "sha256": hashlib.sha256(data).hexdigest(),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()
        while True:
            self._sequence += 1
            try:
                store.put_if_absent(f"{COMMITS_PREFIX}{self.generation:012d}-{self._sequence:06d}.json", record)
                return
            except PreconditionFailedError:
                continue

    def release(self) -> None:
        """Mark the lease released (on the version this holder last wrote); a lost lease is left alone."""
        with self._lock:
            if not self._held:
                return
            self._held = False
            self._stop.set()
            if self._lost or self._version is None:
                return
            try:
                self.store.put_if_match(LEASE_KEY, self._body(released=True), self._version)
            except PreconditionFailedError:
                log.warning("publisher lease %s was no longer ours at release; left as it is", LEASE_KEY)
                return
            except Exception as error:  # noqa: BLE001 - the store is unreachable: the run's own error matters more
                log.warning(
                    "publisher lease %s on %s could not be released (%s: %s); it expires after its TTL",
                    LEASE_KEY,
                    self.store.url,
                    type(error).__name__,
                    error,
                )
                return
            log.info("publisher lease %s released by %s (generation %s)", LEASE_KEY, self.owner, self.generation)

    # ---- heartbeat ----
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_interval):
            try:
                self.renew()
            except LeaseLostError as error:
                log.error("%s", error)
                return
            except Exception as error:  # noqa: BLE001 - a transient store error; the next beat retries
                log.warning("publisher lease renewal failed: %s", error)

    def __enter__(self) -> UpdateLease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="publisher-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()


class TerminatedError(SystemExit):
    """SIGTERM arrived (e.g. a Kubernetes eviction): raised in the main thread so that every context manager
    unwinds (the lease is released, the cluster stopped)."""


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `TerminatedError` (exit code 143) in the main thread for the duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.error("SIGTERM received: releasing the publisher lease and stopping the cluster")
        raise TerminatedError(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
