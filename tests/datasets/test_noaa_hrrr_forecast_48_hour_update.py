"""The operational update of noaa-hrrr-forecast-48-hour completes the newest init while a reader polls."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.noaa.hrrr.forecast_48_hour.dataset import HrrrForecast48HourDataset
from reformatters_datasets.noaa.hrrr.forecast_48_hour.region_job import HrrrForecast48HourRegionJob

from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJobFilters
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.noaa_archive import generate_hrrr_archive, hrrr_expected_values

from .test_noaa_hrrr_forecast_48_hour import NX, NY

REPO = Path(__file__).resolve().parents[2]
T0, T1 = datetime(2024, 1, 1, 0), datetime(2024, 1, 1, 6)  # HRRR v4 runs: 48 h each
VARIABLES = ("temperature_2m",)
# At the backfill the 00z run is published to f10 and the 06z run not at all.
NOT_YET = ("*t00z.wrfsfcf1[1-9].grib2*", "*t00z.wrfsfcf[2-4][0-9].grib2*", "*t06z*")


@pytest.mark.slow
def test_update_completes_the_newest_init_while_a_reader_polls(tmp_path: Path) -> None:
    archive = generate_hrrr_archive(
        [T0, T1],
        range(49),
        variables=VARIABLES,
        filler_ratio=1.0,
        missing=[(T1, lead) for lead in range(3, 49)],  # the 06z run is still early when the update runs
        workers=2,
    )
    dataset = HrrrForecast48HourDataset().starting_at(pd.Timestamp(T0))
    config = dataset.template_config
    store = tmp_path / "hrrr.zarr"
    with ArchiveServer(archive.root) as server:
        for pattern in NOT_YET:
            server.unpublish(pattern)
        dataset.backfill(
            pd.Timestamp(T1),
            cluster="local",
            n_workers=2,
            store_url=str(store),
            source_url=server.url,
            filters=RegionJobFilters(variable_names=VARIABLES),
            show_progress=False,
        )
        before = xr.open_zarr(store, decode_timedelta=True)
        assert before.sizes["init_time"] == 1
        assert before["ingested_forecast_length"].values[0] == np.timedelta64(10, "h")
        assert bool(before.temperature_2m.isel(init_time=0, lead_time=slice(11, None)).isnull().all())

        # The incomplete newest init is reprocessed first.
        template = config.get_template(pd.Timestamp(T1) + pd.Timedelta(hours=6))
        jobs, _ = HrrrForecast48HourRegionJob.operational_update_jobs(
            ObjectStore(store), template, config.append_dim, config.data_vars, server.url
        )
        assert jobs[0].region.start == 0

        for pattern in NOT_YET:
            server.publish(pattern)
        stop_reader, reader_result = tmp_path / "stop-reader", tmp_path / "reader.json"
        reader_script = Path(__file__).with_name("noaa_hrrr_reader.py")
        reader = subprocess.Popen(
            [sys.executable, str(reader_script), str(store), str(reader_result), str(stop_reader)], cwd=REPO
        )
        try:
            dataset.update(
                cluster="local",
                store_url=str(store),
                source_url=server.url,
                now=pd.Timestamp(T1) + pd.Timedelta(hours=1),
                n_workers=2,
                show_progress=False,
            )
        finally:
            stop_reader.touch()
            reader.wait(timeout=120)

    after = xr.open_zarr(store, decode_timedelta=True)
    assert after.sizes["init_time"] == 2
    assert list(after["ingested_forecast_length"].values) == [np.timedelta64(48, "h"), np.timedelta64(2, "h")]
    row, col = NY // 3, NX // 3  # a published point (north first) and its place in the file (south first)
    source = hrrr_expected_values("temperature_2m", T0, 48)[NY - 1 - row, col] - 273.15
    assert float(after.temperature_2m.isel(init_time=0, lead_time=48, y=row, x=col)) == pytest.approx(
        source, rel=2.0**-8
    )
    assert not bool(after.temperature_2m.isel(init_time=0).isnull().any())

    result = json.loads(reader_result.read_text())
    assert result["errors"] == [], result["errors"]
    assert result["opens"] > 0
    assert result["extents"] == sorted(result["extents"]) and result["extents"][-1] == 2, result
    t0 = str(np.datetime64(T0, "ns"))
    # The reader saw the 00z run at 10 h and, at its last open, complete.
    assert result["ingested"][0][t0] == 10 and result["ingested"][-1][t0] == 48, result["ingested"]
    assert result["torn_reads"] <= 2, result

    # Once complete, the 00z run is left alone: the next update starts at the incomplete 06z run.
    template = config.get_template(pd.Timestamp(T1) + pd.Timedelta(hours=6))
    jobs, _ = HrrrForecast48HourRegionJob.operational_update_jobs(
        ObjectStore(store), template, config.append_dim, config.data_vars, None
    )
    assert jobs[0].region.start == 1
