"""noaa-gefs-forecast-35-day against generated GEFS-layout archives served on loopback.

The kit's backfill runs a small variant of the dataset (members c00 and p30, the `s` files on a 1 degree grid and
the `a`/`b` files on a 2 degree one, a 1 degree output); one test reads the published 0.25/0.5 degree grids.
Expected values come from ecCodes' own decode of the archive's messages, resampled here from coordinates.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import eccodes
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.noaa.gefs.forecast_35_day.dataset import GefsForecast35DayDataset
from reformatters_datasets.noaa.gefs.forecast_35_day.region_job import (
    GefsForecast35DayRegionJob,
    GefsSourceFileCoord,
    product_at,
    requested_lead_hours,
    step_text,
)
from reformatters_datasets.noaa.gefs.forecast_35_day.template_config import (
    LEAD_HOURS,
    gefs_forecast_35_day_template_config,
)

from reformatters.cluster import open_client
from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJobFilters
from reformatters.sources.grib_decode import GridSpec
from reformatters.sources.grib_index import find_message, parse_ncep_idx
from reformatters.summary import RunSummary
from reformatters.template_config import template_differences
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.dataset_kit import DatasetTestKit
from reformatters.testing.gefs_archive import GefsArchiveManifest, generate_gefs_archive
from reformatters.validation import RecentNaNsPerMember, ValidationContext

INIT = datetime(2020, 10, 1, 0)
MEMBERS = (0, 30)
ARCHIVE_LEADS = [0, 3, 6, 9, 240, 246, 252]
VARIABLES = ("temperature_2m", "precipitation_surface", "categorical_rain_surface", "wind_u_100m")
# p30's 3 h `s` file and c00's 252 h `a` and `b` files are missing: NaN there, and p30's 6 h rate (its bucket
# began at 0); c00 is then ingested to 246 h, p30 to 252 h.
MISSING = [(INIT, 30, "s", 3), (INIT, 0, "a", 252), (INIT, 0, "b", 252)]
SMALL_RESOLUTION = 1.0
SMALL_TEMPLATES = Path(tempfile.mkdtemp(prefix="gefs-small-templates-"))
SMALL_CONFIG = gefs_forecast_35_day_template_config(
    ensemble_members=MEMBERS,
    resolution=SMALL_RESOLUTION,
    chunks=(1, 2, 64, 46, 90),
    shards=(1, 2, 192, 184, 360),
    templates_dir=SMALL_TEMPLATES,
)
SMALL_DATASET = GefsForecast35DayDataset(template_config=SMALL_CONFIG)
BY_NAME = {v.name: v for v in SMALL_CONFIG.data_vars}


@pytest.fixture(scope="module")
def archive() -> GefsArchiveManifest:
    return generate_gefs_archive(
        [INIT],
        MEMBERS,
        ARCHIVE_LEADS,
        variables=VARIABLES,
        fine_grid=GridSpec.global_regular(SMALL_RESOLUTION),
        coarse_grid=GridSpec.global_regular(2 * SMALL_RESOLUTION),
        missing=MISSING,
        workers=2,
    )


@pytest.fixture(scope="module")
def server(archive: GefsArchiveManifest) -> Iterator[ArchiveServer]:
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    with ArchiveServer(archive.root) as archive_server:
        yield archive_server


LIVE_INITS = [INIT, datetime(2020, 10, 2), datetime(2020, 10, 3)]
LIVE_VARIABLES = ("temperature_2m", "wind_u_100m")  # the `s` and the `b` products


@pytest.fixture(scope="module")
def live_server() -> Iterator[ArchiveServer]:
    """Three inits, leads 0 and 3, for the kit's live-store checks (one region per init)."""
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    live = generate_gefs_archive(
        LIVE_INITS,
        MEMBERS,
        [0, 3],
        variables=LIVE_VARIABLES,
        fine_grid=GridSpec.global_regular(SMALL_RESOLUTION),
        coarse_grid=GridSpec.global_regular(2 * SMALL_RESOLUTION),
        workers=2,
    )
    with ArchiveServer(live.root) as archive_server:
        yield archive_server


