"""noaa-gefs-analysis against a generated GEFS-layout archive of c00 runs served on loopback.

A small variant of the dataset (four variables; the `s` files on a 1 degree grid, the `b` files on a 2 degree one;
8 steps per shard, so a day per region) runs the dataset kit, values are checked one by one against ecCodes' decode
of the archive (`test_noaa_gefs_forecast_35_day.on_dataset_grid`), and the padded processing region is checked on the
scratch path too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.noaa.gefs.analysis.dataset import GefsAnalysisDataset
from reformatters_datasets.noaa.gefs.analysis.region_job import (
    GefsAnalysisRegionJob,
    interpolate_single_gaps,
    source_run,
)
from reformatters_datasets.noaa.gefs.analysis.template_config import (
    CURRENT_ERA_START,
    GefsAnalysisTemplateConfig,
    gefs_analysis_template_config,
    is_categorical,
)

from reformatters.cluster import open_client
from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJobFilters, SourceFileStatus
from reformatters.sources.grib_decode import GridSpec
from reformatters.summary import RunSummary
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.dataset_kit import DatasetTestKit
from reformatters.testing.gefs_archive import GefsArchiveManifest, generate_gefs_archive

from .test_noaa_gefs_forecast_35_day import on_dataset_grid

RESOLUTION = 1.0
VARIABLES = ("temperature_2m", "precipitation_surface", "categorical_rain_surface", "wind_u_100m")
START = CURRENT_ERA_START.to_pydatetime()
INITS = [START - timedelta(hours=6) + timedelta(hours=6 * i) for i in range(11)]  # 2020-09-23T06 .. 09-25T18
END = "2020-09-26T00:00"  # 20 steps: regions of 8, 8 and 4
# Left out of the archive (init, product, lead):
MISSING = [
    # the first step of the second region: temperature there is its neighbours' mean, one from each region
    (datetime(2020, 9, 24, 12), "s", 0),
    # the windows' 12-18 h: precipitation at 09-24T18 interpolated, categorical rain left NaN
    (datetime(2020, 9, 24, 12), "s", 6),
    # 09-25T00 and 03 for temperature: two missing steps stay NaN
    (datetime(2020, 9, 25, 0), "s", 0),
    (datetime(2020, 9, 25, 0), "s", 3),
]
TEMPLATES = Path(tempfile.mkdtemp(prefix="gefs-analysis-templates-"))


def small_config(
    start: pd.Timestamp = CURRENT_ERA_START, templates_dir: Path = TEMPLATES
) -> GefsAnalysisTemplateConfig:
    """The test variant: the four variables, a 1 degree grid, 8 steps per shard."""
    full = gefs_analysis_template_config(
        resolution=RESOLUTION, chunks=(4, 46, 90), shards=(8, 184, 360), start=start, templates_dir=templates_dir
    )
    return full.model_copy(update={"data_vars": tuple(v for v in full.data_vars if v.name in VARIABLES)})


CONFIG = small_config()
DATASET = GefsAnalysisDataset(template_config=CONFIG)
BY_NAME = {v.name: v for v in CONFIG.data_vars}
HOUR = pd.Timedelta(hours=1)


@pytest.fixture(scope="module")
def archive() -> GefsArchiveManifest:
    return generate_gefs_archive(
        INITS,
        [0],
        [0, 3, 6],
        variables=VARIABLES,
        fine_grid=GridSpec.global_regular(RESOLUTION),
        coarse_grid=GridSpec.global_regular(2 * RESOLUTION),
        products=("s", "b"),
        missing=[(init, 0, product, lead) for init, product, lead in MISSING],
        workers=2,
    )


@pytest.fixture(scope="module")
def server(archive: GefsArchiveManifest) -> Iterator[ArchiveServer]:
    CONFIG.update_template(templates_dir=TEMPLATES)
    with ArchiveServer(archive.root) as archive_server:
        yield archive_server


def field(archive: GefsArchiveManifest, name: str, init: pd.Timestamp, lead: pd.Timedelta) -> npt.NDArray[np.float64]:
    """The archive's field of `name` at (init, lead) on the dataset's grid, NaN where the file is missing."""
    values = on_dataset_grid(archive, name, 0, int(lead / HOUR), RESOLUTION, init.to_pydatetime())
    n_lat, n_lon = round(180 / RESOLUTION) + 1, round(360 / RESOLUTION)
    return np.full((n_lat, n_lon), np.nan) if values is None else values


def expected_series(archive: GefsArchiveManifest, name: str, times: pd.DatetimeIndex) -> npt.NDArray[np.float32]:
    """Each time from the run and lead `source_run` names, windows turned into the last 3 hours' mean (a lead-6
    step from the same run's lead 3; the dataset's first step has none), then single gaps filled."""
    var = BY_NAME[name]
    window = var.internal_attrs.window
    series = []
    for position, time in enumerate(times):
        init, lead = source_run(time, window == "instant")
        current = field(archive, name, init, lead)
        if window != "instant":
            if lead == 6 * HOUR:
                previous = field(archive, name, init, 3 * HOUR) if position > 0 else np.full_like(current, np.nan)
                current = (current - previous) if window == "acc" else (current * 6 - previous * 3) / 3
            if window == "acc":
                current = current / (3 * 3600.0)
                current = np.where(current < -1e-5, np.nan, np.maximum(current, 0.0))
        series.append(current)
    values = np.stack(series).astype(np.float32)
    if not is_categorical(var):
        interpolate_single_gaps(values, np.ones(len(values), dtype=bool))
    return values


class TestGefsAnalysis(DatasetTestKit):
    dataset = DATASET
    backfill_end = END
    jobs_cover_end = "2021-12-01T00:00"
    live_store_end = END
    update_backfill_end = "2020-09-24T06:00"
    # An update as each run's first leads arrive (now: the newest time the template holds), the last one at the end.
    update_nows = ("2020-09-24T13:00", "2020-09-25T02:00", "2020-09-25T21:00")

    @pytest.fixture(autouse=True)
    def _archive(self, archive: GefsArchiveManifest, server: ArchiveServer) -> None:
        self.archive = archive
        self.server = server

    def make_source(self, root: Path) -> str:
        return self.server.url

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        assert published[var_name].dims == ("time", "latitude", "longitude")
        return expected_series(self.archive, var_name, published.get_index("time"))

    def absolute_tolerance(self, var_name: str) -> float:
        # Rates and window averages carry the packing step of the windows they come from; celsius near 0 the float32
        # resolution of kelvin near 273 K.
        return {"precipitation_surface": 1e-6, "categorical_rain_surface": 1e-6, "temperature_2m": 1e-4}.get(
            var_name, 0.0
        )

    def check_summary(self, summary: RunSummary) -> None:
        assert summary.published_append_dim_end == pd.Timestamp("2020-09-25T21:00").isoformat()
        assert summary.variables["temperature_2m"].files_not_found == 3
        assert summary.variables["wind_u_100m"].files_not_found == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One two-worker LocalCluster for this module's own backfills (each connects to it as a remote cluster)."""
    with open_client("local", n_workers=2) as client:
        yield str(client.scheduler_info()["address"])


