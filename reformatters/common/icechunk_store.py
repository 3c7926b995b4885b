"""Icechunk repositories as stores: a store path ending in `.icechunk` holds the dataset at the root group of an
Icechunk repository, and readers only ever see committed snapshots of its branch `main`.

How a run writes one (the rest of the system sees an `ObjectStore`):
- The driver opens the repository and keeps one *pending* writable session on `main`, based on the snapshot the
  run read (`expected_parent`). Reads through the store (the published dataset, drift checks, updates' planning)
  see that session.
- Workers read published shards through a read-only session pinned to that snapshot (what the store pickles to),
  and write through their own fork of a clean writable session (`fork_bytes`, one fresh fork per upload task,
  `IcechunkUpload`): the same shard objects a plain store gets, as the chunks of the same arrays. A fork carries
  its array's metadata at the template's extent, so its chunk indices are valid.
- When a region is published, the driver merges that region's forks into the pending session, writes the
  region's metadata there, and commits: exactly one commit on `main` per region (`commit`). The commit is refused
  unless `main` is still at the snapshot this run last committed or read; nothing is resolved by dropping a side.
- Lease and progress records are no Zarr data: they live beside the repository, in `{path}.reformatters/`
  (`control_store`), a plain object-store prefix with the same conditional writes as a plain store's `_internal/`.

`gs://` repositories are refused, untested: Icechunk's GCS storage can be pointed at the tests' fake-gcs-server
(`google_base_url`), but it lists objects with the XML API (`GET /bucket?list-type=2`), which the emulator
answers with 404, so creating a repository there fails.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from reformatters.common.storage import ObjectStore, s3_endpoint, store_env

log = logging.getLogger("reformatters.icechunk")

ICECHUNK_SUFFIX = ".icechunk"
CONTROL_SUFFIX = ".reformatters"
BRANCH = "main"


class IcechunkCommitRefusedError(ValueError):
    """A commit on `main` was refused: another writer committed since this run read or last committed it."""


def is_icechunk_url(url: str | os.PathLike[str]) -> bool:
    return str(url).rstrip("/").endswith(ICECHUNK_SUFFIX)


def _quiet_icechunk_logs() -> None:
    import icechunk

    # The local filesystem storage warns on every open that it is unsafe for concurrent commits; the publisher
    # lease keeps runs apart, and the warning would drown a run's own log.
    if not os.environ.get("ICECHUNK_LOG"):
        icechunk.set_logs_filter("error")


def icechunk_storage(url: str, credentials_env_prefix: str | None = None) -> Any:
    """The Icechunk `Storage` of a local path or an `s3://bucket/prefix` URL; endpoint and credentials from the
    usual AWS_* environment variables, or `{credentials_env_prefix}AWS_*` where set (a plain-HTTP endpoint, as a
    local S3 server has, is allowed)."""
    import icechunk

    def env(name: str) -> str | None:
        return store_env(name, credentials_env_prefix)

    _quiet_icechunk_logs()
    if "://" not in url or url.startswith("file://"):
        return icechunk.local_filesystem_storage(url.removeprefix("file://"))
    protocol, _, path = url.partition("://")
    bucket, _, prefix = path.partition("/")
    if protocol == "s3":
        endpoint = s3_endpoint(credentials_env_prefix)
        region = env("AWS_REGION") or env("AWS_DEFAULT_REGION")
        key_id, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        credentials: dict[str, Any] = (
            {"access_key_id": key_id, "secret_access_key": secret, "session_token": env("AWS_SESSION_TOKEN")}
            if key_id and secret
            else {"from_env": True}
        )
        return icechunk.s3_storage(
            bucket=bucket,
            prefix=prefix.strip("/") or None,
            region=region,
            endpoint_url=endpoint,
            allow_http=bool(endpoint and endpoint.startswith("http://")),
            force_path_style=bool(endpoint),
            **credentials,
        )
    if protocol in ("gs", "gcs"):
        raise ValueError(
            f"Icechunk stores on GCS are not supported yet ({url}): use an s3:// or local .icechunk path, or a "
            "gs://...zarr store"
        )
    raise ValueError(f"unsupported Icechunk store URL {url!r}: use a local path or s3://bucket/path.icechunk")


def _sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)


def _prototype() -> Any:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


class IcechunkStore(ObjectStore):
    """An Icechunk repository seen as an `ObjectStore` of Zarr keys through one session.

    Built from a URL it opens `main`'s tip read-only on first use; `begin_writing()` turns it into the driver's
    store (a pending writable session); unpickled on a worker it is a read-only session pinned to the snapshot
    the driver was based on."""

    def __init__(self, url: str | Path, session: Any = None, credentials_env_prefix: str | None = None) -> None:
        super().__init__(url, credentials_env_prefix)
        self._session = session
        self._writing = False
        self._fork_source: Any = None
        self.expected_parent: str | None = None
        self.commits: list[str] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self.url, self.read_view(), self.credentials_env_prefix))

    def __repr__(self) -> str:
        return f"IcechunkStore({self.url!r})"

    # ---- the repository ----
    @cached_property
    def storage(self) -> Any:
        return icechunk_storage(self.url, self.credentials_env_prefix)

    @cached_property
    def repo(self) -> Any:
        import icechunk

        return icechunk.Repository.open(self.storage)

    def repository_exists(self) -> bool:
        import icechunk

        return bool(icechunk.Repository.exists(self.storage))

    def control_store(self) -> ObjectStore:
        return ObjectStore(self.url + CONTROL_SUFFIX, self.credentials_env_prefix)

    @property
    def session(self) -> Any:
        if self._session is None:
            if not self.repository_exists():
                raise FileNotFoundError(f"no Icechunk repository at {self.url}")
            self._session = self.repo.readonly_session(branch=BRANCH)
        return self._session

    def read_view(self) -> Any:
        """A picklable read-only session at the snapshot this store reads (workers read published shards there)."""
        if self._writing:
            return self.repo.readonly_session(snapshot_id=self.expected_parent)
        return self._session if self._session is not None and self._session.read_only else self.session

    # ---- writing (driver) ----
    def begin_writing(self) -> None:
        """Create the repository if there is none, and open the pending session on `main`'s tip."""
        import icechunk

        if self._writing:
            return
        created = not self.repository_exists()
        repo = icechunk.Repository.open_or_create(self.storage)
        self.__dict__["repo"] = repo
        self.expected_parent = repo.lookup_branch(BRANCH)
        self._session = repo.writable_session(BRANCH)
        self._fork_source = repo.writable_session(BRANCH)
        self._writing = True
        how = "created" if created else "opened"
        log.info("%s Icechunk repository %s at snapshot %s", how, self.url, self.expected_parent)

    @property
    def writing(self) -> bool:
        return self._writing

    def fork_bytes(self) -> bytes:
        """A fresh fork for one upload task, pickled: each task unpickles its own copy (`IcechunkUpload`)."""
        if not self._writing:
            raise RuntimeError(f"{self.url}: forks need begin_writing() first")
        return pickle.dumps(self._fork_source.fork())

    def merge(self, forks: Iterable[Any]) -> None:
        forks = [f for f in forks if f is not None]
        if forks:
            self._session.merge(*forks)

    @property
    def has_uncommitted_changes(self) -> bool:
        return bool(self._writing and self._session.has_uncommitted_changes)

    def commit(self, message: str, metadata: dict[str, Any] | None = None) -> str:
        """Commit the pending session on `main`: refused (`IcechunkCommitRefusedError`, nothing committed) unless
        `main` is still at the snapshot this run read or last committed."""
        import icechunk

        if not self._writing:
            raise RuntimeError(f"{self.url}: commit needs begin_writing() first")
        base = self._session.snapshot_id
        if base != self.expected_parent:
            raise IcechunkCommitRefusedError(self._refusal(message, f"snapshot {base}"))
        try:
            snapshot = str(self._session.commit(message, metadata=metadata))
        except icechunk.ConflictError:
            tip = self.repo.lookup_branch(BRANCH)
            raise IcechunkCommitRefusedError(self._refusal(message, f"snapshot {tip}")) from None
        self.commits.append(snapshot)
        self.expected_parent = snapshot
        self._session = self.repo.writable_session(BRANCH)
        self._fork_source = self.repo.writable_session(BRANCH)  # later forks start from the arrays just committed
        return snapshot

    def _refusal(self, message: str, found: str) -> str:
        return (
            f"Icechunk commit refused on {self.url}: expected branch {BRANCH} at snapshot {self.expected_parent} "
            f"(what this run read or last committed), found {found}: another writer committed in between. "
            f"Nothing of '{message}' was committed and the other writer's commit stands; re-run once it is done."
        )

    # ---- ObjectStore over the session's zarr store ----
    @property
    def _store(self) -> Any:
        return self.session.store

    def get(self, key: str) -> bytes | None:
        buffer = _sync(self._store.get(key, _prototype()))
        return None if buffer is None else bytes(buffer.to_bytes())

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        if start < 0 and end is not None:  # a suffix up to an absolute end: rare, read whole
            whole = self.get(key)
            return None if whole is None else whole[start:end]
        request: Any = (
            SuffixByteRequest(-start)
            if start < 0
            else OffsetByteRequest(start)
            if end is None
            else RangeByteRequest(start, end)
        )
        buffer = _sync(self._store.get(key, _prototype(), byte_range=request))
        return None if buffer is None else bytes(buffer.to_bytes())

    def holds(self, key: str, data: bytes) -> bool:
        """Never skips a write: each commit is a snapshot, so an unchanged shard written again costs one chunk
        object (collected by `reformatters maintain`) and spares reading it back."""
        return False

    def exists(self, key: str) -> bool:
        try:
            return bool(_sync(self._store.exists(key)))
        except FileNotFoundError:
            return False

    def put(self, key: str, data: bytes) -> None:
        payload = data if isinstance(data, bytes) else bytes(data)
        _sync(self._store.set(key, _prototype().buffer.from_bytes(payload)))

    def delete(self, key: str) -> None:
        _sync(self._store.delete(key))

    def list(self, prefix: str = "") -> list[str]:
        import icechunk

        # Icechunk lists only under a group or an array ("var/c/" is refused): list the nearest node above the
        # prefix and keep the keys under it.
        node = prefix

        async def collect() -> list[str]:
            return [key async for key in self._store.list_prefix(node)]

        while True:
            try:
                return sorted(key for key in _sync(collect()) if key.startswith(prefix))
            except FileNotFoundError:
                return []
            except icechunk.IcechunkError as error:
                if "bad key prefix" not in str(error) or not node.strip("/"):
                    raise
                node = node.rstrip("/").rpartition("/")[0]

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def get_with_version(self, key: str) -> tuple[bytes, str] | None:
        raise NotImplementedError(self._no_conditional_writes)

    def put_if_absent(self, key: str, data: bytes) -> str:
        raise NotImplementedError(self._no_conditional_writes)

    def put_if_match(self, key: str, data: bytes, version: str) -> str:
        raise NotImplementedError(self._no_conditional_writes)

    @property
    def _no_conditional_writes(self) -> str:
        return f"{self.url}: conditional writes go to {self.url}{CONTROL_SUFFIX}, not into the repository"

    def zarr_store(self, read_only: bool = True) -> Any:
        return self.session.store

    def open_dataset(self, **kwargs: Any) -> Any:
        import xarray as xr

        kwargs.setdefault("consolidated", False)  # a snapshot's per-array metadata is already consistent
        return xr.open_zarr(self.session.store, decode_timedelta=True, **kwargs)


