"""Object access to a Zarr store at a local path, `file://`, `s3://` or `gs://` URL.

Every write is atomic per object: a local write goes to a temporary file that is renamed into
place; an object-store PUT replaces the whole object. Endpoints and credentials come from the usual
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., `STORAGE_EMULATOR_HOST`).

Conditional writes (`put_if_absent`, `put_if_match`, with `get_with_version`) are what the publisher lease
and the fenced commit are built on. Each backend makes them atomic its own way:

- S3: `PutObject` with `If-None-Match: *` (create) or `If-Match: <ETag>` (replace); the version is the ETag.
- GCS: uploads with the generation precondition `ifGenerationMatch` (0 for create); the version is the
  object's generation.
- Local disk: create is a hard link of a complete temporary file (fails if the name exists); replace checks
  the version and renames under an `flock` on the object's directory held across both. That lock is only
  honoured between processes of one host: two hosts sharing a network file system get no guarantee.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec

REMOTE_PROTOCOLS = ("s3", "gs", "gcs")


# Objects up to this size go to a remote store in one request (S3 allows 5 GiB), larger ones in parts of it.
UPLOAD_PART_BYTES = 64 << 20


class StoreAccessError(RuntimeError):
    """The store's bucket is missing, or its credentials are missing or refused: nothing was written."""


class PreconditionFailedError(Exception):
    """A conditional write found the object absent, present or at another version than required."""


def _disable_gcsfs_experimental_features() -> None:
    # gcsfs's zonal/hierarchical-namespace support probes bucket layouts with calls that emulators do not
    # answer (gcsfs stalls). It is read once, when gcsfs is imported; an explicit setting is kept.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def store_env(name: str, prefix: str | None = None) -> str | None:
    """The environment variable `name` of a store whose credentials are under `prefix` (`{prefix}AWS_ACCESS_KEY_ID`
    and so on): the prefixed variable when set, else the plain one."""
    if prefix:
        value = os.environ.get(prefix + name)
        if value is not None:
            return value
    return os.environ.get(name)


def s3_endpoint(prefix: str | None = None) -> str | None:
    return store_env("AWS_ENDPOINT_URL_S3", prefix) or store_env("AWS_ENDPOINT_URL", prefix)


def storage_options_for(url: str, credentials_env_prefix: str | None = None) -> dict[str, Any]:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in REMOTE_PROTOCOLS:
        return {}
    # No listings cache: other processes (workers, a concurrent publisher) write to the store, and after a
    # listing s3fs/gcsfs answer `exists`/`cat_file` from the cached listing, so an object written since
    # would read as absent (a merge into a published shard would then start from an empty shard).
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol == "s3":
        prefix = credentials_env_prefix
        endpoint = s3_endpoint(prefix)
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        key_id = store_env("AWS_ACCESS_KEY_ID", prefix)
        profile = store_env("AWS_PROFILE", prefix)
        if not _aws_credentials_found(key_id, profile):
            options["anon"] = True
        elif prefix and key_id:
            # Explicit: s3fs would otherwise take the process's plain AWS_* (another account's).
            options.update(
                key=key_id,
                secret=store_env("AWS_SECRET_ACCESS_KEY", prefix),
                token=store_env("AWS_SESSION_TOKEN", prefix),
            )
        elif prefix and profile:
            options["profile"] = profile
    else:
        _disable_gcsfs_experimental_features()
        if _gcs_emulator_host():
            options["token"] = "anon"
    return options


def _gcs_emulator_host() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return host if host not in ("", "default") else None


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


def _local_version(stat: os.stat_result) -> str:
    # Every write renames a new file into place, so the inode changes with it; the times and size guard
    # against an inode number reused after the old file was freed.
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_ctime_ns}-{stat.st_size}"


