"""noaa-gfs-forecast against a generated NOAA-layout archive served on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import eccodes
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.noaa.gfs.forecast.dataset import GfsForecastDataset
from reformatters_datasets.noaa.gfs.forecast.region_job import step_text
from reformatters_datasets.noaa.gfs.forecast.template_config import DATA_VARS, LEAD_HOURS

from reformatters.region_job import RegionJobFilters
from reformatters.sources.download import SourceFileNotFoundError
from reformatters.sources.grib_index import find_message, parse_ncep_idx
from reformatters.summary import RunSummary
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.dataset_kit import DatasetTestKit
from reformatters.testing.noaa_archive import ArchiveManifest, generate_gfs_archive

INIT = datetime(2021, 5, 1, 0)
ARCHIVE_LEADS = [0, 1, 2, 3, 6, 7, 8]  # 4 and 5 absent: NaN, and no rate at 6 (its window began at 0)
VARIABLES = (
    "temperature_2m",
    "precipitation_surface",
    "downward_short_wave_radiation_flux_surface",
    "maximum_temperature_2m",
)
BY_NAME = {v.name: v for v in DATA_VARS}


@pytest.fixture(scope="module")
def archive() -> ArchiveManifest:
    return generate_gfs_archive([INIT], ARCHIVE_LEADS, variables=VARIABLES, filler_ratio=3.0, workers=2)


@pytest.fixture(scope="module")
def server(archive: ArchiveManifest) -> Iterator[ArchiveServer]:
    with ArchiveServer(archive.root) as archive_server:
        yield archive_server


LIVE_INITS = [INIT, datetime(2021, 5, 1, 6), datetime(2021, 5, 1, 12)]
LIVE_VARIABLES = ("temperature_2m", "precipitation_surface")


@pytest.fixture(scope="module")
def live_server() -> Iterator[ArchiveServer]:
    """Three inits, leads 0-2, for the kit's live-store checks (one region per init)."""
    live = generate_gfs_archive(LIVE_INITS, [0, 1, 2], variables=LIVE_VARIABLES, filler_ratio=1.0, workers=2)
    with ArchiveServer(live.root) as archive_server:
        yield archive_server


def decode_source(archive: ArchiveManifest, name: str, lead: int) -> npt.NDArray[np.float64]:
    """ecCodes' own decode of the source message, rolled to -180..179.75 as the dataset publishes it."""
    var = BY_NAME[name]
    path = archive.path(INIT, lead)
    entries = parse_ncep_idx(Path(f"{path}.idx").read_text())
    step = step_text(var, lead)
    assert step is not None
    entry = find_message(entries, var.internal_attrs.grib_element, var.internal_attrs.grib_level, step)
    data = path.read_bytes()[entry.start : entry.end]
    handle = eccodes.codes_new_from_message(data)
    try:
        values = eccodes.codes_get_values(handle).reshape(721, 1440)
    finally:
        eccodes.codes_release(handle)
    values = np.roll(values, -720, axis=1)
    if var.internal_attrs.kelvin_to_celsius:
        values = values - 273.15
    return values


