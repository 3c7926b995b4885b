"""noaa-hrrr-forecast-48-hour against a generated HRRR-layout archive (Lambert conformal GRIB2) served on loopback."""

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
from reformatters_datasets.noaa.hrrr.forecast_48_hour.dataset import HrrrForecast48HourDataset
from reformatters_datasets.noaa.hrrr.forecast_48_hour.region_job import step_text
from reformatters_datasets.noaa.hrrr.forecast_48_hour.template_config import (
    DATA_VARS,
    GRID,
    LEAD_HOURS,
    expected_forecast_length,
    latitude_longitude,
)
from reformatters_datasets.noaa.hrrr.forecast_48_hour.validators import IngestedLeadsHaveData

from reformatters.common.storage import ObjectStore
from reformatters.sources.grib_index import find_message, parse_ncep_idx
from reformatters.summary import RunSummary
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.dataset_kit import DatasetTestKit
from reformatters.testing.noaa_archive import HRRR_GRID, ArchiveManifest, generate_hrrr_archive
from reformatters.validation import ValidationContext

INIT = datetime(2018, 7, 13, 12)  # the dataset's first init (an HRRR v3 run: 36 h)
ARCHIVE_LEADS = [0, 1, 2, 4]  # 3 absent: NaN there
VARIABLES = (
    "temperature_2m",
    "precipitation_surface",
    "vertically_integrated_liquid_hydrometeor",  # `var discipline=0 ... parmcat=16 parm=201` in the inventory
    "geopotential_height_cloud_ceiling",  # bitmap-missing where there is no ceiling
)
BY_NAME = {v.name: v for v in DATA_VARS}
NY, NX = GRID.nj, GRID.ni
# Coordinates of a real HRRR CONUS file as decoded by a GRIB library (first grid point as encoded: facts of the
# source; extremes: the decoded longitudes span 225.90452026573686 .. 299.0828072281622 east and the latitudes
# reach 52.61565330680793 north).
SOUTH_WEST = (21.138123, 237.280472)
WESTMOST_LONGITUDE, EASTMOST_LONGITUDE, NORTHMOST_LATITUDE = 225.90452026573686, 299.0828072281622, 52.61565330680793


@pytest.fixture(scope="module")
def archive() -> ArchiveManifest:
    return generate_hrrr_archive([INIT], ARCHIVE_LEADS, variables=VARIABLES, filler_ratio=1.0, workers=2)


@pytest.fixture(scope="module")
def server(archive: ArchiveManifest) -> Iterator[ArchiveServer]:
    with ArchiveServer(archive.root) as archive_server:
        yield archive_server


LIVE_INITS = [INIT, datetime(2018, 7, 13, 18), datetime(2018, 7, 14, 0)]
LIVE_VARIABLES = ("temperature_2m", "precipitation_surface")


@pytest.fixture(scope="module")
def live_server() -> Iterator[ArchiveServer]:
    """Three inits, leads 0-1, for the kit's live-store checks (one region per init)."""
    live = generate_hrrr_archive(LIVE_INITS, [0, 1], variables=LIVE_VARIABLES, filler_ratio=1.0, workers=2)
    with ArchiveServer(live.root) as archive_server:
        yield archive_server


def message_bytes(archive: ArchiveManifest, init: datetime, lead: int, element: str, level: str, step: str) -> bytes:
    path = archive.path(init, lead)
    entry = find_message(parse_ncep_idx(Path(f"{path}.idx").read_text()), element, level, step)
    return path.read_bytes()[entry.start : entry.end]


def eccodes_values(message: bytes) -> npt.NDArray[np.float64]:
    """ecCodes' own decode, NaN where the bitmap says missing, in the file's order (south-west corner first)."""
    handle = eccodes.codes_new_from_message(message)
    try:
        values = eccodes.codes_get_values(handle).reshape(NY, NX)
        if eccodes.codes_get(handle, "bitmapPresent"):
            values[values == eccodes.codes_get(handle, "missingValue")] = np.nan
    finally:
        eccodes.codes_release(handle)
    return values


