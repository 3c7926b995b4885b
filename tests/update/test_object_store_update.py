"""The operational update, with its lease, fenced commits, progress records and upload gate, on S3 and GCS
servers: the published base copied into the bucket, updated there, gives the same objects as on local disk."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.testing.object_store_server import GCSServer, S3Server
from reformatters.update.lease import HOLDER_ENV, commit_records, read_lease
from reformatters.update.progress_tracker import PROGRESS_PREFIX

from .conftest import NOW, REPO, UpdateFixture, cli_env, store_objects, update_command

pytest_plugins = ["tests.object_store_backends"]  # the moto_s3 and gcs fixtures

DATASET = ExampleDataset()


# The GCS runs repeat the S3 ones against another backend: selected with `-m slow`.
@pytest.fixture(params=["s3", pytest.param("gcs", marks=pytest.mark.slow)])
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


def test_two_updates_and_a_backfill_started_together_readers_see_only_growth(
    server: S3Server | GCSServer, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """Two updates and a backfill of the same store start at once while a reader polls it: one publisher at a
    time (a second update stops with exit 3, the backfill waits for the lease), the reader never fails to open and
    sees the extent only grow, and the store ends as the sequential runs leave it (the reference update, which a
    backfill to the same end equals)."""
    store = ObjectStore(server.url(f"race-{uuid.uuid4().hex[:8]}/example.zarr"))
    for key, data in store_objects(update_fixture.base_store).items():
        store.put(key, data)
    reader_result, stop_reader = tmp_path / "reader.json", tmp_path / "stop-reader"
    reader = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reader.py")), store.url, str(reader_result), str(stop_reader)],
        env=cli_env(),
    )
    backfill = [
        *update_command(store.url, update_fixture.source)[:4],
        "backfill",
        "example",
        (NOW + pd.Timedelta("6h")).isoformat(),
        "--store",
        store.url,
        "--source-url",
        str(update_fixture.source),
        "--workers",
        "2",
        "--lease-wait",
        "600",
    ]
    commands = {
        "update-a": update_command(store.url, update_fixture.source),
        "update-b": update_command(store.url, update_fixture.source),
        "backfill": backfill,
    }
    try:
        runs = {
            name: subprocess.Popen(
                command,
                cwd=REPO,
                env=cli_env({HOLDER_ENV: name}),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, command in commands.items()
        }
        outputs = {name: run.communicate(timeout=600) for name, run in runs.items()}
    finally:
        stop_reader.touch()
        reader.wait(timeout=120)
    codes = {name: run.returncode for name, run in runs.items()}
    tails = {name: err[-2000:] for name, (_, err) in outputs.items()}
    assert codes["backfill"] == 0, tails  # a backfill waits for the lease instead of stopping
    assert set(codes.values()) <= {0, 3}, tails  # 3: another publisher held the lease
    for name, code in codes.items():
        if code == 3:
            assert "another publisher is writing to" in outputs[name][1], tails[name]
        assert "Traceback" not in outputs[name][1], tails[name]

    got = {key: store.get(key) for key in store.list() if not key.startswith("_internal")}
    want = store_objects(update_fixture.reference_store)
    assert sorted(got) == sorted(want)
    assert [key for key in want if got[key] != want[key]] == []

    result = json.loads(reader_result.read_text())
    assert result["errors"] == [], result["errors"]
    assert result["opens"] > 0 and result["extents"] == sorted(result["extents"]), result
    assert result["extents"][0] >= 3 and result["extents"][-1] == 7, result
    assert result["torn_reads"] <= 2, result  # a partial read racing a shard replacement (see reader.py)

    # Every holder that committed did so under a generation of its own, and later generations committed later.
    records = commit_records(store)
    holders_by_generation: dict[int, set[str]] = {}
    for record in records:
        holders_by_generation.setdefault(record.generation, set()).add(record.body["holder"])
    assert all(len(holders) == 1 for holders in holders_by_generation.values()), holders_by_generation
    assert {h for holders in holders_by_generation.values() for h in holders} <= set(commands)
    committed_at = [record.body["committed_at"] for record in records]
    assert committed_at == sorted(committed_at), [(r.generation, r.body["committed_at"]) for r in records]
