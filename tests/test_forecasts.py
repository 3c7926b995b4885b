"""Helpers every forecast dataset shares: ingested forecast length from results, where an update starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from reformatters.forecasts import (
    first_init_to_update,
    leads_to_fetch,
    with_ingested_forecast_length,
    with_ingested_forecast_length_per_member,
)
from reformatters.region_job import EnsembleForecastSourceFileCoord, ForecastSourceFileCoord, SourceFileStatus
from reformatters.template_config import write_metadata

INITS = pd.date_range("2025-01-01", periods=4, freq="6h")
HOURS = np.timedelta64(1, "h").astype("timedelta64[ns]")


def forecast(n_inits: int, ingested_hours: list[float]) -> xr.Dataset:
    ingested = np.array([np.timedelta64("NaT") if np.isnan(h) else int(h) * HOURS for h in ingested_hours])
    return xr.Dataset(
        {"t": (("init_time",), np.zeros(n_inits, dtype="float32"))},
        coords={
            "init_time": INITS[:n_inits],
            "ingested_forecast_length": ("init_time", ingested.astype("timedelta64[ns]")),
            "expected_forecast_length": ("init_time", np.full(n_inits, 48 * HOURS, dtype="timedelta64[ns]")),
        },
    )


@pytest.mark.parametrize(
    ("published_ingested", "start"),
    [
        ([], 0),  # nothing published
        ([48, 48], 2),  # the newest run is complete: the next init
        ([48, 12], 1),  # its late leads are still to come: the newest again
        ([48, np.nan], 1),  # nothing of it ingested yet
    ],
)
def test_an_update_starts_at_the_newest_init_until_its_run_is_complete(
    published_ingested: list[float], start: int, tmp_path: Path
) -> None:
    store = tmp_path / "store.zarr"
    if published_ingested:
        write_metadata(forecast(len(published_ingested), published_ingested), store)
    assert first_init_to_update(store, forecast(4, [np.nan] * 4)) == start


def test_ingested_forecast_length_is_the_longest_lead_read_per_init() -> None:
    def coord(init: pd.Timestamp, hours: int, status: SourceFileStatus) -> ForecastSourceFileCoord:
        made = ForecastSourceFileCoord(source_url="/src", init_time=init, lead_time=pd.Timedelta(hours=hours))
        return made.with_status(status)

    results = {
        "t": [
            coord(INITS[1], 0, SourceFileStatus.Succeeded),
            coord(INITS[1], 6, SourceFileStatus.Succeeded),
            coord(INITS[1], 9, SourceFileStatus.DownloadFailed),  # not read: does not count
            coord(INITS[2], 3, SourceFileStatus.Succeeded),
        ]
    }
    ds = with_ingested_forecast_length(forecast(4, [48, np.nan, np.nan, np.nan]), results)
    hours = ds["ingested_forecast_length"].values / HOURS
    np.testing.assert_array_equal(hours[:3], [48, 6, 3])  # an init the results do not cover keeps its value
    assert np.isnat(ds["ingested_forecast_length"].values[3])


def ensemble(ingested_hours: list[list[float]]) -> xr.Dataset:
    """Two inits x three members (0, 1, 50) with `ingested_forecast_length` per (init, member)."""
    ingested = np.array(
        [[np.timedelta64("NaT") if np.isnan(h) else int(h) * HOURS for h in row] for row in ingested_hours]
    )
    return xr.Dataset(
        coords={
            "init_time": INITS[:2],
            "ensemble_member": [0, 1, 50],
            "ingested_forecast_length": (("init_time", "ensemble_member"), ingested.astype("timedelta64[ns]")),
        }
    )


def test_ingested_forecast_length_per_member_is_each_members_longest_lead_never_lowered() -> None:
    def coord(init: pd.Timestamp, member: int, hours: int, status: SourceFileStatus) -> EnsembleForecastSourceFileCoord:
        made = EnsembleForecastSourceFileCoord(
            source_url="/src", init_time=init, lead_time=pd.Timedelta(hours=hours), ensemble_member=member
        )
        return made.with_status(status)

    results = {
        "t": [
            coord(INITS[1], 0, 3, SourceFileStatus.Succeeded),
            coord(INITS[1], 0, 6, SourceFileStatus.DownloadFailed),  # not read: does not count
            coord(INITS[1], 1, 360, SourceFileStatus.Succeeded),
            coord(INITS[0], 50, 3, SourceFileStatus.Succeeded),  # below what is recorded: kept at 360
        ]
    }
    ds = with_ingested_forecast_length_per_member(ensemble([[360, 360, 360], [np.nan, np.nan, np.nan]]), results)
    values = ds["ingested_forecast_length"].values
    np.testing.assert_array_equal(values[0] / HOURS, [360, 360, 360])
    assert values[1, 0] / HOURS == 3 and values[1, 1] / HOURS == 360 and np.isnat(values[1, 2])


def test_leads_to_fetch_are_those_past_each_members_ingested_length_when_merging() -> None:
    leads = [0, 3, 6, 144, 150, 360]
    ds = ensemble([[144, 360, np.nan], [360, 360, 360]])
    init = INITS[0]
    assert leads_to_fetch(leads, ds, init, 0, merging=False) == leads
    assert leads_to_fetch(leads, ds, init, 0, merging=True) == [150, 360]
    # An accumulation since the start needs the last ingested step again to make the next one a rate.
    assert leads_to_fetch(leads, ds, init, 0, merging=True, keep_last_ingested=True) == [144, 150, 360]
    assert leads_to_fetch(leads, ds, init, 1, merging=True, keep_last_ingested=True) == []  # complete
    assert leads_to_fetch(leads, ds, init, 50, merging=True, keep_last_ingested=True) == leads  # nothing ingested