def decode_source(
    archive: ArchiveManifest, name: str, lead: int, init: datetime = INIT, step: str | None = None
) -> npt.NDArray[np.float64]:
    """What the dataset must publish for one lead: ecCodes' decode, rows north first, in the published units."""
    var = BY_NAME[name]
    step = step or step_text(var, lead)
    assert step is not None
    attrs = var.internal_attrs
    values = eccodes_values(message_bytes(archive, init, lead, attrs.grib_element, attrs.grib_level, step))[::-1]
    if attrs.kelvin_to_celsius:
        values = values - 273.15
    if attrs.deaccumulate_to_rate:
        values = values / 3600.0
    return values


def expected_hrrr(archive: ArchiveManifest, name: str) -> npt.NDArray[np.float32]:
    expected = np.full((1, len(LEAD_HOURS), NY, NX), np.nan, dtype=np.float32)
    for lead in ARCHIVE_LEADS:
        if step_text(BY_NAME[name], lead) is not None:
            expected[0, lead] = decode_source(archive, name, lead)
    return expected


class TestHrrrForecast48HourDataset(DatasetTestKit):
    dataset = HrrrForecast48HourDataset()
    backfill_end = "2018-07-13T18:00"
    backfill_variables = VARIABLES
    jobs_cover_end = "2018-07-20T00:00"
    live_store_end = "2018-07-14T06:00"
    live_store_variables = LIVE_VARIABLES

    @pytest.fixture(autouse=True)
    def _archive(self, archive: ArchiveManifest, server: ArchiveServer) -> None:
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

    @pytest.mark.slow
    def test_backfills_into_a_live_store_change_only_what_they_ran(self, tmp_path: Path) -> None:
        # Four backfills of the full 3 km grid; the example and GEFS run the same checks by default.
        super().test_backfills_into_a_live_store_change_only_what_they_ran(tmp_path)

    def expected_values(self, var_name: str, published: xr.Dataset) -> npt.NDArray[np.float32]:
        return expected_hrrr(self.archive, var_name)

    def absolute_tolerance(self, var_name: str) -> float:
        return {"precipitation_surface": 1e-9}.get(var_name, 0.0)

    def check_summary(self, summary: RunSummary) -> None:
        missing_leads = len(LEAD_HOURS) - len(ARCHIVE_LEADS)
        for name in VARIABLES:
            variable = summary.variables[name]
            assert variable.files_not_found == missing_leads, (name, variable)
            assert variable.files_failed == 0, (name, variable)
        archive_bytes = sum(f.size for f in self.archive.files)
        served = sum(self.server.bytes_sent.values())
        assert served < 0.6 * archive_bytes, (served, archive_bytes)  # byte ranges, not whole files
        assert summary.published_append_dim_end == pd.Timestamp(INIT).isoformat()

    @pytest.mark.slow
    def test_backfill_reads_back_as_the_source_says(self, tmp_path: Path) -> None:
        """The kit's backfill of four full-grid variables (over a minute on two shared cores); the default run
        backfills the same once (`published`) for the tests below, which check its structure and values."""
        super().test_backfill_reads_back_as_the_source_says(tmp_path)


