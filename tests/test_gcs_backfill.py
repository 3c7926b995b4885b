"""The example backfill into fake-gcs-server (gcsfs and google-cloud-storage on 127.0.0.1), read back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.testing.object_store_server import GCSServer

pytest_plugins = ["tests.object_store_backends"]  # the gcs fixture

INITS = pd.date_range("2024-01-01", periods=4, freq="6h")


@pytest.mark.slow
def test_backfill_into_gcs_reads_back_as_the_source_says(gcs: GCSServer, example_source, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = example_source(INITS, missing=[(INITS[1], 3)], corrupt=[(INITS[2], 2)])
    store_url = gcs.url("gcs-backfill/example.zarr")
    with gcs.environment():
        summary = ExampleDataset().backfill(
            "2024-01-02", cluster="local", n_workers=2, store_url=store_url, source_url=src.url, show_progress=False
        )
        keys = ObjectStore(store_url).list()
        published = xr.open_zarr(ObjectStore(store_url).zarr_store(), decode_timedelta=True)
        src.check_published(published)
    assert set(gcs.list_keys("gcs-backfill/example.zarr/")) == {f"gcs-backfill/example.zarr/{k}" for k in keys}
    assert "zarr.json" in keys and [k for k in keys if k.startswith("temperature_2m/c/")]
    assert not Path("gs:").exists()
    src.check_summary(summary)
