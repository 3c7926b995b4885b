"""The NOAA datasets' shared reading of `.idx` sources: NOMADS as the fallback for recent runs only."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pandas as pd
import pytest
from reformatters_datasets.noaa.gfs.forecast.region_job import GfsSourceFileCoord
from reformatters_datasets.noaa.idx_messages import NOMADS_RETENTION, fetch_with_nomads_fallback

from reformatters.common.time_utils import utc_now
from reformatters.sources.download import SourceFileNotFoundError
from reformatters.sources.grib_decode import GridSpec
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.noaa_archive import generate_gfs_archive

RECENT = pd.Timestamp(utc_now()).floor("6h") - pd.Timedelta(hours=6)
OLD = RECENT - NOMADS_RETENTION - pd.Timedelta(days=1)
WANTED = {"temperature_2m": ("TMP", "2 m above ground", "anl")}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArchiveServer, ArchiveServer]]:
    """An empty default source, and a NOMADS stand-in holding both runs (a coarse grid: only the routing matters)."""
    empty = tmp_path_factory.mktemp("bucket")
    inits = [datetime.fromisoformat(t.isoformat()) for t in (OLD, RECENT)]
    nomads = generate_gfs_archive(inits, [0], variables=["temperature_2m"], grid=GridSpec.global_regular(2.0))
    with ArchiveServer(empty) as bucket, ArchiveServer(nomads.root) as nomads_server:
        yield bucket, nomads_server


def coord(source: str, init: pd.Timestamp) -> GfsSourceFileCoord:
    return GfsSourceFileCoord(source_url=source, init_time=init, lead_time=pd.Timedelta(0))


def test_a_recent_run_missing_from_the_default_source_is_read_from_nomads(
    servers: tuple[ArchiveServer, ArchiveServer],
) -> None:
    bucket, nomads = servers
    messages = fetch_with_nomads_fallback(
        coord(bucket.url, RECENT), WANTED, nomads_url=nomads.url, source_url_given=False
    )
    assert messages["temperature_2m"].startswith(b"GRIB") and messages["temperature_2m"].endswith(b"7777")
    assert any(path.endswith(".idx") for path in nomads.requests), nomads.requests


@pytest.mark.parametrize(("init", "source_url_given"), [(OLD, False), (RECENT, True)])
def test_no_fallback_for_old_runs_or_a_source_the_user_chose(
    servers: tuple[ArchiveServer, ArchiveServer], init: pd.Timestamp, source_url_given: bool
) -> None:
    bucket, nomads = servers
    nomads.reset_counters()
    with pytest.raises(SourceFileNotFoundError):
        fetch_with_nomads_fallback(
            coord(bucket.url, init), WANTED, nomads_url=nomads.url, source_url_given=source_url_given
        )
    assert not nomads.requests
