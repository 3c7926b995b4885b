"""The example backfill into a real S3 server (SeaweedFS, else moto), read back through s3fs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.region_job import ExampleRegionJob

from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJobFilters
from reformatters.testing.object_store_server import S3Server

INITS = pd.date_range("2024-01-01", periods=4, freq="6h")


@pytest.mark.parametrize("path", ["memory", "scratch"])
def test_backfill_into_s3_reads_back_as_the_source_says(  # type: ignore[no-untyped-def]
    s3: S3Server, example_source, tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also through the scratch path, whose shard files go up with `ObjectStore.put_file`."""
    if path == "scratch":
        monkeypatch.setattr(ExampleRegionJob, "scratch_region_bytes", 0)
    src = example_source(INITS, missing=[(INITS[1], 3), (INITS[3], 0)], corrupt=[(INITS[2], 2)])
    prefix = f"object-store-backfill-{path}/example.zarr"
    store_url = s3.url(prefix)
    with s3.environment():
        # Environment set before the LocalCluster starts: the worker processes inherit it.
        summary = ExampleDataset().backfill(
            "2024-01-02",
            cluster="local",
            n_workers=2,
            store_url=store_url,
            source_url=src.url,
            summary_path=tmp_path / "summary.json",
            show_progress=False,
        )
        keys = ObjectStore(store_url).list()

    # Everything went to the server, nothing to a local path of that name.
    assert not Path("s3:").exists() and not (tmp_path / "bucket").exists()
    assert set(s3.list_keys(f"{prefix}/")) == {f"{prefix}/{k}" for k in keys}
    assert all((entry.scratch_bytes > 0) == (path == "scratch") for entry in summary.variables.values())
    # Two regions x one shard per variable (shards are 2 init times long), plus metadata.
    assert [k for k in keys if k.startswith("temperature_2m/c/")] == [
        "temperature_2m/c/0/0/0/0",
        "temperature_2m/c/1/0/0/0",
    ]
    assert "zarr.json" in keys

    # Read back from the server the way a user would, credentials passed explicitly (not from the env).
    published = xr.open_zarr(store_url, storage_options=s3.storage_options(), decode_timedelta=True)
    src.check_published(published)
    src.check_summary(summary)
    assert summary.published_append_dim_end == INITS[-1].isoformat()
    machine = json.loads((tmp_path / "summary.json").read_text())
    # Per variable: two files not at the source (not failures), one corrupt file.
    assert machine["totals"]["files_not_found"] == 2 * 2
    assert machine["totals"]["files_failed"] == 2 * 1
    assert machine["totals"]["bytes_written"] > 0


def test_backfill_of_a_slice_into_a_live_s3_store_changes_nothing_it_had_no_reason_to(  # type: ignore[no-untyped-def]
    s3: S3Server, example_source
) -> None:
    """A backfill of the middle region into a published store on S3: no object outside `_internal/` is written
    again (same ETag, same modification time: same bytes are not uploaded), nothing published changes."""
    src = example_source(INITS.append(pd.date_range(INITS[-1] + pd.Timedelta("6h"), periods=2, freq="6h")))
    store_url = s3.url("live-slice/example.zarr")
    dataset = ExampleDataset()
    with s3.environment():
        common = {"cluster": "local", "n_workers": 2, "store_url": store_url, "source_url": src.url}
        dataset.backfill("2024-01-02T12:00", show_progress=False, **common)  # type: ignore[arg-type]

        def etags() -> dict[str, tuple[str, object]]:
            # The ETag of a rewrite with the same bytes stays; its modification time does not.
            client = s3.boto3_client()
            listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="live-slice/example.zarr/")["Contents"]
            return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed if "/_internal/" not in o["Key"]}

        before, published = etags(), ObjectStore(store_url).open_dataset().load()
        summary = dataset.backfill(
            "2024-01-02T12:00",
            filters=RegionJobFilters(contains=(INITS[2],)),
            show_progress=False,
            lease_wait_seconds=0,
            **common,  # type: ignore[arg-type]
        )
        after = ObjectStore(store_url).open_dataset().load()
        etags_after = etags()
    assert summary.regions_done == summary.regions_total == 1
    assert any("/c/" in key for key in before)
    assert etags_after == before
    xr.testing.assert_identical(after, published)


def test_objects_written_elsewhere_are_seen_after_a_listing(s3: S3Server) -> None:
    """A worker or another publisher writes while this process holds a listing: no stale answer."""
    with s3.environment():
        store = ObjectStore(s3.url("listing-cache/store.zarr"))
        store.put("temperature_2m/c/0/0/0/0", b"first")
        assert store.list("temperature_2m") == ["temperature_2m/c/0/0/0/0"]
        assert not store.exists("temperature_2m/c/1/0/0/0")
        # Written by another client, as a worker process would.
        s3.boto3_client().put_object(
            Bucket=s3.bucket, Key="listing-cache/store.zarr/temperature_2m/c/1/0/0/0", Body=b"second"
        )
        assert store.exists("temperature_2m/c/1/0/0/0")
        assert store.get("temperature_2m/c/1/0/0/0") == b"second"
        assert store.list("temperature_2m") == ["temperature_2m/c/0/0/0/0", "temperature_2m/c/1/0/0/0"]
        store.delete("temperature_2m/c/0/0/0/0")
        s3.boto3_client().delete_object(Bucket=s3.bucket, Key="listing-cache/store.zarr/temperature_2m/c/1/0/0/0")
        assert store.get("temperature_2m/c/1/0/0/0") is None
        assert store.list() == []


def test_credentials_from_a_shared_credentials_file_sign_writes(s3: S3Server, tmp_path: Path) -> None:
    """No AWS_ACCESS_KEY_ID in the environment, credentials in ~/.aws (or a role): writes must be signed."""
    if s3.kind != "seaweedfs":
        pytest.skip("moto accepts unsigned requests, so only SeaweedFS can tell signed from anonymous writes")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {s3.access_key_id}\naws_secret_access_key = {s3.secret_access_key}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_DEFAULT_REGION": s3.region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    code = (
        "import sys; from reformatters.common.storage import ObjectStore; "
        "store = ObjectStore(sys.argv[1]); store.put('probe', b'signed'); print(store.get('probe').decode())"
    )
    url = s3.url("shared-credentials/store.zarr")
    result = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "signed"
    assert s3.list_keys("shared-credentials/") == ["shared-credentials/store.zarr/probe"]