def _restore(url: str, session: Any, credentials_env_prefix: str | None = None) -> IcechunkStore:
    return IcechunkStore(url, session=session, credentials_env_prefix=credentials_env_prefix)


# ---- uploads from workers ----
@dataclass(frozen=True)
class IcechunkUpload:
    """`upload(encoded, final_store)` for an Icechunk store: the shard objects go into a fresh fork of the
    driver's session (with the array's metadata at the template's extent, so every chunk index is valid), which
    travels back in `VariableResult.fork` to be merged and committed with its region. `after(result)` runs on
    the worker once the fork holds the writes (the update's and backfill's hooks), `fence` is checked first."""

    fork: bytes
    var_metadata: dict[str, bytes]
    fence: Any = None

    def __call__(self, encoded: Any, final_store: ObjectStore) -> Any:
        from reformatters.pipeline.kernels import limit_library_threads, upload_kernel
        from reformatters.update.pause import pause_at

        limit_library_threads()
        if self.fence is not None:
            self.fence.check()
        session = pickle.loads(self.fork)  # the driver's own fork, sent in this task's graph
        target = IcechunkStore(final_store.url, session=session)
        target.put(f"{encoded.var_name}/zarr.json", self.var_metadata[encoded.var_name])
        result = upload_kernel(encoded, target)
        pause_at("upload")
        return replace(result, fork=session)


