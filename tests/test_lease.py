"""The fenced publisher lease on local disk, S3 (moto's server) and GCS (fake-gcs-server).

Races against moto prove nothing (it checks and writes without a lock), so the protocol is driven step by step:
two holders, one stops renewing, the other watches, takes over, and the first's renew, fence and commit fail.
Holders on "other hosts" are holders with another holder id; short TTLs keep the waits to a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reformatters.common.storage import ObjectStore
from reformatters.update.lease import (
    HOLDER_ENV,
    LEASE_KEY,
    TTL_ENV,
    LeaseHeldError,
    LeaseLostError,
    UpdateLease,
    commit_records,
    read_lease,
)

pytest_plugins = ["tests.object_store_backends"]  # the backend_store, moto_s3 and gcs fixtures

REPO = Path(__file__).resolve().parents[1]
TTL = 1.5


def _lease(store: ObjectStore, holder: str, ttl: float = TTL) -> UpdateLease:
    return UpdateLease(store, ttl_seconds=ttl, holder=holder, poll_seconds=0.1)


def test_acquire_renew_release_and_generations(backend_store: ObjectStore) -> None:
    store = backend_store
    first = _lease(store, "host-a")
    first.acquire()
    record = read_lease(store)
    assert record is not None and record.owner == first.owner and record.generation == 1 and not record.released
    before = store.get_with_version(LEASE_KEY)
    first.renew()
    after = store.get_with_version(LEASE_KEY)
    assert before is not None and after is not None and before[1] != after[1]
    assert (read_lease(store) or record).renewals == 1
    first.verify()
    first.check_fence()
    first.fence().check()
    first.release()
    record = read_lease(store)
    assert record is not None and record.released and record.generation == 1
    with pytest.raises(LeaseLostError):
        first.verify()

    # A released lease is taken at once, by another host too, with the next generation.
    second = _lease(store, "host-b", ttl=600)
    second.acquire()
    assert second.generation == 2
    second.release()
    with _lease(store, "host-a") as third:
        assert third.generation == 3
        time.sleep(TTL)  # the heartbeat renews every TTL/3
        assert (read_lease(store) or record).renewals >= 1
    assert (read_lease(store) or record).released


def test_renewing_holder_on_another_host_is_refused(backend_store: ObjectStore) -> None:
    store = backend_store
    with _lease(store, "host-a") as holder:
        contender = _lease(store, "host-b")
        with pytest.raises(LeaseHeldError, match="renewed while this run watched it") as error:
            contender.acquire()
        assert holder.owner in str(error.value)
        holder.verify()


def test_holder_that_stopped_renewing_is_taken_over_after_ttl_and_is_fenced(backend_store: ObjectStore) -> None:
    store = backend_store
    stale = _lease(store, "host-a")
    stale.acquire()  # no heartbeat: as if paused (SIGSTOP) or partitioned
    stale.commit(store, "zarr.json", b'{"v": 1}')

    successor = _lease(store, "host-b")
    watched_from = time.monotonic()
    successor.acquire()
    assert time.monotonic() - watched_from >= TTL, "taken over before the TTL had passed unrenewed"
    assert successor.generation == 2
    successor.commit(store, "zarr.json", b'{"v": 2}')

    # The renew that lost the race, the fence checks and the commit of the stale holder all fail.
    with pytest.raises(LeaseLostError, match="publisher lease lost"):
        stale.renew()
    with pytest.raises(LeaseLostError):
        stale.check_fence()
    with pytest.raises(LeaseLostError, match=successor.owner):
        stale.fence().check()
    with pytest.raises(LeaseLostError):
        stale.commit(store, "zarr.json", b'{"v": "stale"}')
    stale.release()  # leaves the successor's lease alone
    assert store.get("zarr.json") == b'{"v": 2}'
    record = read_lease(store)
    assert record is not None and record.owner == successor.owner and not record.released
    successor.verify()

    records = commit_records(store)
    assert [(r.generation, r.body["holder"]) for r in records] == [(1, "host-a"), (2, "host-b")]
    assert all(r.body["key"] == "zarr.json" for r in records)


def test_commit_is_conditional_on_the_version_this_holder_last_saw(backend_store: ObjectStore) -> None:
    store = backend_store
    store.put("zarr.json", b'{"v": 0}')
    lease = _lease(store, "host-a", ttl=600)
    lease.acquire()
    lease.commit(store, "zarr.json", b'{"v": 1}')
    lease.commit(store, "zarr.json", b'{"v": 2}')  # its own last write is the expected version
    store.put("zarr.json", b'{"v": "someone else"}')  # a write that bypassed the lease
    with pytest.raises(LeaseLostError, match="changed since"):
        lease.commit(store, "zarr.json", b'{"v": 3}')
    assert store.get("zarr.json") == b'{"v": "someone else"}'
    with pytest.raises(LeaseLostError):
        lease.check_fence()
    assert [r.sequence for r in commit_records(store)] == [1, 2]


def test_empty_lease_object_expires_after_ttl_not_before(backend_store: ObjectStore) -> None:
    store = backend_store
    store.put(LEASE_KEY, b"")
    lease = _lease(store, "host-a")
    watched_from = time.monotonic()
    lease.acquire()
    assert time.monotonic() - watched_from >= TTL
    assert lease.generation == 1
    record = read_lease(store)
    assert record is not None and record.owner == lease.owner


def test_generation_grows_past_recorded_commits_when_the_lease_object_was_lost(backend_store: ObjectStore) -> None:
    store = backend_store
    with _lease(store, "host-a") as first:
        first.commit(store, "zarr.json", b"{}")
    store.delete(LEASE_KEY)
    with _lease(store, "host-a") as second:
        assert second.generation == 2


_HOLDER = """
import sys, time
from pathlib import Path
from reformatters.common.storage import ObjectStore
from reformatters.update.lease import UpdateLease, terminate_on_sigterm
with terminate_on_sigterm(), UpdateLease(ObjectStore(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""


def _start_holder(store: ObjectStore, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    marker = tmp_path / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, store.url, str(marker)], cwd=REPO, env={**os.environ, **env}
    )
    while not marker.exists():
        assert proc.poll() is None, "the holder process exited before taking the lease"
        time.sleep(0.05)
    return proc


def test_lease_of_a_sigkilled_holder_on_another_host_is_taken_after_ttl(
    backend_store: ObjectStore, tmp_path: Path
) -> None:
    store = backend_store
    proc = _start_holder(store, tmp_path, {HOLDER_ENV: "another-host", TTL_ENV: str(TTL)})
    proc.kill()
    proc.wait()
    record = read_lease(store)
    assert record is not None and record.holder == "another-host" and record.ttl_seconds == TTL
    lease = UpdateLease(store, ttl_seconds=600, poll_seconds=0.1)  # the dead holder's TTL is the one that counts
    watched_from = time.monotonic()
    lease.acquire()
    assert time.monotonic() - watched_from >= TTL
    assert lease.generation == record.generation + 1


@pytest.mark.timeout(120)
def test_lease_of_a_dead_process_on_this_host_is_taken_at_once_a_live_one_refused(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store.zarr")
    proc = _start_holder(store, tmp_path, {TTL_ENV: "3600"})
    try:
        with pytest.raises(LeaseHeldError, match="its process runs on this host"):
            UpdateLease(store, ttl_seconds=3600).acquire()
    finally:
        proc.kill()
        proc.wait()
    lease = UpdateLease(store, ttl_seconds=3600)
    lease.acquire()  # an hour's TTL: only the same-host rule lets this return (the timeout fails it otherwise)
    assert lease.generation == 2


def test_sigterm_releases_the_lease(backend_store: ObjectStore, tmp_path: Path) -> None:
    store = backend_store
    proc = _start_holder(store, tmp_path, {TTL_ENV: "3600"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    record = read_lease(store)
    assert record is not None and record.released, json.dumps(record.__dict__ if record else None)


def test_renew_whose_answer_was_lost_keeps_the_lease(backend_store: ObjectStore) -> None:
    """A renewal the store applied but whose answer never arrived (a timeout) leaves the holder with an old
    version: the next renewal finds its own lease there and carries on; another holder's lease would not."""
    store = backend_store
    lease = _lease(store, "host-a", ttl=600)
    lease.acquire()
    current = store.get_with_version(LEASE_KEY)
    assert current is not None
    store.put_if_match(LEASE_KEY, current[0].replace(b'"renewals": 0', b'"renewals": 1'), current[1])
    lease.renew()
    lease.verify()
    record = read_lease(store)
    assert record is not None and record.owner == lease.owner and record.renewals == 1
