"""The operational update, with its lease, fenced commits, progress records and upload gate, on S3 and GCS
servers: the published base copied into the bucket, updated there, gives the same objects as on local disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.testing.object_store_server import GCSServer, S3Server
from reformatters.update.lease import commit_records, read_lease
from reformatters.update.progress_tracker import PROGRESS_PREFIX

from .conftest import NOW, UpdateFixture, store_objects

pytest_plugins = ["tests.object_store_backends"]  # the moto_s3 and gcs fixtures

DATASET = ExampleDataset()


@pytest.fixture(params=["s3", "gcs"])
def server(request: pytest.FixtureRequest) -> Iterator[S3Server | GCSServer]:
    server: S3Server | GCSServer = request.getfixturevalue("moto_s3" if request.param == "s3" else "gcs")
    with server.environment():
        yield server


@pytest.mark.slow
def test_update_on_an_object_store_equals_the_local_update(
    server: S3Server | GCSServer, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = ObjectStore(server.url("update/example.zarr"))
    for key, data in store_objects(update_fixture.base_store).items():
        store.put(key, data)
    DATASET.update(
        cluster="local",
        store_url=store.url,
        source_url=str(update_fixture.source),
        now=NOW,
        n_workers=2,
        show_progress=False,
    )
    want = store_objects(update_fixture.reference_store)
    got = {key: store.get(key) for key in store.list() if not key.startswith("_internal")}
    assert sorted(got) == sorted(want)
    assert [key for key in want if got[key] != want[key]] == []
    assert not store.list(PROGRESS_PREFIX)
    lease = read_lease(store)
    assert lease is not None and lease.released and lease.generation == 1
    records = commit_records(store)
    assert records and {r.generation for r in records} == {1} and all(r.body["key"] == "zarr.json" for r in records)
    assert records[-1].body["version"] == (store.get_with_version("zarr.json") or (b"", ""))[1]
