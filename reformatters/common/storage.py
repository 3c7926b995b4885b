"""Object access to a Zarr store at a local path, `file://`, `s3://` or `gs://` URL.

Every write is atomic per object: a local write goes to a temporary file that is renamed into
place; an object-store PUT replaces the whole object. Endpoints and credentials come from the usual
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., `STORAGE_EMULATOR_HOST`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec

REMOTE_PROTOCOLS = ("s3", "gs", "gcs")


def storage_options_for(url: str) -> dict[str, Any]:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in REMOTE_PROTOCOLS:
        return {}
    # No listings cache: other processes (workers, a concurrent publisher) write to the store, and after a
    # listing s3fs/gcsfs answer `exists`/`cat_file` from the cached listing, so an object written since
    # would read as absent (a merge into a published shard would then start from an empty shard).
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        if not _aws_credentials_found(os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE")):
            options["anon"] = True
    return options


@functools.lru_cache(maxsize=8)
def _aws_credentials_found(access_key_id: str | None, profile: str | None) -> bool:
    """Whether boto's credential chain finds anything: environment, ~/.aws files, SSO, web identity (IRSA),
    container or instance roles. Only when nothing is found is the store read anonymously; checking just
    AWS_ACCESS_KEY_ID would send unsigned (failing) writes from a pod with a role or a laptop with ~/.aws."""
    if access_key_id or profile:
        return True
    import botocore.session

    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken config file means no usable credentials
        return False


class ObjectStore:
    """Keys are '/'-separated paths relative to the store root (e.g. `temperature_2m/c/0/0/1/1`)."""

    def __init__(self, url: str | Path) -> None:
        text = str(url)
        if text.startswith("file://"):
            text = text[len("file://") :]
        self.url = text.rstrip("/")
        self.protocol = text.split("://", 1)[0] if "://" in text else "file"
        if self.protocol not in ("file", *REMOTE_PROTOCOLS, "memory"):
            raise ValueError(
                f"unsupported store URL {url!r}: use a local path, file://, s3://bucket/path or gs://bucket/path"
            )
        if self.protocol == "file":
            self.url = str(Path(self.url).absolute())

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectStore, (self.url,))

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **storage_options_for(self.url))

    def _path(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def get(self, key: str) -> bytes | None:
        if self.is_local:
            try:
                return Path(self._path(key)).read_bytes()
            except FileNotFoundError:
                return None
        try:
            data: bytes = self.fs.cat_file(self._path(key))
            return data
        except FileNotFoundError:
            return None

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes | None:
        """Bytes `start`..`end` of an object (a negative `start` counts from its end); None if it is absent."""
        if self.is_local:
            try:
                with open(self._path(key), "rb") as file:
                    file.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                    return file.read() if end is None else file.read(max(0, end - file.tell()))
            except FileNotFoundError:
                return None
            except OSError:  # a suffix longer than the file
                whole = self.get(key)
                return None if whole is None else whole[start:end]
        try:
            data: bytes = self.fs.cat_file(self._path(key), start=start, end=end)
            return data
        except FileNotFoundError:
            return None

    def holds(self, key: str, data: bytes) -> bool:
        """Whether the object at `key` has exactly these bytes, judged without downloading it: the object store's
        MD5 (S3's ETag of a single-part upload, GCS's md5Hash); a local file's size, then its digest."""
        if self.is_local:
            path = Path(self._path(key))
            try:
                if path.stat().st_size != len(data):
                    return False
            except FileNotFoundError:
                return False
            return hashlib.md5(path.read_bytes()).digest() == hashlib.md5(data).digest()
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return False
        if int(info.get("size", -1)) != len(data):
            return False
        md5 = hashlib.md5(data)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag and "-" not in etag:  # a multipart upload's ETag is no MD5 of the object
            return etag == md5.hexdigest()
        md5_hash = info.get("md5Hash")
        if md5_hash:
            return base64.b64decode(md5_hash) == md5.digest()
        return False

    def exists(self, key: str) -> bool:
        if self.is_local:
            return Path(self._path(key)).exists()
        return bool(self.fs.exists(self._path(key)))

    def put(self, key: str, data: bytes) -> None:
        if self.is_local:
            target = Path(self._path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        self.fs.pipe_file(self._path(key), data)

    def delete(self, key: str) -> None:
        if self.is_local:
            Path(self._path(key)).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under a prefix, recursively, relative to the store root."""
        base = self._path(prefix)
        if self.is_local:
            root = Path(base)
            if not root.exists():
                return []
            store_root = Path(self.url)
            return sorted(
                str(p.relative_to(store_root)) for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name
            )
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.url) + "/"
        # Servers with real folders (SeaweedFS, MinIO) keep a prefix after its last object is deleted, and
        # s3fs then reports the prefix itself as a directory entry: only objects are keys.
        return sorted(
            path[len(root) :]
            for path, info in found.items()
            if info.get("type") != "directory" and path.startswith(root) and len(path) > len(root)
        )

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def zarr_store(self, read_only: bool = True) -> Any:
        """A zarr Store for xarray/zarr to open this location."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.url, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=storage_options_for(self.url), read_only=read_only
        )

    def open_dataset(self, **kwargs: Any) -> Any:
        import xarray as xr

        return xr.open_zarr(self.zarr_store(), decode_timedelta=True, **kwargs)
