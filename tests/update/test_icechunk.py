"""Icechunk stores: backfill and update into a local repository and one on the tests' S3 server hold exactly the
objects of the plain-Zarr store of the same run, one commit on `main` per region, records beside the repository."""

from __future__ import annotations

import json
from pathlib import Path

import icechunk
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.icechunk_store import IcechunkStore, is_icechunk_url
from reformatters.common.storage import ObjectStore, open_store
from reformatters.testing.icechunk_checks import differences_from_plain
from reformatters.testing.object_store_server import S3Server
from reformatters.update.lease import COMMITS_PREFIX, read_lease

from .conftest import BASE_END, NOW, UpdateFixture

DATASET = ExampleDataset()

# backfill [INITS[0], INITS[3]): two regions; the update: INITS[2..3] (merging into the half-full shard),
# INITS[4..5], INITS[6]
EXPECTED_MESSAGES = [
    "Repository initialized",
    "create the dataset's structure (no positions yet)",
    "publish backfill of example, region init_time-20240101T000000-20240101T060000",
    "publish backfill of example, region init_time-20240101T120000-20240101T120000",
    "publish region init_time-20240101T120000-20240101T180000",
    "publish region init_time-20240102T000000-20240102T060000",
    "publish region init_time-20240102T120000-20240102T120000",
]


def _backfill_and_update(store_url: str, source: Path) -> None:
    common = {"cluster": "local", "n_workers": 2, "store_url": store_url, "source_url": str(source)}
    DATASET.backfill(BASE_END, show_progress=False, **common)  # type: ignore[arg-type]
    DATASET.update(now=NOW, show_progress=False, **common)  # type: ignore[arg-type]


def _check_repository(url: str, update_fixture: UpdateFixture) -> None:
    store = open_store(url)
    assert isinstance(store, IcechunkStore)
    assert differences_from_plain(store, ObjectStore(update_fixture.reference_store)) == []
    messages = [snapshot.message for snapshot in store.repo.ancestry(branch="main")]
    assert messages[::-1] == EXPECTED_MESSAGES
    # Lease and commit records beside the repository, none inside it.
    control = store.control_store()
    assert control.url == store.url + ".reformatters"
    lease = read_lease(control)
    assert lease is not None and lease.released
    assert len(control.list(COMMITS_PREFIX)) == len(EXPECTED_MESSAGES) - 1
    assert not [k for k in store.list() if k.startswith("_internal")]
    # What a reader opens: a read-only session on main.
    session = icechunk.Repository.open(store.storage).readonly_session(branch="main")
    ds = xr.open_zarr(session.store, consolidated=False, decode_timedelta=True)
    reference = xr.open_zarr(update_fixture.reference_store, decode_timedelta=True)
    xr.testing.assert_identical(ds.load(), reference.load())


def test_is_icechunk_url() -> None:
    assert is_icechunk_url("s3://bucket/example/v0.1.0.icechunk")
    assert is_icechunk_url("data/x.icechunk/")
    assert not is_icechunk_url("data/x.zarr")


def test_local_icechunk_backfill_and_update_equal_the_plain_store(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    url = str(tmp_path / "example.icechunk")
    _backfill_and_update(url, update_fixture.source)
    _check_repository(url, update_fixture)
    # A second update with nothing new commits nothing.
    before = [s.id for s in open_store(url).repo.ancestry(branch="main")]  # type: ignore[attr-defined]
    DATASET.update(
        cluster="local", n_workers=2, store_url=url, source_url=str(update_fixture.source), now=NOW, show_progress=False
    )
    after = [s.id for s in open_store(url).repo.ancestry(branch="main")]  # type: ignore[attr-defined]
    assert len(after) == len(before) + 1, "the newest init is re-ingested: one commit for its region"


@pytest.mark.slow  # about 30 s: two runs against the S3 server
def test_s3_icechunk_backfill_and_update_equal_the_plain_store(update_fixture: UpdateFixture, s3: S3Server) -> None:
    url = s3.url("icechunk-equality/example.icechunk")
    with s3.environment():
        _backfill_and_update(url, update_fixture.source)
        _check_repository(url, update_fixture)
    keys = s3.list_keys("icechunk-equality/")
    assert any(k.startswith("icechunk-equality/example.icechunk/snapshots/") for k in keys)
    assert any(k.startswith("icechunk-equality/example.icechunk.reformatters/_internal/") for k in keys)


def test_gcs_icechunk_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="Icechunk stores on GCS are not supported"):
        open_store("gs://bucket/example/v0.1.0.icechunk")


def test_summary_counts_committed_regions(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    url = str(tmp_path / "summary.icechunk")
    summary = DATASET.backfill(
        BASE_END,
        cluster="local",
        n_workers=2,
        store_url=url,
        source_url=str(update_fixture.source),
        show_progress=False,
        summary_path=tmp_path / "summary.json",
    )
    assert summary.regions_done == summary.regions_total == 2
    assert json.loads((tmp_path / "summary.json").read_text())["store"] == str(Path(url).absolute())
    assert pd.Timestamp(summary.published_append_dim_end) == BASE_END - pd.Timedelta("6h")