def decode(
    archive: GefsArchiveManifest, name: str, member: int, lead: int, init: datetime = INIT
) -> npt.NDArray[np.float64] | None:
    """ecCodes' decode of the message the dataset reads, on its own grid (longitudes 0..360); None if absent."""
    var = BY_NAME[name]
    product = product_at(var.internal_attrs.products, lead)
    path = archive.path(init, member, product, lead)
    step = step_text(var, lead)
    if step is None or not path.exists():
        return None
    entries = parse_ncep_idx(Path(f"{path}.idx").read_text())
    entry = find_message(entries, var.internal_attrs.grib_element, var.internal_attrs.grib_level, step)
    handle = eccodes.codes_new_from_message(path.read_bytes()[entry.start : entry.end])
    try:
        shape = (eccodes.codes_get(handle, "Nj"), eccodes.codes_get(handle, "Ni"))
        values = eccodes.codes_get_values(handle).reshape(shape)
    finally:
        eccodes.codes_release(handle)
    return values - 273.15 if var.internal_attrs.kelvin_to_celsius else values


def _axis_neighbours(
    source_first: float, source_step: float, size: int, target: npt.NDArray[np.float64], periodic: bool
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """The source points on either side of each target coordinate, and the distance fraction to the first one."""
    offset = (target - source_first) % 360.0 if periodic else target - source_first
    before = np.floor(offset / source_step + 1e-9).astype(np.intp)
    fraction = offset / source_step - before
    fraction[np.abs(fraction) < 1e-9] = 0.0
    after = (before + 1) % size if periodic else np.minimum(before + 1, size - 1)
    return before, after, fraction


def to_target_grid(field: npt.NDArray[np.float64], resolution: float, method: str) -> npt.NDArray[np.float64]:
    """Bilinear (four corners) or nearest (ties north and west) from a (lat 90..-90, lon 0..360) grid at twice
    `resolution` to the dataset's grid (lat 90..-90, lon -180..180), computed from the coordinates."""
    nj, ni = field.shape
    step = 360.0 / ni
    lat = np.linspace(90.0, -90.0, round(180 / resolution) + 1)
    lon = -180.0 + np.arange(round(360 / resolution)) * resolution
    north, south, t = _axis_neighbours(90.0, -step, nj, lat, periodic=False)
    west, east, u = _axis_neighbours(0.0, step, ni, lon, periodic=True)
    if method == "nearest":
        rows = np.where(t > 0.5, south, north)
        columns = np.where(u > 0.5, east, west)
        return field[np.ix_(rows, columns)]
    t, u = t[:, None], u[None, :]
    corners = [
        (north, west, (1 - t) * (1 - u)),
        (north, east, (1 - t) * u),
        (south, west, t * (1 - u)),
        (south, east, t * u),
    ]
    total = np.zeros((lat.size, lon.size))
    for rows, columns, weight in corners:
        contribution = weight * field[np.ix_(rows, columns)]
        total += np.where(weight == 0, 0.0, contribution)  # a zero weight ignores its corner, NaN or not
    return total


def on_dataset_grid(
    archive: GefsArchiveManifest, name: str, member: int, lead: int, resolution: float, init: datetime = INIT
) -> npt.NDArray[np.float64] | None:
    values = decode(archive, name, member, lead, init)
    if values is None:
        return None
    var = BY_NAME[name]
    if product_at(var.internal_attrs.products, lead) == "s":
        return np.roll(values, values.shape[1] // 2, axis=1)
    return to_target_grid(values, resolution, var.internal_attrs.resampling)


def expected_gefs(archive: GefsArchiveManifest, name: str) -> npt.NDArray[np.float32]:
    var = BY_NAME[name]
    n_lat, n_lon = round(180 / SMALL_RESOLUTION) + 1, round(360 / SMALL_RESOLUTION)
    expected = np.full((1, len(MEMBERS), len(LEAD_HOURS), n_lat, n_lon), np.nan)
    window = var.internal_attrs.window
    for m, member in enumerate(MEMBERS):
        for i, lead in enumerate(int(h) for h in LEAD_HOURS):
            current = on_dataset_grid(archive, name, member, lead, SMALL_RESOLUTION)
            if current is None:
                continue
            if window == "instant":
                expected[0, m, i] = current
                continue
            previous_lead = int(LEAD_HOURS[i - 1])
            start = ((lead - 1) // 6) * 6
            if previous_lead <= start:  # first step of a 6-hour bucket
                expected[0, m, i] = current / ((lead - previous_lead) * 3600.0) if window == "acc" else current
                continue
            previous = on_dataset_grid(archive, name, member, previous_lead, SMALL_RESOLUTION)
            if previous is None:
                continue
            if window == "acc":
                expected[0, m, i] = (current - previous) / ((lead - previous_lead) * 3600.0)
            else:
                expected[0, m, i] = (current * (lead - start) - previous * (previous_lead - start)) / (
                    lead - previous_lead
                )
    return expected.astype(np.float32)


class TestGefsForecast35Day(DatasetTestKit):
    dataset = SMALL_DATASET
    backfill_end = "2020-10-02T00:00"
    backfill_variables = VARIABLES
    jobs_cover_end = "2020-11-01T00:00"
    live_store_end = "2020-10-04T00:00"
    live_store_variables = LIVE_VARIABLES

    @pytest.fixture(autouse=True)
    def _archive(self, archive: GefsArchiveManifest, server: ArchiveServer) -> None:
        self.archive = archive
        self.server = server

    @pytest.fixture(autouse=True)
    def _live(self, request: pytest.FixtureRequest) -> None:
        if "live_store" in request.node.name:
            self._live_server = request.getfixturevalue("live_server")

    def make_source(self, root: Path) -> str:
        self.server.reset_counters()
        return self.server.url

    def make_live_store_source(self, root: Path) -> str:
        return str(self._live_server.url)

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        assert published[var_name].dims == SMALL_CONFIG.dims
        assert published["ensemble_member"].values.tolist() == list(MEMBERS)
        return expected_gefs(self.archive, var_name)

    def absolute_tolerance(self, var_name: str) -> float:
        # Rates are tiny numbers carrying the packing step of the accumulations they come from; float32 kelvin near
        # 273 K resolve 3e-5 K, so celsius near 0 carry that much absolutely, more once blended bilinearly.
        return {"precipitation_surface": 1e-6, "categorical_rain_surface": 1e-6, "temperature_2m": 1e-4}.get(
            var_name, 0.0
        )

    def check_summary(self, summary: RunSummary) -> None:
        files_per_member = len(LEAD_HOURS)
        for name in VARIABLES:
            entry = summary.variables[name]
            assert entry.files_failed == 0, (name, entry)
            missing = (len(LEAD_HOURS) - len(ARCHIVE_LEADS)) * len(MEMBERS)
            missing += 1 if name == "wind_u_100m" else 2  # c00's 252 h `b` file; p30's 3 h `s` and c00's 252 h `a`
            assert entry.files_not_found == missing, (name, entry.files_not_found, missing)
            assert entry.files_ok == files_per_member * len(MEMBERS) - missing
        assert summary.published_append_dim_end == pd.Timestamp(INIT).isoformat()

    def test_template_matches_code(self, tmp_path: Path) -> None:
        """The checked-in template of the published dataset (the kit's variant is rendered from the same code)."""
        config = GefsForecast35DayDataset().template_config
        differences = template_differences(config.template_path, config.update_template(templates_dir=tmp_path))
        assert not differences, f"run `reformatters update-template {config.dataset_id}`: {differences}"
        template = config.get_template("2020-10-03T00:00")
        assert dict(template.sizes) == {
            "init_time": 2,
            "ensemble_member": 31,
            "lead_time": 181,
            "latitude": 721,
            "longitude": 1440,
        }
        assert template["temperature_2m"].encoding["shards"] == (1, 31, 192, 374, 368)
        assert template["ingested_forecast_length"].dims == ("init_time", "ensemble_member")

    def test_backfill_reads_back_as_the_source_says(self, tmp_path: Path) -> None:
        """The kit's backfill, then what it published per member: `ingested_forecast_length`, and the validators."""
        super().test_backfill_reads_back_as_the_source_says(tmp_path)
        store = tmp_path / "store.zarr"
        published = xr.open_zarr(store, decode_timedelta=True)
        assert published["ingested_forecast_length"].values.tolist() == [
            [np.timedelta64(246, "h").astype("timedelta64[ns]"), np.timedelta64(252, "h").astype("timedelta64[ns]")]
        ]
        assert published["expected_forecast_length"].values[0] == np.timedelta64(840, "h")
        # The dataset's validators over the variables this backfill wrote (the others are all NaN by design).
        context = ValidationContext(
            ds=published[list(VARIABLES)],
            store=ObjectStore(store),
            now=pd.Timestamp(INIT) + pd.Timedelta(hours=6),
            append_dim="init_time",
            append_dim_start=SMALL_CONFIG.append_dim_start,
            append_dim_frequency=SMALL_CONFIG.append_dim_frequency,
        )
        results = {r.name.split(" (")[0]: r for r in (v.check(context) for v in SMALL_DATASET.validators())}
        assert set(results) == {"current data", "recent NaNs per member", "expected shards"}
        assert results["current data"].ok and results["expected shards"].ok, results
        assert results["expected shards"].message == f"all {len(VARIABLES)} shard objects present"
        # The archive holds 7 of the 60 leads to 246/252 h: most ingested leads are NaN, for both members.
        assert not results["recent NaNs per member"].ok, results


def test_extension_leads_only_for_inits_old_enough() -> None:
    leads = [int(h) for h in LEAD_HOURS]
    now = pd.Timestamp("2026-01-10T07:00")
    young = requested_lead_hours(leads, pd.Timestamp("2026-01-10T00:00"), now)
    assert max(young) == 384 and young == [h for h in leads if h <= 384]
    assert requested_lead_hours(leads, pd.Timestamp("2026-01-09T00:00"), now) == leads


def test_each_variable_reads_its_product() -> None:
    by_name = {v.name: v for v in gefs_forecast_35_day_template_config().data_vars}
    assert [product_at(by_name["temperature_2m"].internal_attrs.products, h) for h in (0, 240, 246)] == ["s", "s", "a"]
    assert [product_at(by_name["wind_gust_surface"].internal_attrs.products, h) for h in (3, 246)] == ["s", "b"]
    assert {product_at(by_name["wind_u_100m"].internal_attrs.products, h) for h in (0, 3, 840)} == {"b"}
    assert {product_at(by_name["geopotential_height_500hpa"].internal_attrs.products, h) for h in (0, 840)} == {"a"}
    coord = GefsSourceFileCoord(
        source_url="https://noaa-gefs-pds.s3.amazonaws.com",
        init_time=pd.Timestamp("2025-08-01T00:00"),
        ensemble_member=1,
        lead_time=pd.Timedelta(hours=15),
        product="s",
    )
    assert coord.get_url().endswith("gefs.20250801/00/atmos/pgrb2sp25/gep01.t00z.pgrb2s.0p25.f015")
    assert coord.out_loc() == {"init_time": coord.init_time, "ensemble_member": 1, "lead_time": coord.lead_time}


def test_reads_at_the_published_resolution(tmp_path: Path) -> None:
    """The published dataset's grids: 0.25 degree `s` fields as decoded (rolled to -180), 0.5 degree `a` fields
    bilinear and a categorical one by nearest neighbour, for members c00 and p30."""
    names = ("temperature_2m", "categorical_rain_surface")
    real = gefs_forecast_35_day_template_config()
    by_name = {v.name: v for v in real.data_vars}
    manifest = generate_gefs_archive([INIT], MEMBERS, [240, 246], variables=names, filler_ratio=0.0, workers=2)
    dataset = GefsForecast35DayDataset()
    template = real.get_template("2020-10-02T00:00")
    with ArchiveServer(manifest.root) as server:
        job = dataset.region_job_class.get_jobs(
            template, real.append_dim, real.data_vars, RegionJobFilters(variable_names=names), source_url=server.url
        )[0].for_workers()
        out = np.full((721, 1440), -1.0, dtype=np.float32)
        for member in MEMBERS:
            for lead in (240, 246):
                coord = GefsSourceFileCoord(
                    source_url=server.url,
                    init_time=pd.Timestamp(INIT),
                    ensemble_member=member,
                    lead_time=pd.Timedelta(hours=lead),
                    product=product_at("s+a", lead),
                )
                payload = job.download_file(coord, [by_name[n] for n in names])
                for name in names:
                    job.read_data_into(coord, by_name[name], payload, out)
                    var = by_name[name]
                    values = decode(manifest, name, member, lead)
                    assert values is not None
                    if lead == 240:
                        assert values.shape == (721, 1440)
                        expected = np.roll(values, 720, axis=1)
                    else:
                        assert values.shape == (361, 720)
                        expected = to_target_grid(values, 0.25, var.internal_attrs.resampling)
                    np.testing.assert_allclose(out, expected, rtol=5e-7, atol=1e-4, err_msg=f"{name} {member} {lead}")
                    if lead == 246 and not var.internal_attrs.kelvin_to_celsius:
                        # Points on the 0.5 degree grid keep their values (bit for bit: no unit conversion here).
                        np.testing.assert_array_equal(out[::2, 720::2], values[:, :360].astype(np.float32))


NEXT_INIT = datetime(2020, 10, 2, 0)


class PollingReader:
    """Opens the store again and again in a thread while an update runs, as a notebook user would, and checks each
    view: the inits visible never go down, nor any (init, member)'s visible `ingested_forecast_length`, and every
    lead up to it that the archive holds has temperature values (the previous init's published fields too)."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.opens = 0
        self.states_seen: list[tuple[int, list[list[int]]]] = []  # (inits, lengths per init and member)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PollingReader:
        self.check_once()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.check_once()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            time.sleep(0.05)

    def check_once(self) -> None:
        for attempt in range(2):
            try:
                self._check()
                return
            except (RuntimeError, ValueError) as error:  # a partial read across a shard replaced in between
                retryable = "blosc" in str(error) or "checksum" in str(error)
                if attempt or not retryable:
                    self.errors.append(f"{type(error).__name__}: {error}")
                    return
            except Exception as error:  # noqa: BLE001 - every failure is reported to the test
                self.errors.append(f"{type(error).__name__}: {error}")
                return

    def _check(self) -> None:
        ds = xr.open_zarr(self.store, decode_timedelta=True, chunks=None)  # no dask: the update has a Client
        inits = ds.sizes["init_time"]
        assert inits in (1, 2), ds.sizes
        lengths = [
            [-1 if np.isnat(v) else int(v / np.timedelta64(1, "h")) for v in row]
            for row in ds["ingested_forecast_length"].values
        ]
        values = ds["temperature_2m"].values
        leads = [int(h) for h in LEAD_HOURS]
        for i in range(inits):
            for m, member in enumerate(MEMBERS):
                for lead in [*ARCHIVE_LEADS, 258]:
                    absent = i == 0 and (member, lead) == (30, 3)  # missing from both archives
                    if lead <= lengths[i][m] and not absent:
                        assert not np.isnan(values[i, m, leads.index(lead)]).any(), (i, member, lead, lengths)
        state = (inits, lengths)
        if not self.states_seen or self.states_seen[-1] != state:
            if self.states_seen:
                old_inits, old_lengths = self.states_seen[-1]
                assert inits >= old_inits, (self.states_seen, state)
                for old_row, new_row in zip(old_lengths, lengths, strict=False):
                    assert all(new >= old for new, old in zip(new_row, old_row, strict=True)), (self.states_seen, state)
            self.states_seen.append(state)
        self.opens += 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ["memory", "scratch"])
def test_update_completes_the_previous_init_and_appends_the_next(
    archive: GefsArchiveManifest, tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill ingests what the source has (c00 to 246 h, its 252 h file missing; p30 to 252 h); later the source
    has 252 h for c00, 258 h for both, and the next day's init. The update re-ingests the published init, fetching
    only the leads past each member's `ingested_forecast_length` and keeping the published fields (merged, not
    fetched again), and appends the new init; a reader polling throughout sees only whole states. Through the
    scratch, the merge fills the fields the scratch file never held (holes) from the published ones."""
    if path == "scratch":
        monkeypatch.setattr(GefsForecast35DayRegionJob, "scratch_region_bytes", 0)
    config = gefs_forecast_35_day_template_config(
        ensemble_members=MEMBERS,
        resolution=SMALL_RESOLUTION,
        chunks=(1, 2, 64, 46, 90),
        shards=(1, 2, 192, 184, 360),
        templates_dir=tmp_path / "templates",
    )
    config = config.model_copy(update={"data_vars": (config.data_var("temperature_2m"),)})
    config.update_template()
    dataset = GefsForecast35DayDataset(template_config=config)
    store = str(tmp_path / "gefs.zarr")
    with ArchiveServer(archive.root) as first:
        dataset.backfill(
            "2020-10-02T00:00", cluster="local", n_workers=2, store_url=store, source_url=first.url, show_progress=False
        )
    later = generate_gefs_archive(
        [INIT, NEXT_INIT],
        MEMBERS,
        [*ARCHIVE_LEADS, 258],
        variables=("temperature_2m",),
        fine_grid=GridSpec.global_regular(SMALL_RESOLUTION),
        coarse_grid=GridSpec.global_regular(2 * SMALL_RESOLUTION),
        missing=[(INIT, 30, "s", 3)],
        workers=2,
    )
    jobs, template = dataset.region_job_class.operational_update_jobs(
        store, config.get_template("2020-10-03T00:00"), "init_time", config.data_vars, "http://unused"
    )
    assert [(job.region.start, job.merge_published_store is not None) for job in jobs] == [(0, True), (1, False)]
    fetched = {
        (c.ensemble_member, c.lead_hours)
        for c in jobs[0].generate_source_file_coords(template.isel(init_time=slice(0, 1)), config.data_vars)
    }
    assert min(h for m, h in fetched if m == 0) == 252 and min(h for m, h in fetched if m == 30) == 258
    reader = PollingReader(store)
    with ArchiveServer(later.root) as second, reader:
        summary = dataset.update(
            store_url=store, source_url=second.url, now="2020-10-02T07:00", n_workers=2, show_progress=False
        )
        requested = {rel for rel in second.requests if not rel.endswith(".idx")}
    assert (summary.variables["temperature_2m"].scratch_bytes > 0) == (path == "scratch")
    assert not reader.errors, reader.errors[:3]
    assert reader.opens >= 2, reader.opens
    assert reader.states_seen[0] == (1, [[246, 252]]), reader.states_seen
    assert reader.states_seen[-1] == (2, [[258, 258], [258, 258]]), reader.states_seen
    # The previous init: only the leads it lacked were fetched; the new init: every file the archive holds.
    previous = {rel for rel in requested if rel.startswith(f"gefs.{INIT:%Y%m%d}/")}
    assert previous and all(rel.endswith(("f252", "f258")) for rel in previous), sorted(previous)
    appended = {rel for rel in requested if rel.startswith(f"gefs.{NEXT_INIT:%Y%m%d}/")}
    assert len(appended) == len(MEMBERS) * (len(ARCHIVE_LEADS) + 1), sorted(appended)
    published = xr.open_zarr(store, decode_timedelta=True)
    assert published.sizes["init_time"] == 2
    assert (
        published["ingested_forecast_length"].values.tolist()
        == [[np.timedelta64(258, "h").astype("timedelta64[ns]")] * 2] * 2
    )
    actual = published["temperature_2m"].values
    leads = [int(h) for h in LEAD_HOURS]
    for i, init in enumerate((INIT, NEXT_INIT)):
        for m, member in enumerate(MEMBERS):
            for lead in [*ARCHIVE_LEADS, 258]:
                field = actual[i, m, leads.index(lead)]
                if (init, member, lead) == (INIT, 30, 3):
                    assert np.isnan(field).all()
                    continue
                expected = on_dataset_grid(later, "temperature_2m", member, lead, SMALL_RESOLUTION, init)
                assert expected is not None
                np.testing.assert_allclose(field, expected, rtol=0.004, atol=1e-4, err_msg=f"{init} {member} {lead}")


def test_recent_nans_are_judged_per_member(tmp_path: Path) -> None:
    """One member's missing field within its ingested leads fails the check and is named, whatever the others hold;
    leads past a member's ingested length and windowed variables at lead 0 are not due."""
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    template = SMALL_CONFIG.get_template("2020-10-02T00:00")[["temperature_2m", "precipitation_surface"]]
    shape = template["temperature_2m"].shape
    due = 4  # leads 0, 3, 6, 9 h
    temperature = np.full(shape, np.nan, dtype=np.float32)
    temperature[:, :, :due] = 12.5
    precipitation = np.full(shape, np.nan, dtype=np.float32)
    precipitation[:, :, 1:due] = 1e-5  # no rate at lead 0
    ingested = np.full((1, len(MEMBERS)), np.timedelta64(9, "h"), dtype="timedelta64[ns]")
    ds = template.assign(
        temperature_2m=template["temperature_2m"].copy(data=temperature),
        precipitation_surface=template["precipitation_surface"].copy(data=precipitation),
    ).assign_coords(ingested_forecast_length=(("init_time", "ensemble_member"), ingested))

    def check(dataset: xr.Dataset) -> tuple[bool, str]:
        context = ValidationContext(
            ds=dataset,
            store=ObjectStore(tmp_path),
            now=pd.Timestamp("2020-10-01T12:00"),
            append_dim="init_time",
            append_dim_start=SMALL_CONFIG.append_dim_start,
            append_dim_frequency=SMALL_CONFIG.append_dim_frequency,
        )
        result = RecentNaNsPerMember(threshold=0.05, positions=1).check(context)
        return result.ok, result.message

    assert check(ds) == (True, "2 variables, worst 0.0% (member 0)")
    temperature[0, 1, 2] = np.nan  # p30's 6 h field
    ok, message = check(ds.assign(temperature_2m=ds["temperature_2m"].copy(data=temperature)))
    assert not ok and "temperature_2m 25.0% (member 30)" in message, message


def test_update_jobs_append_after_a_complete_init_and_reingest_an_incomplete_one(tmp_path: Path) -> None:
    from reformatters.template_config import write_metadata

    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    job_class = SMALL_DATASET.region_job_class
    for ingested_hours, first_region, merged in ((840, 1, False), (384, 0, True)):
        store = tmp_path / f"published-{ingested_hours}.zarr"
        published = SMALL_CONFIG.get_template("2020-10-02T00:00")
        lengths = np.full((1, len(MEMBERS)), np.timedelta64(840, "h"), dtype="timedelta64[ns]")
        lengths[0, 1] = np.timedelta64(ingested_hours, "h")
        published = published.assign_coords(
            ingested_forecast_length=published["ingested_forecast_length"].copy(data=lengths)
        )
        write_metadata(published, store)
        template = SMALL_CONFIG.get_template("2020-10-04T00:00")
        jobs, updated = job_class.operational_update_jobs(
            str(store), template, "init_time", SMALL_CONFIG.data_vars, "http://unused"
        )
        starts = sorted({job.region.start for job in jobs})
        assert starts == list(range(first_region, 3)), (ingested_hours, starts)
        assert {job.region.start for job in jobs if job.merge_published_store is not None} == ({0} if merged else set())
        # The published lengths carry into the update's template (its results only ever raise them).
        assert updated["ingested_forecast_length"].values[0].tolist() == lengths[0].tolist()
        assert np.isnat(updated["ingested_forecast_length"].values[1:]).all()
        assert updated["ingested_forecast_length"].encoding == template["ingested_forecast_length"].encoding


# ---- the scratch path (reformatters.pipeline.scratch) ----


def _store_objects(store: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(store)): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and not str(path.relative_to(store)).startswith("_internal")
    }


def test_scratch_path_store_is_the_in_memory_store(
    tmp_path: Path, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both products, bilinear and nearest resampling, precipitation's rate transform: the same bytes."""
    scratch = tmp_path / "scratch"
    with open_client("local", n_workers=2) as client:
        address = str(client.scheduler_info()["address"])

        def backfill(store: Path, scratch_dir: Path | None) -> RunSummary:
            return SMALL_DATASET.backfill(
                "2020-10-02T00:00",
                cluster=address,
                store_url=str(store),
                source_url=server.url,
                filters=RegionJobFilters.parse(variable_names=VARIABLES),
                show_progress=False,
                scratch_dir=None if scratch_dir is None else str(scratch_dir),
            )

        in_memory = backfill(tmp_path / "memory.zarr", None)
        monkeypatch.setattr(GefsForecast35DayRegionJob, "scratch_region_bytes", 0)
        through_scratch = backfill(tmp_path / "scratch.zarr", scratch)
    memory_objects = _store_objects(tmp_path / "memory.zarr")
    scratch_objects = _store_objects(tmp_path / "scratch.zarr")
    assert sorted(scratch_objects) == sorted(memory_objects)
    for key, data in memory_objects.items():
        assert scratch_objects[key] == data, key
    assert list(scratch.iterdir()) == []
    # The scratch file is sparse: the fields read take disk, the rest of the region stays a hole, also for the
    # variables whose transform reads the region (precipitation's rate, the categorical type's average).
    region_bytes = len(MEMBERS) * 192 * 184 * 360 * 4
    for name in VARIABLES:
        memory_entry, scratch_entry = in_memory.variables[name], through_scratch.variables[name]
        assert scratch_entry.scratch_bytes > 0 and memory_entry.scratch_bytes == 0, name
        assert scratch_entry.scratch_bytes < region_bytes / 8, (name, scratch_entry.scratch_bytes, region_bytes)
        assert scratch_entry.files_ok == memory_entry.files_ok > 0, name
        # Each field read is decoded once: by the shard write in memory, by the scratch task otherwise.
        assert scratch_entry.decodes == scratch_entry.files_ok + scratch_entry.files_read_failed, name
        assert memory_entry.decodes == memory_entry.files_ok + memory_entry.files_read_failed, name


def test_scratch_task_memory_is_bounded_far_below_its_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.5 degree variable-region of 203 MB (shard-padded), 80 fields decoded into it: the scratch task's worker
    grows by less than a quarter of it in anonymous memory (RssAnon sampled inside the task)."""
    members = (0, 30)
    config = gefs_forecast_35_day_template_config(
        ensemble_members=members,
        resolution=0.5,
        chunks=(1, 2, 64, 46, 90),
        shards=(1, 2, 64, 92, 180),
        templates_dir=tmp_path / "templates",
    )
    config.update_template(templates_dir=tmp_path / "templates")
    dataset = GefsForecast35DayDataset(template_config=config)
    leads = list(range(0, 120, 3))
    archive = generate_gefs_archive(
        [INIT],
        members,
        leads,
        variables=("temperature_2m",),
        fine_grid=GridSpec.global_regular(0.5),
        coarse_grid=GridSpec.global_regular(1.0),
        products=("s",),
        workers=2,
    )
    region_bytes = len(members) * 192 * 368 * 720 * 4
    monkeypatch.setattr(GefsForecast35DayRegionJob, "scratch_region_bytes", 0)
    with ArchiveServer(archive.root) as archive_server:
        summary = dataset.backfill(
            "2020-10-02T00:00",
            cluster="local",
            n_workers=2,
            store_url=str(tmp_path / "store.zarr"),
            source_url=archive_server.url,
            filters=RegionJobFilters.parse(variable_names=["temperature_2m"]),
            show_progress=False,
            scratch_dir=str(tmp_path / "scratch"),
        )
    entry = summary.variables["temperature_2m"]
    fields = len(members) * len(leads)
    assert entry.files_ok == entry.decodes == fields
    assert entry.scratch_bytes >= fields * 361 * 720 * 4  # the decoded fields did go to the file
    assert 0 < entry.rss_anon_growth_bytes < region_bytes / 4, (entry.rss_anon_growth_bytes, region_bytes)
    published = xr.open_zarr(tmp_path / "store.zarr", decode_timedelta=True)["temperature_2m"]
    assert int(published.notnull().any(dim=("latitude", "longitude")).sum()) == fields