@pytest.fixture(scope="module")
def published_store(server: ArchiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("hrrr") / "hrrr.zarr"
    dataset = HrrrForecast48HourDataset()
    dataset.backfill(
        "2018-07-13T18:00",
        cluster="local",
        n_workers=2,
        store_url=str(store),
        source_url=server.url,
        filters=TestHrrrForecast48HourDataset().kit_filters(),
        show_progress=False,
    )
    TestHrrrForecast48HourDataset().check_no_structure_drift(str(store))
    return store


@pytest.fixture(scope="module")
def published(published_store: Path) -> xr.Dataset:
    return xr.open_zarr(published_store, decode_timedelta=True)


def test_values_at_corners_centre_unnamed_parameter_and_masked_points(
    published: xr.Dataset, archive: ArchiveManifest
) -> None:
    """Published values are ecCodes' decode of the source messages (within the kept mantissa bits)."""
    lead = 4
    # (published row, column) -> (row, column) in the file, which scans from the south-west corner.
    points = {"south-west": (NY - 1, 0), "north-east": (0, NX - 1), "north-west": (0, 0), "centre": (NY // 2, NX // 2)}
    for name in ("temperature_2m", "vertically_integrated_liquid_hydrometeor", "precipitation_surface"):
        var = BY_NAME[name]
        raw = eccodes_values(
            message_bytes(
                archive,
                INIT,
                lead,
                var.internal_attrs.grib_element,
                var.internal_attrs.grib_level,
                str(step_text(var, lead)),
            )
        )
        bits = var.internal_attrs.keep_mantissa_bits
        assert isinstance(bits, int)
        for label, (row, col) in points.items():
            source = raw[NY - 1 - row, col]
            if name == "temperature_2m":
                source -= 273.15
            elif name == "precipitation_surface":
                source /= 3600.0
            actual = float(published[name].isel(init_time=0, lead_time=lead, y=row, x=col).values)
            assert actual == pytest.approx(source, rel=2.0 ** -(bits + 1) * 1.0001, abs=1e-12), (name, label)
    unnamed = published["vertically_integrated_liquid_hydrometeor"].isel(init_time=0, lead_time=lead).values
    assert np.nanmax(unnamed) > 1.0 and published["vertically_integrated_liquid_hydrometeor"].attrs["units"] == "kg m-2"

    ceiling = archive.path(INIT, lead)
    raw = eccodes_values(message_bytes(archive, INIT, lead, "HGT", "cloud ceiling", "4 hour fcst"))
    masked = np.argwhere(np.isnan(raw))
    assert 0 < len(masked) < raw.size, ceiling
    row, col = masked[len(masked) // 2]
    values = published["geopotential_height_cloud_ceiling"].isel(init_time=0, lead_time=lead).values
    assert np.isnan(values[NY - 1 - row, col])
    np.testing.assert_array_equal(np.isnan(values), np.isnan(raw[::-1]))


def test_precipitation_is_the_deaccumulated_hourly_rate(published: xr.Dataset, archive: ArchiveManifest) -> None:
    """Each lead's rate is the accumulation since the previous lead over its seconds: the hourly bucket HRRR
    publishes, which equals the difference of the run totals ecCodes decodes at this lead and the one before."""
    rate = published["precipitation_surface"].isel(init_time=0).values
    assert np.isnan(rate[0]).all()  # no hour ends at lead 0
    total_1 = decode_source(archive, "precipitation_surface", 1, step="0-1 hour acc fcst")
    total_2 = decode_source(archive, "precipitation_surface", 2, step="0-2 hour acc fcst")
    np.testing.assert_allclose(rate[1], total_1, rtol=2.0**-8, atol=1e-9)
    # Differences of separately packed totals carry one packing step of each (12 bits over the field's range).
    np.testing.assert_allclose(rate[2], total_2 - total_1, rtol=2.0**-8, atol=2e-6)
    assert float(np.nanmax(rate[2])) > 1e-4  # it rains somewhere: the comparison is not of zeros
    assert published["precipitation_surface"].attrs["units"] == "kg m-2 s-1"


def test_missing_files_are_nan_and_ingested_length_follows_the_files(published: xr.Dataset) -> None:
    for name in VARIABLES:
        values = published[name].isel(init_time=0)
        assert bool(values.isel(lead_time=3).isnull().all()), name
        assert bool(values.isel(lead_time=slice(5, None)).isnull().all()), name
        assert not bool(values.isel(lead_time=4).isnull().all()), name
    assert published["ingested_forecast_length"].values[0] == np.timedelta64(4, "h")
    assert published["expected_forecast_length"].values[0] == np.timedelta64(36, "h")  # an HRRR v3 run


def test_latitude_longitude_match_eccodes_and_the_published_hrrr_corners(archive: ArchiveManifest) -> None:
    assert GRID == HRRR_GRID
    handle = eccodes.codes_new_from_message(message_bytes(archive, INIT, 0, "TMP", "2 m above ground", "anl"))
    try:
        assert eccodes.codes_get(handle, "gridType") == "lambert"
        grib_lat = eccodes.codes_get_array(handle, "latitudes").reshape(NY, NX)[::-1]
        grib_lon = eccodes.codes_get_array(handle, "longitudes").reshape(NY, NX)[::-1]
    finally:
        eccodes.codes_release(handle)
    template = HrrrForecast48HourDataset().template_config.get_template("2018-07-14T00:00")
    lat, lon = template["latitude"].values, template["longitude"].values
    assert lat.shape == lon.shape == (NY, NX)
    assert np.abs(lat - grib_lat).max() < 1e-4
    assert np.abs((lon - grib_lon + 180.0) % 360.0 - 180.0).max() < 1e-4
    # The published grid: the first point as HRRR encodes it, the extremes of its decoded coordinates.
    assert lat[-1, 0] == pytest.approx(SOUTH_WEST[0], abs=1e-4)
    assert lon[-1, 0] % 360.0 == pytest.approx(SOUTH_WEST[1], abs=1e-4)
    assert lon.min() % 360.0 == pytest.approx(WESTMOST_LONGITUDE, abs=1e-4) == lon[0, 0] % 360.0
    assert lon.max() % 360.0 == pytest.approx(EASTMOST_LONGITUDE, abs=1e-4) == lon[0, -1] % 360.0
    assert lat.max() == pytest.approx(NORTHMOST_LATITUDE, abs=1e-4)
    # x/y are the projection's metres, 3 km apart, y north to south; pyproj-computed lat/lon agree with them.
    np.testing.assert_allclose(np.diff(template["x"].values), 3000.0)
    np.testing.assert_allclose(np.diff(template["y"].values), -3000.0)
    computed_lat, _ = latitude_longitude()
    np.testing.assert_allclose(lat, computed_lat, atol=1e-5)
    spatial_ref = template["spatial_ref"].attrs
    assert spatial_ref["grid_mapping_name"] == "lambert_conformal_conic"
    assert spatial_ref["longitude_of_central_meridian"] == -97.5 and spatial_ref["earth_radius"] == 6371229.0
    assert template["temperature_2m"].attrs["grid_mapping"] == "spatial_ref"


def test_expected_forecast_length_follows_each_eras_runs() -> None:
    inits = pd.to_datetime(["2018-07-13T12:00", "2020-12-02T06:00", "2020-12-02T12:00", "2025-01-01T00:00"])
    assert [pd.Timedelta(v) / pd.Timedelta(hours=1) for v in expected_forecast_length(inits)] == [36, 36, 48, 48]


def test_ingested_leads_validator_flags_the_missing_file(published: xr.Dataset, published_store: Path) -> None:
    """Lead 3 is missing within the ingested 0-4 h: a fifth of the due fields, over a 5 % threshold."""
    context = ValidationContext(
        ds=published[list(VARIABLES)],
        store=ObjectStore(published_store),
        now=pd.Timestamp(INIT) + pd.Timedelta(hours=2),
        append_dim="init_time",
        append_dim_start=pd.Timestamp(INIT),
        append_dim_frequency=pd.Timedelta(hours=6),
    )
    result = IngestedLeadsHaveData(threshold=0.05, positions=1).check(context)
    assert not result.ok
    assert (
        "temperature_2m 20.0%" in result.message and "vertically_integrated_liquid_hydrometeor 20.0%" in result.message
    )
    assert "precipitation_surface 25.0%" in result.message  # no rate at lead 0: leads 1-4 are due
    assert "geopotential_height_cloud_ceiling" not in result.message  # NaN is its data where there is no ceiling
    assert IngestedLeadsHaveData(threshold=0.25, positions=1).check(context).ok