def backfill(
    store: Path, server: ArchiveServer, cluster: str, dataset: GefsAnalysisDataset = DATASET, **filters: Any
) -> RunSummary:
    """A backfill up to END from the archive, on the module's cluster; `filters` as `RegionJobFilters` takes them."""
    return dataset.backfill(
        END,
        cluster=cluster,
        store_url=str(store),
        source_url=server.url,
        filters=RegionJobFilters(**filters),
        show_progress=False,
    )


@pytest.fixture(scope="module")
def published_store(server: ArchiveServer, cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("analysis") / "store.zarr"
    backfill(store, server, cluster)
    return store


@pytest.fixture(scope="module")
def published(published_store: Path) -> xr.Dataset:
    return xr.open_zarr(published_store).load()


def test_validators_pass_on_time_and_fail_late(published_store: Path) -> None:
    on_time = DATASET.run_validators(store_url=str(published_store), now=pd.Timestamp("2020-09-26T03:00"))
    assert on_time.ok, on_time.lines()
    late = DATASET.run_validators(store_url=str(published_store), now=pd.Timestamp("2020-09-26T12:00"))
    assert [r.name for r in late.results if not r.ok] == ["current data (max delay 0 days 09:00:00)"], late.lines()


def at(ds: xr.Dataset, name: str, time: str) -> npt.NDArray[np.float32]:
    return np.asarray(ds[name].sel(time=pd.Timestamp(time)).values)


def test_source_run_rule() -> None:
    t = pd.Timestamp
    assert source_run(t("2020-09-24T00:00"), True) == (t("2020-09-24T00:00"), 0 * HOUR)
    assert source_run(t("2020-09-24T03:00"), True) == (t("2020-09-24T00:00"), 3 * HOUR)
    # no lead-0 message: one run back
    assert source_run(t("2020-09-24T00:00"), False) == (t("2020-09-23T18:00"), 6 * HOUR)
    assert source_run(t("2020-09-24T03:00"), False) == (t("2020-09-24T00:00"), 3 * HOUR)


def test_values_by_value(published: xr.Dataset, archive: GefsArchiveManifest) -> None:
    t = pd.Timestamp
    close = {"rtol": 4e-3, "atol": 1e-4}  # 7 kept mantissa bits
    temperature = "temperature_2m"
    # lead 0 and lead 3 h of the 18z run; not the 12z run's lead 6 h, which the archive also holds
    at_18 = at(published, temperature, "2020-09-23T18:00")
    np.testing.assert_allclose(at_18, field(archive, temperature, t("2020-09-23T18"), 0 * HOUR), **close)
    assert not np.allclose(at_18, field(archive, temperature, t("2020-09-23T12"), 6 * HOUR), **close)
    np.testing.assert_allclose(
        at(published, temperature, "2020-09-23T21:00"),
        field(archive, temperature, t("2020-09-23T18"), 3 * HOUR),
        **close,
    )
    # the seam between the 18z and 00z runs: precipitation at 00z is the 18z run's 3-6 h, at 03z the 00z run's 0-3 h
    rate = "precipitation_surface"
    a3, a6 = (field(archive, rate, t("2020-09-23T18"), h * HOUR) for h in (3, 6))
    np.testing.assert_allclose(at(published, rate, "2020-09-24T00:00"), (a6 - a3) / 10800, rtol=4e-3, atol=1e-6)
    np.testing.assert_allclose(
        at(published, rate, "2020-09-24T03:00"),
        field(archive, rate, t("2020-09-24T00"), 3 * HOUR) / 10800,
        rtol=4e-3,
        atol=1e-6,
    )
    # the second region's first step (09-24T12): its rate differences the padded step before it (09-24T09)
    a3, a6 = (field(archive, rate, t("2020-09-24T06"), h * HOUR) for h in (3, 6))
    edge = at(published, rate, "2020-09-24T12:00")
    assert np.isfinite(edge).all() and edge.max() > 0
    np.testing.assert_allclose(edge, (a6 - a3) / 10800, rtol=4e-3, atol=1e-6)
    # ... and its temperature, missing at the source, is the mean of 09-24T09 (the first region) and 09-24T15
    before, after = (field(archive, temperature, t(init), 3 * HOUR) for init in ("2020-09-24T06", "2020-09-24T12"))
    np.testing.assert_allclose(at(published, temperature, "2020-09-24T12:00"), (before + after) / 2, **close)
    # one missing window step: precipitation interpolated, categorical rain (flag-like) left NaN beside its neighbours
    before, after = (field(archive, rate, t(init), 3 * HOUR) / 10800 for init in ("2020-09-24T12", "2020-09-24T18"))
    np.testing.assert_allclose(
        at(published, rate, "2020-09-24T18:00"),
        (before + after) / 2,
        rtol=4e-3,
        atol=1e-6,
    )
    flag = "categorical_rain_surface"
    assert np.isnan(at(published, flag, "2020-09-24T18:00")).all()
    assert np.isfinite(at(published, flag, "2020-09-24T15:00")).all()
    assert np.isfinite(at(published, flag, "2020-09-24T21:00")).all()
    # two missing steps stay NaN, their neighbours do not
    assert np.isnan(at(published, temperature, "2020-09-25T00:00")).all()
    assert np.isnan(at(published, temperature, "2020-09-25T03:00")).all()
    assert np.isfinite(at(published, temperature, "2020-09-24T21:00")).all()
    assert np.isfinite(at(published, temperature, "2020-09-25T06:00")).all()


def test_padding_is_read_never_written(server: ArchiveServer, cluster: str, tmp_path: Path) -> None:
    """The middle region alone: the steps of its padding are downloaded, reported for nobody and never stored."""
    store = tmp_path / "store.zarr"
    middle = "2020-09-24T12:00"
    backfill(store, server, cluster, contains=(pd.Timestamp(middle),), variable_names=("precipitation_surface",))
    ds = xr.open_zarr(store)
    values = ds["precipitation_surface"].values
    times = ds.get_index("time")
    inside = (times >= pd.Timestamp(middle)) & (times < pd.Timestamp("2020-09-25T12:00"))
    assert np.isnan(values[~inside]).all(), "the padding's steps were written"
    assert np.isfinite(values[times.get_loc(pd.Timestamp(middle))]).all(), "the first step lacks its padded neighbour"
    assert sorted(ObjectStore(store).list("precipitation_surface/c/")) == ["precipitation_surface/c/1/0/0"]


def test_padded_region_through_the_scratch_path(
    server: ArchiveServer, cluster: str, published: xr.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variable-region through a worker-local scratch file (sparse transform): the same values."""
    monkeypatch.setattr(GefsAnalysisRegionJob, "scratch_region_bytes", 0)  # decided on the driver
    store = tmp_path / "scratch.zarr"
    summary = backfill(store, server, cluster)
    assert all(entry.scratch_bytes > 0 for entry in summary.variables.values())
    scratch = xr.open_zarr(store).load()
    for name in VARIABLES:
        np.testing.assert_array_equal(scratch[name].values, published[name].values, err_msg=name)


def test_update_template_with_results_ends_where_every_variable_has_filled() -> None:
    template = CONFIG.get_template(END)
    job = GefsAnalysisRegionJob.get_jobs(template, "time", CONFIG.data_vars)[0]
    coords = {
        group[0].name: job.generate_source_file_coords(template.isel(time=slice(0, 4)), group)
        for group in job.source_groups(CONFIG.data_vars)
    }
    results = {name: [c.with_status(SourceFileStatus.Succeeded) for c in found] for name, found in coords.items()}
    # the instantaneous variables' last file is missing: the series ends a step earlier for all
    instant = next(name for name in results if BY_NAME[name].internal_attrs.window == "instant")
    results[instant][-1] = results[instant][-1].with_status(SourceFileStatus.DownloadFailed, not_found=True)
    trimmed = GefsAnalysisRegionJob.update_template_with_results(template, "time", results)
    assert trimmed.get_index("time")[-1] == template.get_index("time")[2]


def test_backfill_then_updates_through_the_scratch_path(
    archive: GefsArchiveManifest, server: ArchiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kit's backfill-then-updates check with every variable-region through the scratch path: the updates'
    regions start inside a published shard, so each is merged into it chunk by chunk."""
    monkeypatch.setattr(GefsAnalysisRegionJob, "scratch_region_bytes", 0)
    kit = TestGefsAnalysis()
    kit.archive, kit.server = archive, server
    kit.test_backfill_then_updates_equals_one_backfill(tmp_path)


def test_an_earlier_start_by_whole_shards_moves_the_shards_without_rewriting_them(
    server: ArchiveServer, cluster: str, published_store: Path, tmp_path: Path
) -> None:
    """An earlier era put in front by a whole shard (8 steps here, 2880 in the published dataset): the same structure,
    and each shard of the current era holds the same bytes one index further along `time` (an instantaneous variable,
    whose first step needs no earlier neighbour)."""
    shard = CONFIG.data_vars[0].encoding.shards[0]  # type: ignore[index]
    earlier_config = small_config(CURRENT_ERA_START - shard * CONFIG.append_dim_frequency, tmp_path / "templates")
    earlier_config.update_template()
    store = tmp_path / "earlier.zarr"
    name = "temperature_2m"
    backfill(store, server, cluster, GefsAnalysisDataset(template_config=earlier_config), variable_names=(name,))
    ours, theirs = ObjectStore(published_store), ObjectStore(store)
    keys = sorted(ours.list(f"{name}/c/"))
    assert keys
    for key in keys:
        index = int(key.split("/")[2])
        moved = f"{name}/c/{index + 1}/" + "/".join(key.split("/")[3:])
        assert theirs.get(moved) == ours.get(key), f"{key} changed when moved to {moved}"


def test_update_starts_at_the_last_published_step_and_ends_regions_on_shard_boundaries(published_store: Path) -> None:
    """20 steps published (to 09-25T21): the update re-processes the last (a single gap there is filled once its
    next neighbour exists) and appends, in regions that end where shards do."""
    published = xr.open_zarr(published_store)
    length = published.sizes["time"]
    template = CONFIG.get_template("2020-09-27T06:00")
    jobs, _ = GefsAnalysisRegionJob.operational_update_jobs(
        ObjectStore(published_store), template, "time", CONFIG.data_vars
    )
    regions = sorted({(job.region.start, job.region.stop) for job in jobs})
    assert length == 20 and regions == [(19, 24), (24, 30)]
    assert {v.name for job in jobs for v in job.data_vars} == set(VARIABLES)