class ObjectStore:
    """Keys are '/'-separated paths relative to the store root (e.g. `temperature_2m/c/0/0/1/1`)."""

    def __init__(self, url: str | Path, credentials_env_prefix: str | None = None) -> None:
        # Endpoint and credentials from `{prefix}AWS_*` where set (`store_env`): stores of two accounts in one process.
        self.credentials_env_prefix = credentials_env_prefix or None
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
        return (ObjectStore, (self.url, self.credentials_env_prefix))

    def _env(self, name: str) -> str | None:
        return store_env(name, self.credentials_env_prefix)

    def _credentials_found(self) -> bool:
        return _aws_credentials_found(self._env("AWS_ACCESS_KEY_ID"), self._env("AWS_PROFILE"))

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **storage_options_for(self.url, self.credentials_env_prefix))

    def _path(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    @property
    def bucket_and_prefix(self) -> tuple[str, str]:
        """For s3:// and gs:// stores: the bucket and the key prefix of the store root ('' at a bucket root)."""
        path = self.url.split("://", 1)[1]
        bucket, _, prefix = path.partition("/")
        return bucket, prefix.strip("/")

    def _object_name(self, key: str) -> str:
        _, prefix = self.bucket_and_prefix
        return f"{prefix}/{key}" if prefix else key

    @cached_property
    def _s3_client(self) -> Any:
        import boto3
        import botocore.config

        config = None
        if not self._credentials_found():
            config = botocore.config.Config(signature_version=botocore.UNSIGNED)
        session = boto3.session.Session()
        if self.credentials_env_prefix:
            session = boto3.session.Session(
                aws_access_key_id=self._env("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=self._env("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=self._env("AWS_SESSION_TOKEN"),
                region_name=self._env("AWS_REGION") or self._env("AWS_DEFAULT_REGION"),
                profile_name=None if self._env("AWS_ACCESS_KEY_ID") else self._env("AWS_PROFILE"),
            )
        return session.client("s3", endpoint_url=s3_endpoint(self.credentials_env_prefix), config=config)

    @cached_property
    def _gcs_bucket(self) -> Any:
        from google.cloud import storage as gcs

        bucket, _ = self.bucket_and_prefix
        if _gcs_emulator_host():
            from google.auth.credentials import AnonymousCredentials

            client = gcs.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            client = gcs.Client()
        return client.bucket(bucket)

    def check_access(self) -> None:
        """Raise `StoreAccessError`, saying what to fix, if the bucket does not exist or refuses this process's
        credentials. One request; a local store always passes (its writes fail with their own path error)."""
        if self.protocol == "s3":
            self._check_s3_access()
        elif self.protocol in ("gs", "gcs"):
            self._check_gcs_access()

    def _check_s3_access(self) -> None:
        import botocore.exceptions

        bucket, _ = self.bucket_and_prefix
        endpoint = s3_endpoint(self.credentials_env_prefix) or "AWS"
        try:
            self._s3_client.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreAccessError(
                    f"the bucket {bucket!r} of the store {self.url} does not exist at {endpoint}; create it, or fix "
                    "the bucket name in --store (or AWS_ENDPOINT_URL if it points at the wrong server)"
                ) from None
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreAccessError(self._refused(code, found=self._credentials_found())) from None
            raise StoreAccessError(f"the store {self.url} answered {code or error}; check --store") from None
        except botocore.exceptions.BotoCoreError as error:
            raise StoreAccessError(f"cannot reach the store {self.url} at {endpoint}: {error}") from None

    def _check_gcs_access(self) -> None:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exceptions

        bucket, _ = self.bucket_and_prefix
        try:
            self._gcs_bucket.reload()
        except gexc.NotFound:
            raise StoreAccessError(
                f"the bucket {bucket!r} of the store {self.url} does not exist; create it, or fix the bucket name "
                "in --store"
            ) from None
        except (gexc.Forbidden, gexc.Unauthorized) as error:
            raise StoreAccessError(self._refused(type(error).__name__, found=True)) from None
        except auth_exceptions.DefaultCredentialsError:
            raise StoreAccessError(self._refused("no credentials", found=False)) from None

    def _refused(self, code: str, *, found: bool) -> str:
        bucket, _ = self.bucket_and_prefix
        how = (
            "set {0}AWS_ACCESS_KEY_ID and {0}AWS_SECRET_ACCESS_KEY (or {0}AWS_PROFILE)".format(
                self.credentials_env_prefix or ""
            )
            if self.protocol == "s3"
            else "set GOOGLE_APPLICATION_CREDENTIALS (or run where a service account is attached)"
        )
        if found:
            return (
                f"the store {self.url} refused this process's credentials ({code}); {how} to an identity that may "
                f"read and write the bucket {bucket!r}"
            )
        return (
            f"no credentials were found for the store {self.url}, and the bucket {bucket!r} refused unsigned "
            f"requests ({code}); {how}"
        )

    # ---- conditional writes ----
    def get_with_version(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and the version token that `put_if_match` compares, or None when absent."""
        if self.is_local:
            try:
                with open(self._path(key), "rb") as file:
                    return file.read(), _local_version(os.fstat(file.fileno()))
            except FileNotFoundError:
                return None
        if self.protocol == "s3":
            bucket, _ = self.bucket_and_prefix
            client = self._s3_client
            try:
                response = client.get_object(Bucket=bucket, Key=self._object_name(key))
            except client.exceptions.NoSuchKey:
                return None
            return response["Body"].read(), str(response["ETag"])
        if self.protocol in ("gs", "gcs"):
            return self._gcs_get_with_version(key)
        raise NotImplementedError(f"conditional access is not implemented for {self.protocol}:// stores")

    def _gcs_get_with_version(self, key: str) -> tuple[bytes, str] | None:
        from google.api_core import exceptions as gexc

        name = self._object_name(key)
        while True:
            blob = self._gcs_bucket.get_blob(name)
            if blob is None:
                return None
            try:
                # Pinned to the generation just listed: bytes and version always belong together.
                data: bytes = blob.download_as_bytes(if_generation_match=blob.generation)
            except (gexc.NotFound, gexc.PreconditionFailed):
                continue  # replaced or deleted in between: look again
            return data, str(blob.generation)

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create the object only if no object has the key; returns its version. Raises
        `PreconditionFailedError` when the key exists."""
        if self.is_local:
            with self._local_lock(key):
                target = Path(self._path(key))
                tmp = self._local_tmp(target, data)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise PreconditionFailedError(f"{self._path(key)} exists") from None
                finally:
                    tmp.unlink(missing_ok=True)
                return _local_version(os.stat(target))
        return self._remote_conditional_put(key, data, None)

    def put_if_match(self, key: str, data: bytes, version: str) -> str:
        """Replace the object only if it is still at `version`; returns the new version. Raises
        `PreconditionFailedError` when it was replaced, deleted or never existed."""
        if self.is_local:
            with self._local_lock(key):
                target = Path(self._path(key))
                try:
                    current = _local_version(os.stat(target))
                except FileNotFoundError:
                    raise PreconditionFailedError(f"{self._path(key)} is absent, expected version {version}") from None
                if current != version:
                    raise PreconditionFailedError(f"{self._path(key)} is at version {current}, expected {version}")
                tmp = self._local_tmp(target, data)
                try:
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                return _local_version(os.stat(target))
        return self._remote_conditional_put(key, data, version)

    def _remote_conditional_put(self, key: str, data: bytes, version: str | None) -> str:
        if self.protocol == "s3":
            import botocore.exceptions

            bucket, _ = self.bucket_and_prefix
            condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
            try:
                response = self._s3_client.put_object(Bucket=bucket, Key=self._object_name(key), Body=data, **condition)
            except botocore.exceptions.ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 412: the condition failed; 409: a concurrent conditional write to the same key won; 404: a
                # conditional replace of an object deleted meanwhile.
                if status in (409, 412, 404) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise PreconditionFailedError(
                        f"{self._path(key)}: {'exists' if version is None else f'not at version {version}'} ({code})"
                    ) from None
                raise
            return str(response["ETag"])
        if self.protocol in ("gs", "gcs"):
            from google.api_core import exceptions as gexc

            blob = self._gcs_bucket.blob(self._object_name(key))
            try:
                blob.upload_from_string(data, if_generation_match=0 if version is None else int(version))
            except (gexc.PreconditionFailed, gexc.NotFound) as error:
                raise PreconditionFailedError(
                    f"{self._path(key)}: {'exists' if version is None else f'not at generation {version}'} "
                    f"({type(error).__name__})"
                ) from None
            return str(blob.generation)
        raise NotImplementedError(f"conditional writes are not implemented for {self.protocol}:// stores")

    @contextlib.contextmanager
    def _local_lock(self, key: str) -> Iterator[None]:
        directory = Path(self._path(key)).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _local_tmp(target: Path, data: bytes) -> Path:
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return tmp

    # ---- plain access ----
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
            digest = hashlib.md5()
            with path.open("rb") as file:  # block by block: a shard may be large
                for block in iter(lambda: file.read(1 << 22), b""):
                    digest.update(block)
            return digest.digest() == hashlib.md5(data).digest()
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return False
        if int(info.get("size", -1)) != len(data):
            return False
        md5 = hashlib.md5(data)
        md5_hash = info.get("md5Hash")  # GCS (whose etag is no MD5)
        if md5_hash:
            return base64.b64decode(md5_hash) == md5.digest()
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"') if self.protocol == "s3" else ""
        if etag and "-" not in etag:  # a multipart upload's ETag is no MD5 of the object
            return etag == md5.hexdigest()
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
        # `data` may be any bytes-like object (a memory-mapped file locally); the remote clients want bytes.
        self.fs.pipe_file(self._path(key), data if isinstance(data, bytes) else bytes(data))

    def put_file(self, key: str, path: Path, *, part_bytes: int = UPLOAD_PART_BYTES) -> None:
        """Write the object from a local file, `part_bytes` at a time: a remote store gets a file up to that size
        in one request and a larger one as a multipart (S3) or resumable (GCS) upload, whole and atomically, with
        one part in memory instead of the file. (A multipart object's ETag is no MD5 of it: `holds` then says no
        and the next run writes it again.)"""
        if self.is_local:
            target = Path(self._path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        if self.protocol == "s3":
            from boto3.s3.transfer import TransferConfig

            bucket, _ = self.bucket_and_prefix
            config = TransferConfig(
                multipart_threshold=part_bytes + 1, multipart_chunksize=part_bytes, max_concurrency=1, use_threads=False
            )
            self._s3_client.upload_file(str(path), bucket, self._object_name(key), Config=config)
            return
        if self.protocol == "gs":
            blob = self._gcs_bucket.blob(self._object_name(key))
            if path.stat().st_size > part_bytes:
                # A resumable upload, in multiples of 256 KiB; a small object goes in one request.
                blob.chunk_size = max(1, part_bytes // (256 << 10)) * (256 << 10)
            blob.upload_from_filename(str(path))
            return
        with open(path, "rb") as file:
            self.fs.pipe_file(self._path(key), file.read())

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

    def control_store(self) -> ObjectStore:
        """Where the publisher's lease and progress records live: this store's `_internal/` area (an Icechunk
        store keeps them beside the repository)."""
        return self

    def zarr_store(self, read_only: bool = True) -> Any:
        """A zarr Store for xarray/zarr to open this location."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.url, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url,
            storage_options=storage_options_for(self.url, self.credentials_env_prefix),
            read_only=read_only,
        )

    def open_dataset(self, **kwargs: Any) -> Any:
        import xarray as xr

        return xr.open_zarr(self.zarr_store(), decode_timedelta=True, **kwargs)


def open_store(url: str | Path, credentials_env_prefix: str | None = None) -> ObjectStore:
    """The store at `url`: an Icechunk repository when the path ends in `.icechunk`, else a plain Zarr store;
    endpoint and credentials from `{credentials_env_prefix}AWS_*` where set, else the plain AWS_* variables."""
    from reformatters.common.icechunk_store import IcechunkStore, icechunk_storage, is_icechunk_url

    if is_icechunk_url(url):
        store = IcechunkStore(url, credentials_env_prefix=credentials_env_prefix)
        icechunk_storage(store.url, credentials_env_prefix)  # an unsupported location fails here, in one line
        return store
    return ObjectStore(url, credentials_env_prefix)
