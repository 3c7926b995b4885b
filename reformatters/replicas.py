"""Replicas: other stores that hold the same dataset (a plain Zarr copy, an Icechunk repository, a bucket in another
account or cloud), each published before the primary so a reader of the primary never sees a position a replica
lacks.

A dataset declares them (`DynamicalDataset.replicas`); the workers' upload tasks write a region's shards to the
primary and then to every plain Zarr replica (`ReplicaUpload`); when the publisher publishes the region it copies
from the primary only what the workers did not write to a replica (an Icechunk replica's shards, variable-regions
resumed from an earlier run), then publishes the same metadata there (root `zarr.json` last, or one Icechunk
commit) before it publishes on the primary. Each replica has its own publisher lease, taken with the primary's; the
workers check its fence before they write there. A replica that fails fails the run before the primary moves. A
replica left behind the primary (an earlier run without it, a replica added later, a restored server) is caught up
from the primary before the run publishes anything (`catch_up`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from reformatters.common.config_models import FrozenModel
from reformatters.common.icechunk_store import IcechunkStore
from reformatters.common.storage import ObjectStore, StoreAccessError, open_store
from reformatters.update.drift import StructureDriftError, consolidated_arrays, structure_differences
from reformatters.update.lease import Fence, UpdateLease, cached_store

log = logging.getLogger("reformatters.replicas")

ROOT_METADATA_KEY = "zarr.json"
REPLICA_ENV_PREFIX = "REFORMATTERS_REPLICA_"
COPY_THREADS = 4
REPLICAS_WRITTEN = "replicas_written"  # `VariableResult.extra`: the replicas its upload task wrote the shards to


class ReplicaError(RuntimeError):
    """A replica could not be written or published: the primary was not changed."""


class Replica(FrozenModel):
    """One replica of a dataset: `url` is a Zarr store or an Icechunk repository (a path ending in `.icechunk`), at
    any supported location. Its endpoint and credentials are the AWS_* variables prefixed with
    `credentials_env_prefix` (default `REFORMATTERS_REPLICA_<NAME>_`, the name upper-cased with `-` as `_`), each
    falling back to the plain variable when the prefixed one is unset."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    url: str
    credentials_env_prefix: str | None = None

    @property
    def env_prefix(self) -> str:
        return self.credentials_env_prefix or f"{REPLICA_ENV_PREFIX}{self.name.upper().replace('-', '_')}_"

    def store(self) -> ObjectStore:
        return open_store(self.url, self.env_prefix)


def select_replicas(dataset_id: str, declared: Sequence[Replica], names: Sequence[str] | None) -> list[Replica]:
    """The replicas a run writes: all declared ones (`names` None), none (`[]`), or those named."""
    by_name = {replica.name: replica for replica in declared}
    if len(by_name) < len(declared):
        twice = sorted({r.name for r in declared if sum(other.name == r.name for other in declared) > 1})
        raise ValueError(f"{dataset_id} declares the replica name {twice[0]!r} twice; give each replica its own name")
    if names is None:
        return list(declared)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise ValueError(
            f"unknown replica {unknown[0]!r} of {dataset_id}; its declared replicas: {known}. Pass one of them to "
            "--replica, or --no-replicas"
        )
    return [by_name[name] for name in dict.fromkeys(names)]


@dataclass
class ReplicaTarget:
    """A replica open for a run: its store and the publisher lease this run holds on it."""

    replica: Replica
    store: ObjectStore
    lease: UpdateLease

    @property
    def written_by_workers(self) -> bool:
        """Whether the workers' uploads write the region's shards here: plain Zarr stores; an Icechunk repository
        takes them in its commit, so the publisher copies them there."""
        return not isinstance(self.store, IcechunkStore)

    def upload(self) -> ReplicaUpload:
        return ReplicaUpload(
            name=self.replica.name,
            url=self.store.url,
            credentials_env_prefix=self.store.credentials_env_prefix,
            fence=self.lease.fence(),
        )