def expected_gfs(archive: ArchiveManifest, name: str) -> npt.NDArray[np.float32]:
    var = BY_NAME[name]
    expected = np.full((len(LEAD_HOURS), 721, 1440), np.nan, dtype=np.float64)
    window = var.internal_attrs.window
    for i, lead in enumerate(LEAD_HOURS):
        if lead not in ARCHIVE_LEADS or (window != "instant" and lead == 0):
            continue
        current = decode_source(archive, name, int(lead))
        if window in ("instant", "max", "min"):
            expected[i] = current
            continue
        previous_lead = int(LEAD_HOURS[i - 1])
        start = ((lead - 1) // 6) * 6
        if previous_lead <= start:  # first step of a 6-hour window
            expected[i] = current / 3600.0 / (lead - previous_lead) if window == "acc" else current
        elif previous_lead in ARCHIVE_LEADS:
            previous = decode_source(archive, name, previous_lead)
            if window == "acc":  # accumulation -> rate over (previous, lead]
                expected[i] = (current - previous) / ((lead - previous_lead) * 3600.0)
            else:  # window average -> average over the last step
                expected[i] = (current * (lead - start) - previous * (previous_lead - start)) / (lead - previous_lead)
    return expected[None].astype(np.float32)


class TestGfsForecastDataset(DatasetTestKit):
    dataset = GfsForecastDataset()
    backfill_end = "2021-05-01T06:00"
    backfill_variables = VARIABLES
    jobs_cover_end = "2021-06-01T00:00"
    live_store_end = "2021-05-01T18:00"
    live_store_variables = LIVE_VARIABLES

    @pytest.fixture(autouse=True)
    def _archive(self, archive: ArchiveManifest, server: ArchiveServer) -> None:
        self.archive = archive
        self.server = server

    def make_source(self, root: Path) -> str:
        self.server.reset_counters()
        return self.server.url

    def make_live_store_source(self, root: Path) -> str:
        return str(self._live_server.url)

    @pytest.fixture(autouse=True)
    def _live(self, request: pytest.FixtureRequest) -> None:
        if "live_store" in request.node.name:
            self._live_server = request.getfixturevalue("live_server")

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        return expected_gfs(self.archive, var_name)

    def absolute_tolerance(self, var_name: str) -> float:
        # Differences of packed accumulations carry the packing step; rates are tiny numbers.
        return {"precipitation_surface": 1e-6, "downward_short_wave_radiation_flux_surface": 0.05}.get(var_name, 0.0)

    def check_summary(self, summary: RunSummary) -> None:
        archive_bytes = sum(f.size for f in self.archive.files)
        served = sum(self.server.bytes_sent.values())
        # Only the needed messages (and the inventories) travel: a small fraction of the files.
        assert served < 0.4 * archive_bytes, (served, archive_bytes)
        missing_leads = len(LEAD_HOURS) - len(ARCHIVE_LEADS)
        for name in VARIABLES:
            assert summary.variables[name].files_not_found == missing_leads
            assert summary.variables[name].files_failed == 0
        # Each inventory is fetched once for all variables and both workers, published or not.
        inventories = {rel: n for rel, n in self.server.requests.items() if rel.endswith(".idx")}
        assert len(inventories) == len(LEAD_HOURS)
        assert set(inventories.values()) == {1}, sorted(inventories.items(), key=lambda item: -item[1])[:3]
        assert summary.published_append_dim_end == pd.Timestamp(INIT).isoformat()

    @pytest.mark.slow
    def test_backfills_into_a_live_store_change_only_what_they_ran(self, tmp_path: Path) -> None:
        # Four backfills of the full 0.25-degree grid: over a minute on two cores.
        super().test_backfills_into_a_live_store_change_only_what_they_ran(tmp_path)

    def test_ingested_forecast_length_after_backfill(self, tmp_path: Path) -> None:
        store = tmp_path / "gfs.zarr"
        self.dataset.backfill(
            self.backfill_end,
            cluster="local",
            n_workers=2,
            store_url=str(store),
            source_url=self.server.url,
            filters=self.kit_filters(("temperature_2m",)),
            show_progress=False,
        )
        published = xr.open_zarr(store, decode_timedelta=True)
        assert published["ingested_forecast_length"].values.tolist() == [
            pd.Timedelta(hours=max(ARCHIVE_LEADS)).to_timedelta64().astype("timedelta64[ns]")
        ]
        assert published["expected_forecast_length"].values[0] == np.timedelta64(384, "h")
        assert published.sizes["longitude"] == 1440 and float(published.longitude[0]) == -180.0


def test_windowed_variables_at_lead_zero_succeed_only_where_the_file_is_published(server: ArchiveServer) -> None:
    """Windowed variables have no lead-0 message, but their lead-0 status must still say whether the run exists:
    `ingested_forecast_length` and the trim of unpublished inits rely on it."""
    dataset = GfsForecastDataset()
    config = dataset.template_config
    template = config.get_template("2021-05-01T12:00")  # INIT (00z) is in the archive, 06z is not
    windowed = [v for v in config.data_vars if v.name == "precipitation_surface"]
    job = dataset.region_job_class.get_jobs(
        template,
        config.append_dim,
        config.data_vars,
        RegionJobFilters(variable_names=("precipitation_surface",)),
        source_url=server.url,
    )[0]
    coords = {
        (c.init_time, c.lead_hours): c
        for c in job.generate_source_file_coords(template.isel(init_time=slice(0, 2)), windowed)
    }
    assert job.download_file(coords[(pd.Timestamp(INIT), 0)], windowed) == {}
    with pytest.raises(SourceFileNotFoundError):
        job.download_file(coords[(pd.Timestamp(INIT) + pd.Timedelta(hours=6), 0)], windowed)


def test_read_data_and_read_data_into_give_the_published_field(server: ArchiveServer, archive: ArchiveManifest) -> None:
    """Read tasks use `read_data`, shard writes `read_data_into` a view of the padded buffer: the same values,
    converted (kelvin to celsius) and rolled as published, NaN where a windowed variable has no lead-0 message."""
    dataset = GfsForecastDataset()
    config = dataset.template_config
    template = config.get_template("2021-05-01T06:00")
    variables = [BY_NAME["temperature_2m"], BY_NAME["precipitation_surface"]]
    job = dataset.region_job_class.get_jobs(
        template, config.append_dim, config.data_vars, RegionJobFilters(variable_names=VARIABLES), source_url=server.url
    )[0]
    coords = {c.lead_hours: c for c in job.generate_source_file_coords(template, variables) if c.init_time == INIT}
    padded = np.full((2, 726, 1452), -1.0, dtype=np.float32)
    for lead in (0, 1):
        payload = job.download_file(coords[lead], variables)
        for var in variables:
            via_read_data = job.read_data(coords[lead], var, payload)
            job.read_data_into(coords[lead], var, payload, padded[1, :721, :1440])
            np.testing.assert_array_equal(padded[1, :721, :1440], via_read_data)
            assert (padded[0] == -1.0).all() and (padded[1, 721:] == -1.0).all() and (padded[1, :, 1440:] == -1.0).all()
            if step_text(var, lead) is None:
                assert np.isnan(via_read_data).all()
            else:
                np.testing.assert_allclose(via_read_data, decode_source(archive, var.name, lead), rtol=0, atol=1e-3)


def test_variables_submitted_one_at_a_time_share_the_inventories(server: ArchiveServer, tmp_path: Path) -> None:
    """The driver submits one variable-region at a time here: the second must not fetch the inventories again."""
    from collections import Counter

    from distributed import get_task_stream

    from reformatters.cluster import open_client
    from reformatters.common.storage import ObjectStore
    from reformatters.pipeline.driver import run_region_jobs
    from reformatters.publish import tmp_metadata_store, variable_metadata

    dataset = GfsForecastDataset()
    config = dataset.template_config
    names = ("temperature_2m", "maximum_temperature_2m")
    template_ds = config.get_template("2021-05-01T06:00")
    jobs = dataset.region_job_class.get_jobs(
        template_ds, config.append_dim, config.data_vars, RegionJobFilters(variable_names=names), source_url=server.url
    )
    assert len(jobs) == 1 and len(jobs[0].data_vars) == 2
    with tmp_metadata_store(template_ds) as tmp:
        metadata = variable_metadata(tmp, list(names))
    server.reset_counters()
    with open_client("local", n_workers=2) as client, get_task_stream(client) as stream:
        outcomes = run_region_jobs(
            client, jobs, metadata, ObjectStore(tmp_path / "gfs.zarr"), max_variables_in_flight=1
        )
    assert [r.var_name for r in outcomes[0].results] == list(names)
    index_runs = Counter(str(record["key"]) for record in stream.data if str(record["key"]).startswith("index-"))
    batches = -(-len(LEAD_HOURS) // jobs[0].download_batch_size)
    assert len(index_runs) == batches and set(index_runs.values()) == {1}, index_runs
    inventories = {rel: n for rel, n in server.requests.items() if rel.endswith(".idx")}
    assert len(inventories) == len(LEAD_HOURS)
    assert set(inventories.values()) == {1}, sorted(inventories.items(), key=lambda item: -item[1])[:3]


def test_malformed_inventories_fail_their_file_and_the_run_completes(archive: ArchiveManifest, tmp_path: Path) -> None:
    """Three leads' `.idx` answered 200 with an HTML page, cut mid-line, and not UTF-8: those files fail for every
    variable (the shared index task and each download both read them), the other leads are published."""
    mirror = tmp_path / "archive"
    for path in archive.root.rglob("*"):
        if path.is_file():
            target = mirror / path.relative_to(archive.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    bad = {1: "html", 2: "cut", 3: "not utf-8"}
    for lead, kind in bad.items():
        idx = next(mirror.rglob(f"gfs.t00z.pgrb2.0p25.f{lead:03d}.idx"))
        text = idx.read_text()
        idx.unlink()
        if kind == "html":
            data = b"<html><body><h1>Service temporarily unavailable</h1></body></html>\n"
        elif kind == "cut":
            line = next(line for line in text.splitlines(keepends=True) if ":TMP:2 m above ground:" in line)
            data = text[: text.index(line) + len(line) // 2].encode()
        else:
            data = text.encode().replace(b":TMP:", b":T\xffP:", 1)
        idx.write_bytes(data)
    store = tmp_path / "gfs.zarr"
    names = ("temperature_2m", "precipitation_surface")  # two variables: the inventories go through index tasks
    with ArchiveServer(mirror) as server:
        summary = GfsForecastDataset().backfill(
            "2021-05-01T06:00",
            cluster="local",
            n_workers=2,
            store_url=str(store),
            source_url=server.url,
            filters=RegionJobFilters(variable_names=names),
            show_progress=False,
        )
        assert all(server.statuses[(rel, 200)] for rel in server.requests if rel.endswith(("f001.idx", "f003.idx")))
    for name in names:
        entry = summary.variables[name]
        assert entry.files_download_failed == len(bad), entry
        assert entry.files_ok == len(ARCHIVE_LEADS) - len(bad)
        assert sum("GribIndexParseError" in line for line in entry.failures) == len(bad), entry.failures
    assert any("not UTF-8" in line for line in summary.variables[names[0]].failures)
    published = xr.open_zarr(store, decode_timedelta=True)
    temperature = published.temperature_2m.isel(init_time=0)
    for lead in bad:
        assert np.isnan(temperature.sel(lead_time=pd.Timedelta(hours=lead)).values).all()
    assert not np.isnan(temperature.sel(lead_time=pd.Timedelta(hours=6)).values).any()
    assert summary.published_append_dim_end == pd.Timestamp(INIT).isoformat()