def take_forks(results: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The forks a region's `VariableResult`s carry, and the results without them (for records and summaries)."""
    forks = [r.fork for r in results if getattr(r, "fork", None) is not None]
    return forks, [replace(r, fork=None) if getattr(r, "fork", None) is not None else r for r in results]


# ---- maintenance ----
@dataclass(frozen=True)
class MaintenanceReport:
    url: str
    expired_snapshots: int
    deleted_chunks: int
    deleted_manifests: int
    deleted_snapshots: int
    bytes_deleted: int

    def render(self) -> str:
        return (
            f"maintain {self.url}: {self.expired_snapshots} snapshots expired; deleted {self.deleted_chunks} chunk "
            f"objects, {self.deleted_manifests} manifests, {self.deleted_snapshots} snapshots "
            f"({self.bytes_deleted / 1e6:.1f} MB)"
        )


def maintain(
    url: str, *, older_than: datetime.timedelta, grace: datetime.timedelta, now: datetime.datetime | None = None
) -> MaintenanceReport:
    """Expire snapshots of `main` older than `older_than` (its tip never expires), then delete the objects no
    branch or tag reaches any more and that are older than `grace` (a run writing now is not robbed of chunks
    it has not committed yet)."""
    store = IcechunkStore(url)
    if not store.repository_exists():
        raise FileNotFoundError(f"expected an Icechunk repository at {url}, found none: nothing to maintain")
    now = now or datetime.datetime.now(datetime.UTC)
    repo = store.repo
    expired = repo.expire_snapshots(now - older_than)
    summary = repo.garbage_collect(now - grace)
    return MaintenanceReport(
        url=store.url,
        expired_snapshots=len(expired),
        deleted_chunks=int(summary.chunks_deleted),
        deleted_manifests=int(summary.manifests_deleted),
        deleted_snapshots=int(summary.snapshots_deleted),
        bytes_deleted=int(summary.bytes_deleted),
    )


def describe_commits(url: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest commits of `main` (id, time, message, metadata), newest first."""
    store = IcechunkStore(url)
    out = []
    for info in store.repo.ancestry(branch=BRANCH):
        out.append(
            {
                "id": info.id,
                "written_at": info.written_at.isoformat(),
                "message": info.message,
                "metadata": json.loads(json.dumps(info.metadata, default=str)),
            }
        )
        if len(out) >= limit:
            break
    return out


# ---- readers ----
def reader_code(url: str) -> str:
    """The Python that opens the dataset at `url` with xarray: a plain store directly, an Icechunk repository
    through a read-only session on `main` (credentials and endpoints from the environment)."""
    if not is_icechunk_url(url):
        return f'import xarray as xr\n\nds = xr.open_zarr("{url}", decode_timedelta=True)\n'
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        storage = f'icechunk.s3_storage(bucket="{bucket}", prefix="{prefix.strip("/")}", from_env=True)'
    else:
        storage = f'icechunk.local_filesystem_storage("{url.removeprefix("file://")}")'
    return (
        "import icechunk\nimport xarray as xr\n\n"
        f"storage = {storage}\n"
        'session = icechunk.Repository.open(storage).readonly_session(branch="main")\n'
        "ds = xr.open_zarr(session.store, consolidated=False, decode_timedelta=True)\n"
    )