@dataclass(frozen=True)
class ReplicaUpload:
    """What an upload task needs to write a region's shards to a plain Zarr replica too: where it is, and its
    lease's fence, checked before anything is written there."""

    name: str
    url: str
    credentials_env_prefix: str | None = None
    fence: Fence | None = None

    @property
    def store(self) -> ObjectStore:
        return cached_store(self.url, self.credentials_env_prefix)

    def failed(self, what: str, error: BaseException) -> ReplicaError:
        return ReplicaError(
            f"replica {self.name} ({self.url}) failed while uploading {what}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}. Nothing was published on the primary for this "
            "region; fix the replica's store (server, credentials) and re-run, or run with --no-replicas (or "
            "--replica for the others) to leave it out"
        )


def worker_uploads(targets: Sequence[ReplicaTarget]) -> tuple[ReplicaUpload, ...]:
    """The replicas the workers' upload tasks write (`ReplicaTarget.written_by_workers`)."""
    return tuple(target.upload() for target in targets if target.written_by_workers)


def check_replica_access(replicas: Sequence[Replica], primary: ObjectStore) -> None:
    """Raise `StoreAccessError`, naming the replica, if a replica is the primary store itself or its bucket is
    missing or refuses its credentials: a run checks this before it starts anything."""
    for replica in replicas:
        store = replica.store()
        if store.url == primary.url:
            raise StoreAccessError(
                f"replica {replica.name} is the primary store {primary.url}; pass another --store or --no-replicas"
            )
        try:
            store.check_access()
        except StoreAccessError as error:
            raise StoreAccessError(f"replica {replica.name}: {error}") from None


@contextmanager
def hold_replicas(
    replicas: Sequence[Replica], *, wait_seconds: float = 0.0, ttl_seconds: float | None = None
) -> Iterator[list[ReplicaTarget]]:
    """Each replica's store, with this run holding its publisher lease for the block."""
    from reformatters.publish import hold_lease

    with ExitStack() as stack:
        targets = []
        for replica in replicas:
            store = replica.store()
            lease = stack.enter_context(hold_lease(store, wait_seconds=wait_seconds, ttl_seconds=ttl_seconds))
            targets.append(ReplicaTarget(replica, store, lease))
        yield targets


# ---- which objects ----
def chunk_keys(name: str, metadata: Mapping[str, Any], axis_range: tuple[str, int, int] | None = None) -> list[str]:
    """The keys of every shard (or chunk, unsharded) object of array `name` from its `zarr.json` metadata; with
    `axis_range` (dimension, start, stop) only those holding positions start..stop of that dimension."""
    shape = metadata["shape"]
    shard = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    separator = (metadata.get("chunk_key_encoding") or {}).get("configuration", {}).get("separator", "/")
    grid = [range(-(-n // s)) for n, s in zip(shape, shard, strict=True)]
    dims = metadata.get("dimension_names") or []
    if axis_range is not None:
        dim, start, stop = axis_range
        if dim not in dims:
            return []
        axis = dims.index(dim)
        grid[axis] = range(start // shard[axis], min(-(-stop // shard[axis]), len(grid[axis])))
    return [f"{name}/" + separator.join(["c", *map(str, index)]) for index in itertools.product(*grid)]


# ---- publishing on a replica ----
def publish_on_replica(
    target: ReplicaTarget, source: ObjectStore, metadata: Mapping[str, bytes], shard_keys: Sequence[str], what: str
) -> None:
    """Copy `shard_keys` from `source` (the primary) to the replica and publish `metadata` there: in a plain store
    the changed metadata objects after the shards, root `zarr.json` last as a fenced commit; in an Icechunk
    repository one commit. Any failure raises `ReplicaError`: nothing has been published on the primary yet."""
    store = target.store
    try:
        target.lease.verify()
        changed = [key for key, data in metadata.items() if _current(store, key) != data]
        if isinstance(store, IcechunkStore):
            from reformatters.publish import icechunk_order

            for key in icechunk_order(changed):  # the arrays' new extent first: it must cover the new chunks
                store.put(key, metadata[key])
            copied = _copy(source, store, shard_keys)
            if store.has_uncommitted_changes:
                snapshot = store.commit(f"publish {what}", metadata={"holder": target.lease.owner, "run": what})
                target.lease.record_commit(store.url, snapshot)
        else:
            copied = _copy(source, store, shard_keys)
            for key in changed:
                if key == ROOT_METADATA_KEY:
                    target.lease.commit(store, key, metadata[key])
                else:
                    target.lease.check_fence()
                    store.put(key, metadata[key])
    except Exception as error:
        raise ReplicaError(
            f"replica {target.replica.name} ({store.url}) failed while publishing {what}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}. Nothing more was published on the primary; "
            "fix the replica's store (server, credentials) and re-run: the next run catches it up first, or run "
            "with --no-replicas (or --replica for the others) to leave it out"
        ) from error
    log.info(
        "replica %s: published %s (%d shard objects copied, %d metadata objects changed)",
        target.replica.name,
        what,
        copied,
        len(changed),
    )


def _current(store: ObjectStore, key: str) -> bytes | None:
    """The object's bytes, None when absent (an Icechunk repository raises for a key of a node it lacks)."""
    if not isinstance(store, IcechunkStore):
        return store.get(key)
    try:
        return store.get(key)
    except Exception:  # noqa: BLE001 - icechunk's own error type for "no such node"
        return None


def _copy(source: ObjectStore, target: ObjectStore, keys: Sequence[str]) -> int:
    """Copy the objects, `COPY_THREADS` at a time (requests, not bytes, bound a copy between object stores); each
    thread holds one object in memory. How many were copied."""

    def copy_one(key: str) -> int:
        data = source.get(key)
        if data is None:
            if _current(target, key) is not None:  # no object on the primary: the fill value there, so here too
                target.delete(key)
            return 0
        target.put(key, data)
        return 1

    if len(keys) <= 1:
        return sum(map(copy_one, keys))
    with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="replica-copy") as pool:
        return sum(pool.map(copy_one, keys))


def published_length(store: ObjectStore, append_dim: str) -> int | None:
    """The length of the append dimension a store publishes, from its root `zarr.json`; None without one."""
    root = store.get(ROOT_METADATA_KEY)
    if root is None:
        return None
    for meta in consolidated_arrays(root).values():
        dims = meta.get("dimension_names") or []
        if dims == [append_dim]:
            return int(meta["shape"][0])
    return 0


def catch_up(target: ReplicaTarget, primary: ObjectStore, append_dim: str) -> bool:
    """Refuse a replica whose published structure differs from the primary's (`StructureDriftError`), then publish
    on it what the primary publishes beyond its extent (a region an earlier run published without it): the shards
    from the replica's last shard on, every coordinate and all metadata, root last. A replica as long as the primary
    or longer is left alone. Whether anything was published."""
    primary_root = primary.get(ROOT_METADATA_KEY)
    if primary_root is None:
        return False
    replica_root = target.store.get(ROOT_METADATA_KEY)
    differences = [] if replica_root is None else structure_differences(primary_root, replica_root, append_dim)
    if differences:
        raise StructureDriftError(
            f"replica {target.replica.name} at {target.store.url} holds a dataset of another structure than the "
            f"primary {primary.url} ({'; '.join(differences[:3])}); nothing was published. Point the replica at "
            "another location, or delete it and let the next run copy the primary there"
        )
    primary_length = published_length(primary, append_dim) or 0
    replica_length = published_length(target.store, append_dim)
    if replica_length is not None and replica_length >= primary_length:
        return False
    start = max((replica_length or 0) - 1, 0)  # the last published position too: a later run may have redone it
    arrays = consolidated_arrays(primary_root)
    metadata: dict[str, bytes] = {}
    shard_keys: list[str] = []
    for name, meta in sorted(arrays.items()):
        dims = meta.get("dimension_names") or []
        is_coordinate = len(dims) <= 1 or name in dims
        span = None if is_coordinate else (append_dim, start, primary_length)
        keys = chunk_keys(name, meta, span)
        data = primary.get(f"{name}/zarr.json")
        if data is None:
            raise ReplicaError(f"the primary {primary.url} lists array {name} but has no {name}/zarr.json")
        metadata[f"{name}/zarr.json"] = data
        if is_coordinate:
            for key in keys:  # coordinates are metadata: written with it, before the root
                chunk = primary.get(key)
                if chunk is not None:
                    metadata[key] = chunk
        else:
            shard_keys.extend(keys)
    metadata[ROOT_METADATA_KEY] = primary_root
    log.warning(
        "replica %s publishes %s %s positions, the primary %d: catching it up before this run publishes anything",
        target.replica.name,
        "no" if replica_length is None else replica_length,
        append_dim,
        primary_length,
    )
    publish_on_replica(target, primary, metadata, shard_keys, f"catch-up to {primary_length} {append_dim} positions")
    return True
