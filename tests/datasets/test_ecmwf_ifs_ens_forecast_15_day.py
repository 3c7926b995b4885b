"""ecmwf-ifs-ens-forecast-15-day-0-25-degree against a generated ECMWF-layout archive served on loopback.

The kit's backfill runs a small variant (members 0, 1 and 50 on a 3 degree grid) over two inits, one each side of
IFS cycle 50r1: before it the control is read from the ensemble files (`enfo`/cf), from it on from the
deterministic files (`oper`/fc). The archive's `oper` files before the switch hold other values than the control
on purpose. Expected values come from ecCodes' own decode of the archive's messages.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import eccodes
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.dataset import EcmwfIfsEnsForecast15DayDataset
from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.region_job import (
    EcmwfIfsEnsRegionJob,
    EcmwfSourceFileCoord,
    stream_of,
)
from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.template_config import (
    CONTROL_IN_OPER_FROM,
    LEAD_HOURS,
    ecmwf_ifs_ens_template_config,
)

from reformatters.common.storage import ObjectStore
from reformatters.sources.ecmwf_index import EcmwfMessageKey
from reformatters.summary import RunSummary
from reformatters.template_config import template_differences, write_metadata
from reformatters.testing.archive_server import ArchiveServer
from reformatters.testing.dataset_kit import DatasetTestKit
from reformatters.testing.ecmwf_archive import (
    IFS_50R1_FIRST_INIT,
    EcmwfArchiveManifest,
    ecmwf_grid,
    generate_ecmwf_archive,
)
from reformatters.validation import RecentNaNsPerMember, ValidationContext

BEFORE = datetime(2026, 5, 11)  # 49r1: member 0 from enfo/cf
AFTER = datetime(2026, 5, 12)  # 50r1: member 0 from oper/fc
INITS = [BEFORE, AFTER]
MEMBERS = (0, 1, 50)
STEPS = [0, 3, 141, 144, 150, 360]
PARAMS = {"temperature_2m": "2t", "precipitation_surface": "tp"}
VARIABLES = tuple(PARAMS)
# The ensemble file of BEFORE at 144 h (every member, the control too) and AFTER's deterministic file at 150 h
# (the control only) are missing: NaN there, and in the rates whose previous step they are.
MISSING = [(BEFORE, "enfo", 144), (AFTER, "oper", 150)]
RESOLUTION = 3.0
SMALL_TEMPLATES = Path(tempfile.mkdtemp(prefix="ecmwf-small-templates-"))
SMALL_CONFIG = ecmwf_ifs_ens_template_config(
    ensemble_members=MEMBERS,
    resolution=RESOLUTION,
    chunks=(1, 85, 3, 31, 60),
    shards=(1, 85, 3, 62, 120),
    templates_dir=SMALL_TEMPLATES,
    append_dim_start="2026-05-11T00:00",
)
SMALL_DATASET = EcmwfIfsEnsForecast15DayDataset(template_config=SMALL_CONFIG)
LEADS = [int(h) for h in LEAD_HOURS]


def small_archive(
    inits: list[datetime], steps: list[int], missing: list[tuple[datetime, str, int]]
) -> EcmwfArchiveManifest:
    return generate_ecmwf_archive(
        inits,
        steps,
        members=MEMBERS,
        params=tuple(PARAMS.values()),
        grid=ecmwf_grid(RESOLUTION),
        missing=missing,  # type: ignore[arg-type]
        workers=2,
    )


@pytest.fixture(scope="module")
def archive() -> EcmwfArchiveManifest:
    return small_archive(INITS, STEPS, MISSING)


@pytest.fixture(scope="module")
def server(archive: EcmwfArchiveManifest) -> Iterator[ArchiveServer]:
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    with ArchiveServer(archive.root) as archive_server:
        yield archive_server


LIVE_INITS = [BEFORE, AFTER, datetime(2026, 5, 13)]


@pytest.fixture(scope="module")
def live_server() -> Iterator[ArchiveServer]:
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    with ArchiveServer(small_archive(LIVE_INITS, [0, 3], []).root) as archive_server:
        yield archive_server


def ecc_decode(message: bytes) -> npt.NDArray[np.float64]:
    handle = eccodes.codes_new_from_message(message)
    try:
        shape = (eccodes.codes_get(handle, "Nj"), eccodes.codes_get(handle, "Ni"))
        first_longitude = eccodes.codes_get(handle, "longitudeOfFirstGridPointInDegrees")
        values = np.asarray(eccodes.codes_get_values(handle), dtype=np.float64).reshape(shape)
    finally:
        eccodes.codes_release(handle)
    assert first_longitude % 360 == 180.0  # -180 as ECMWF publishes (GRIB2 stores 180): the dataset's columns
    return values


def source_field(
    archive: EcmwfArchiveManifest, name: str, init: datetime, member: int, step: int
) -> npt.NDArray[np.float64] | None:
    """ecCodes' decode of the message the dataset must read for (init, member, step), in dataset units before
    deaccumulation; None where the archive has no such file."""
    stream, kind = stream_of(pd.Timestamp(init), member)
    key = EcmwfMessageKey(PARAMS[name], "sfc", str(step), kind, None if kind == "fc" else member)
    message = archive.message(init, stream, step, key)
    if message is None:
        return None
    values = ecc_decode(message)
    return values - 273.15 if name == "temperature_2m" else values * 1000.0


def expected_dataset(archive: EcmwfArchiveManifest, name: str, inits: list[datetime]) -> npt.NDArray[np.float32]:
    n_lat, n_lon = round(180 / RESOLUTION) + 1, round(360 / RESOLUTION)
    expected = np.full((len(inits), len(LEADS), len(MEMBERS), n_lat, n_lon), np.nan)
    for i, init in enumerate(inits):
        for m, member in enumerate(MEMBERS):
            for j, lead in enumerate(LEADS):
                current = source_field(archive, name, init, member, lead)
                if current is None:
                    continue
                if name == "temperature_2m":
                    expected[i, j, m] = current
                    continue
                if j == 0:
                    continue  # a rate needs a previous lead
                previous = source_field(archive, name, init, member, LEADS[j - 1])
                if previous is None and LEADS[j - 1] != 0:
                    continue
                seconds = (lead - LEADS[j - 1]) * 3600.0
                expected[i, j, m] = np.maximum((current - (0.0 if previous is None else previous)) / seconds, 0.0)
    return expected.astype(np.float32)


class TestEcmwfIfsEns(DatasetTestKit):
    dataset = SMALL_DATASET
    backfill_end = "2026-05-13T00:00"
    backfill_variables = VARIABLES
    jobs_cover_end = "2026-06-01T00:00"
    live_store_end = "2026-05-14T00:00"
    live_store_variables = VARIABLES

    @pytest.fixture(autouse=True)
    def _archive(self, archive: EcmwfArchiveManifest, server: ArchiveServer) -> None:
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
        assert published[var_name].dims == ("init_time", "lead_time", "ensemble_member", "latitude", "longitude")
        assert published["ensemble_member"].values.tolist() == list(MEMBERS)
        return expected_dataset(self.archive, var_name, INITS)

    def absolute_tolerance(self, var_name: str) -> float:
        # Celsius near 0 carries float32's resolution of kelvin near 273 K; rates carry the float32 differences of
        # accumulations up to ~1000 kg m-2 over 3-6 hours.
        return {"temperature_2m": 1e-4, "precipitation_surface": 5e-8}[var_name]

    def check_summary(self, summary: RunSummary) -> None:
        for name in VARIABLES:
            entry = summary.variables[name]
            assert entry.files_failed == 0, (name, entry)
            # 79 leads absent from the archive x 3 members x 2 inits, plus BEFORE's 144 h (3 members) and AFTER's
            # control at 150 h.
            missing = (len(LEADS) - len(STEPS)) * len(MEMBERS) * len(INITS) + len(MEMBERS) + 1
            assert entry.files_not_found == missing, (name, entry.files_not_found, missing)
            assert entry.files_ok == len(LEADS) * len(MEMBERS) * len(INITS) - missing
        assert summary.published_append_dim_end == pd.Timestamp(AFTER).isoformat()

    def test_template_matches_code(self, tmp_path: Path) -> None:
        """The checked-in template of the published dataset (the kit's variant renders from the same code)."""
        config = EcmwfIfsEnsForecast15DayDataset().template_config
        differences = template_differences(config.template_path, config.update_template(templates_dir=tmp_path))
        assert not differences, f"run `reformatters update-template {config.dataset_id}`: {differences}"
        template = config.get_template("2024-02-03T00:00")
        assert dict(template.sizes) == {
            "init_time": 2,
            "lead_time": 85,
            "ensemble_member": 51,
            "latitude": 721,
            "longitude": 1440,
        }
        assert template["temperature_2m"].dims == ("init_time", "lead_time", "ensemble_member", "latitude", "longitude")
        assert template["precipitation_surface"].attrs["units"] == "kg m-2 s-1"
        assert template["temperature_2m"].encoding["shards"] == (1, 85, 51, 320, 320)
        assert template.longitude.values[0] == -180.0 and template.longitude.values[-1] == 179.75
        assert [int(h) for h in template.lead_time.values / np.timedelta64(1, "h")][48:51] == [144, 150, 156]

    def test_backfill_reads_back_as_the_source_says(self, tmp_path: Path) -> None:
        """The kit's backfill (every value against ecCodes' decode), then the must-show points one by one."""
        super().test_backfill_reads_back_as_the_source_says(tmp_path)
        store = tmp_path / "store.zarr"
        published = xr.open_zarr(store, decode_timedelta=True)
        assert published["ingested_forecast_length"].dims == ("init_time", "ensemble_member")
        assert (
            published["ingested_forecast_length"].values.tolist()
            == [[np.timedelta64(360, "h").astype("timedelta64[ns]")] * len(MEMBERS)] * 2
        )
        t2m = published["temperature_2m"]
        tp = published["precipitation_surface"]
        for init in INITS:
            for member in MEMBERS:
                for lead in (141, 150):  # a step each side of 144 h
                    actual = t2m.sel(init_time=init, ensemble_member=member, lead_time=pd.Timedelta(hours=lead)).values
                    decoded = source_field(self.archive, "temperature_2m", init, member, lead)
                    if (init, member, lead) == (AFTER, 0, 150):
                        assert decoded is None and np.isnan(actual).all()  # the control's file is missing
                        continue
                    assert decoded is not None
                    np.testing.assert_allclose(actual, decoded, rtol=2**-8, atol=1e-4, err_msg=f"{init} {member}")
        # Member 0 before 50r1 is the ensemble control, not the deterministic forecast the archive also holds.
        oper_before = ecc_decode(
            self.archive.message(BEFORE, "oper", 141, EcmwfMessageKey("2t", "sfc", "141", "fc"))  # type: ignore[arg-type]
        )
        control = t2m.sel(init_time=BEFORE, ensemble_member=0, lead_time=pd.Timedelta(hours=141)).values
        assert np.abs(control - (oper_before - 273.15)).max() > 0.5
        # Precipitation as a rate: (A(150) - A(144)) / 6 h in kg m-2 s-1 from metres, for each member of AFTER.
        for member in (1, 50):
            a150 = source_field(self.archive, "precipitation_surface", AFTER, member, 150)
            a144 = source_field(self.archive, "precipitation_surface", AFTER, member, 144)
            assert a150 is not None and a144 is not None
            rate = tp.sel(init_time=AFTER, ensemble_member=member, lead_time=pd.Timedelta(hours=150)).values
            np.testing.assert_allclose(rate, (a150 - a144) / 21600.0, rtol=2**-7, atol=5e-8)
            assert np.nanmax(rate) > 1e-5  # mm per hour, not metres per step
        # NaN where files are missing: all of BEFORE at 144 h and the rate after it; AFTER's control at 150 h.
        assert np.isnan(t2m.sel(init_time=BEFORE, lead_time=pd.Timedelta(hours=144)).values).all()
        assert np.isnan(tp.sel(init_time=BEFORE, lead_time=pd.Timedelta(hours=150)).values).all()
        assert np.isnan(tp.sel(init_time=AFTER, ensemble_member=0, lead_time=pd.Timedelta(hours=150)).values).all()
        assert not np.isnan(tp.sel(init_time=AFTER, ensemble_member=1, lead_time=pd.Timedelta(hours=150)).values).any()
        context = ValidationContext(
            ds=published[list(VARIABLES)],
            store=ObjectStore(store),
            now=pd.Timestamp(AFTER) + pd.Timedelta(hours=10),
            append_dim="init_time",
            append_dim_start=SMALL_CONFIG.append_dim_start,
            append_dim_frequency=SMALL_CONFIG.append_dim_frequency,
        )
        results = {r.name.split(" (")[0]: r for r in (v.check(context) for v in SMALL_DATASET.validators())}
        assert set(results) == {"current data", "ingested leads have data per member", "expected shards"}
        assert results["current data"].ok and results["expected shards"].ok, results
        # The archive holds 6 of the 85 leads: most ingested leads are NaN, and the check says so.
        assert not results["ingested leads have data per member"].ok, results


def test_member_0_switches_file_at_50r1() -> None:
    assert pd.Timestamp(IFS_50R1_FIRST_INIT) == CONTROL_IN_OPER_FROM
    before, after = pd.Timestamp("2026-05-11T00:00"), pd.Timestamp("2026-05-12T00:00")
    assert stream_of(before, 0) == ("enfo", "cf") and stream_of(after, 0) == ("oper", "fc")
    assert stream_of(before, 7) == stream_of(after, 7) == ("enfo", "pf")
    coord = EcmwfSourceFileCoord(
        source_url="https://ecmwf-forecasts.s3.eu-central-1.amazonaws.com/",
        init_time=after,
        lead_time=pd.Timedelta(hours=150),
        ensemble_member=0,
    )
    assert coord.get_url() == (
        "https://ecmwf-forecasts.s3.eu-central-1.amazonaws.com/20260512/00z/ifs/0p25/oper/20260512000000-150h-oper-fc.grib2"
    )
    assert coord.get_index_url().endswith("20260512000000-150h-oper-fc.index")
    var = SMALL_CONFIG.data_var("precipitation_surface")
    assert coord.message_key(var) == EcmwfMessageKey("tp", "sfc", "150", "fc", None)
    member = coord.model_copy(update={"ensemble_member": 50, "init_time": before})
    assert member.get_url().endswith("/20260511/00z/ifs/0p25/enfo/20260511000000-150h-enfo-ef.grib2")
    assert member.message_key(var) == EcmwfMessageKey("tp", "sfc", "150", "pf", 50)


def test_request_caps_name_the_ecmwf_hosts_and_the_jobs_root() -> None:
    template = SMALL_CONFIG.get_template("2026-05-12T00:00")
    job = EcmwfIfsEnsRegionJob.get_jobs(template, "init_time", SMALL_CONFIG.data_vars, source_url="http://127.0.0.1:9")[
        0
    ]
    assert job.source_request_caps() == {
        "127.0.0.1:9": 8,
        "data.ecmwf.int": 8,
        "ecmwf-forecasts.s3.eu-central-1.amazonaws.com": 8,
    }


def test_update_reprocesses_an_incomplete_newest_init_and_appends_newer(tmp_path: Path) -> None:
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    # The control's length alone decides: members 1 and 50 are complete in every case.
    for control_hours, first_region in ((360, 1), (240, 0), (None, 0)):
        store = tmp_path / f"published-{control_hours}.zarr"
        published = SMALL_CONFIG.get_template("2026-05-12T00:00")
        lengths = np.full((1, len(MEMBERS)), np.timedelta64(360, "h"), dtype="timedelta64[ns]")
        lengths[0, 0] = np.timedelta64("NaT") if control_hours is None else np.timedelta64(control_hours, "h")
        published = published.assign_coords(
            ingested_forecast_length=published["ingested_forecast_length"].copy(data=lengths)
        )
        write_metadata(published, store)
        template = SMALL_CONFIG.get_template("2026-05-14T00:00")
        jobs, updated = EcmwfIfsEnsRegionJob.operational_update_jobs(
            str(store), template, "init_time", SMALL_CONFIG.data_vars, "http://unused"
        )
        assert sorted({job.region.start for job in jobs}) == list(range(first_region, 3)), control_hours
        merged = {job.region.start for job in jobs if job.merge_published_store is not None}
        assert merged == ({0} if first_region == 0 else set()), control_hours
        # The published lengths carry into the update's template (its results only ever raise them).
        np.testing.assert_array_equal(updated["ingested_forecast_length"].values[0], lengths[0])
        assert np.isnat(updated["ingested_forecast_length"].values[1:]).all()
        if first_region == 0:
            # The re-ingested init asks only for the control's steps: from its last ingested one where it has one
            # (precipitation's rate at the next step needs that accumulation), every step where it has none.
            fetched = {
                (c.ensemble_member, c.lead_hours)
                for c in jobs[0].generate_source_file_coords(
                    updated.isel(init_time=slice(0, 1)), (SMALL_CONFIG.data_var("precipitation_surface"),)
                )
            }
            first = 0 if control_hours is None else control_hours
            assert fetched == {(0, lead) for lead in LEADS if lead >= first}, control_hours
            instant = {
                c.lead_hours
                for c in jobs[0].generate_source_file_coords(
                    updated.isel(init_time=slice(0, 1)), (SMALL_CONFIG.data_var("temperature_2m"),)
                )
            }
            assert min(instant) == (0 if control_hours is None else 246), control_hours


def test_variables_share_the_gfs_and_gefs_names_and_units() -> None:
    from reformatters_datasets.noaa.gefs.forecast_35_day.template_config import data_vars as gefs_vars
    from reformatters_datasets.noaa.gfs.forecast.template_config import DATA_VARS as GFS_VARS

    noaa = {v.name: v.attrs.units for v in (*GFS_VARS, *gefs_vars())}
    ours = {v.name: v.attrs.units for v in SMALL_CONFIG.data_vars}
    assert len(ours) == 11
    shared = {name: units for name, units in ours.items() if name in noaa}
    assert set(ours) - set(shared) == {"dew_point_temperature_2m"}  # neither NOAA dataset has it
    assert all(noaa[name] == units for name, units in shared.items()), shared


@pytest.mark.slow
def test_update_completes_an_init_the_backfill_found_incomplete(tmp_path: Path) -> None:
    """A backfill sees AFTER's steps to 144 h; later the source holds them to 360 h: the update re-ingests AFTER
    (its `ingested_forecast_length` was short) and publishes the late steps, the control from `oper`."""
    config = SMALL_CONFIG.model_copy(
        update={
            "data_vars": (SMALL_CONFIG.data_var("temperature_2m"),),
            "variant_templates_dir": tmp_path / "templates",
            "append_dim_start": pd.Timestamp(AFTER),
        }
    )
    config.update_template()
    dataset = EcmwfIfsEnsForecast15DayDataset(template_config=config)
    store = str(tmp_path / "ecmwf.zarr")
    early = generate_ecmwf_archive(
        [AFTER], [0, 144], members=MEMBERS, params=("2t",), grid=ecmwf_grid(RESOLUTION), workers=2
    )
    later = generate_ecmwf_archive(
        [AFTER], [0, 144, 360], members=MEMBERS, params=("2t",), grid=ecmwf_grid(RESOLUTION), workers=2
    )
    with ArchiveServer(early.root) as first:
        dataset.backfill(
            "2026-05-13T00:00", cluster="local", n_workers=2, store_url=store, source_url=first.url, show_progress=False
        )
    published = xr.open_zarr(store, decode_timedelta=True)
    assert published["ingested_forecast_length"].values.tolist() == [[np.timedelta64(144, "h").astype("m8[ns]")] * 3]
    with ArchiveServer(later.root) as second:
        dataset.update(store_url=store, source_url=second.url, now="2026-05-13T12:00", n_workers=2, show_progress=False)
    published = xr.open_zarr(store, decode_timedelta=True)
    assert published.sizes["init_time"] == 1
    assert published["ingested_forecast_length"].values.tolist() == [[np.timedelta64(360, "h").astype("m8[ns]")] * 3]
    for member in MEMBERS:
        for lead in (144, 360):
            expected = source_field(later, "temperature_2m", AFTER, member, lead)
            actual = published["temperature_2m"].sel(
                init_time=AFTER, ensemble_member=member, lead_time=pd.Timedelta(hours=lead)
            )
            assert expected is not None
            np.testing.assert_allclose(actual.values, expected, rtol=2**-8, atol=1e-4, err_msg=f"{member} {lead}")


def _store_objects(store: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(store)): path.read_bytes()
        for path in sorted(store.rglob("*"))
        if path.is_file() and not str(path.relative_to(store)).startswith("_internal")
    }


def test_scratch_path_store_is_the_in_memory_store(
    tmp_path: Path, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The published dataset's variable-regions take the scratch path: the same bytes as in memory, precipitation's
    deaccumulation (lead by lead for each member, on the memory-mapped region) included."""
    from reformatters.cluster import open_client
    from reformatters.region_job import RegionJobFilters

    with open_client("local", n_workers=2) as client:
        address = str(client.scheduler_info()["address"])

        def backfill(store: Path, scratch_dir: Path | None) -> RunSummary:
            return SMALL_DATASET.backfill(
                "2026-05-13T00:00",
                cluster=address,
                store_url=str(store),
                source_url=server.url,
                filters=RegionJobFilters.parse(variable_names=VARIABLES),
                show_progress=False,
                scratch_dir=None if scratch_dir is None else str(scratch_dir),
            )

        in_memory = backfill(tmp_path / "memory.zarr", None)
        monkeypatch.setattr(EcmwfIfsEnsRegionJob, "scratch_region_bytes", 0)
        through_scratch = backfill(tmp_path / "scratch.zarr", tmp_path / "scratch")
    memory_objects = _store_objects(tmp_path / "memory.zarr")
    scratch_objects = _store_objects(tmp_path / "scratch.zarr")
    assert sorted(scratch_objects) == sorted(memory_objects)
    for key, data in memory_objects.items():
        assert scratch_objects[key] == data, key
    for name in VARIABLES:
        assert through_scratch.variables[name].scratch_bytes > 0 and in_memory.variables[name].scratch_bytes == 0
        assert through_scratch.variables[name].files_ok == in_memory.variables[name].files_ok > 0


def _scratch_task_python_memory(members: int, source_url: str, tmp_path: Path) -> tuple[int, int, int, int]:
    """One variable-region of `members` members (every one of the 85 leads asked for) through the scratch task in
    this process, its arguments and its answer pickled as Dask ships them: (source files, peak Python bytes
    allocated while the task ran, pickled bytes of the coords it was handed, pickled bytes of its answer)."""
    import pickle
    import tracemalloc

    from reformatters.pipeline.graph import build_region_graph
    from reformatters.pipeline.scratch import scratch_variable_kernel
    from reformatters.pipeline.source_results import SourceFileResults
    from reformatters.publish import tmp_metadata_store, variable_metadata
    from reformatters.region_job import SourceFileStatus
    from reformatters.sources import ecmwf_index
    from reformatters.sources.download import INDEX_CACHE

    # Every measurement starts from empty inventory caches: indexes other tests left there would be evicted (and
    # the space counted) only in the larger run.
    INDEX_CACHE.clear()
    with ecmwf_index._parsed_lock:
        ecmwf_index._parsed.clear()
    config = ecmwf_ifs_ens_template_config(
        ensemble_members=tuple(range(members)),
        resolution=RESOLUTION,
        chunks=(1, 85, 51, 31, 60),  # the published member chunk: one 51-wide chunk whatever the member count
        shards=(1, 85, 51, 62, 120),
        templates_dir=tmp_path / "templates",
        append_dim_start=f"{AFTER:%Y-%m-%dT%H:%M}",
    )
    config.update_template()
    template = config.get_template("2026-05-13T00:00")
    var = config.data_var("temperature_2m")
    (job,) = EcmwfIfsEnsRegionJob.get_jobs(template, "init_time", [var], source_url=source_url)
    store = tmp_path / "store.zarr"
    write_metadata(job.template_ds, store)
    with tmp_metadata_store(job.template_ds) as metadata_store:
        metadata = variable_metadata(metadata_store, [var.name])
    (graph,) = build_region_graph(job, metadata, ObjectStore(store))
    tasks = dict(graph.__dask_graph__())
    (task,) = (t for key, t in tasks.items() if str(key).startswith("scratch-"))
    (coords,) = (arg for arg in task.args if isinstance(arg, list | SourceFileResults))
    assert isinstance(coords, SourceFileResults), "the graph hands a scratch task its coords packed"
    shipped = pickle.dumps(coords)
    worker_job = pickle.dumps(job.for_workers())
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = scratch_variable_kernel(
            pickle.loads(worker_job), var, pickle.loads(shipped), metadata[var.name], ObjectStore(store)
        )
        answer = pickle.dumps(result)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert result.count(SourceFileStatus.Succeeded) == 4 * members  # the archive's steps, every member
    return len(coords), peak, len(shipped), len(answer)


def test_scratch_task_holds_a_few_bytes_per_member_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker's scratch task holds for 51 members against 5, on the same archive and shard shape: the fields,
    the encoder's chunks and the downloads are the same size, only the per-file bookkeeping grows. A coord kept as
    an object (~1.3 KB) where the task holds it packed (~15 bytes) breaks the bound, as it did before the coords
    travelled packed; so do coords handed over as a list, or an answer of coord objects."""
    monkeypatch.setattr(EcmwfIfsEnsRegionJob, "scratch_region_bytes", 0)
    archive = generate_ecmwf_archive(
        [AFTER], [0, 3, 144, 360], members=range(51), params=("2t",), grid=ecmwf_grid(RESOLUTION), workers=2
    )
    with ArchiveServer(archive.root) as archive_server:
        _scratch_task_python_memory(5, archive_server.url, tmp_path / "warm")  # the process's caches filled first
        few = _scratch_task_python_memory(5, archive_server.url, tmp_path / "few")
        many = _scratch_task_python_memory(51, archive_server.url, tmp_path / "many")
    files_few, peak_few, _, _ = few
    files_many, peak_many, shipped_many, answer_many = many
    assert (files_few, files_many) == (5 * 85, 51 * 85)
    extra_files = files_many - files_few
    assert shipped_many < 40 * files_many and answer_many < 40 * files_many, (shipped_many, answer_many)
    assert (peak_many - peak_few) / extra_files < 500, (peak_few, peak_many, extra_files)


LATE_STEPS = [0, 3, 144, 150, 360]


@pytest.mark.parametrize(
    ("path", "late"),
    [
        ("memory", "*/oper/*"),
        pytest.param("scratch", "*/oper/*", marks=pytest.mark.slow),
        pytest.param("memory", "*/oper/*-150h-*", marks=pytest.mark.slow),
    ],
    ids=["memory-oper-absent", "scratch-oper-absent", "memory-oper-from-150h-late"],
)
def test_update_completes_a_control_whose_oper_files_came_late(
    tmp_path: Path, path: str, late: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 50r1 the control (member 0) is read from `oper`, members 1-50 from `enfo`. An update that finds `enfo`
    complete but `oper` absent (or stopping before 150 h) leaves the control NaN there and its
    `ingested_forecast_length` short; a later update, once `oper` is there, re-ingests that init: it fetches only
    the control's missing steps (and, for precipitation's rate, its last ingested one), fills the control and keeps
    members 1 and 50 byte for byte."""
    if path == "scratch":
        monkeypatch.setattr(EcmwfIfsEnsRegionJob, "scratch_region_bytes", 0)
    config = SMALL_CONFIG.model_copy(
        update={
            "variant_templates_dir": tmp_path / "templates",
            "data_vars": tuple(SMALL_CONFIG.data_var(name) for name in VARIABLES),
        }
    )
    config.update_template()
    dataset = EcmwfIfsEnsForecast15DayDataset(template_config=config)
    store = str(tmp_path / "ecmwf.zarr")
    archive = small_archive(INITS, LATE_STEPS, [])
    hours = np.timedelta64(1, "h").astype("m8[ns]")
    full = [360 * hours] * len(MEMBERS)
    with ArchiveServer(archive.root) as server:
        # A cluster per run, as each update is its own process: workers remember a missing index for a while.
        runs: dict[str, Any] = {"n_workers": 2, "store_url": store, "source_url": server.url, "show_progress": False}
        dataset.backfill("2026-05-12T00:00", cluster="local", **runs)  # BEFORE, complete: its control is in `enfo`
        if late != "*/oper/*":
            server.unpublish("*/oper/*-360h-*")
        server.unpublish(late)
        dataset.update(now="2026-05-12T12:00", **runs)
        first = xr.open_zarr(store, decode_timedelta=True)
        control_first = None if late == "*/oper/*" else 144 * hours
        assert first["ingested_forecast_length"].dims == ("init_time", "ensemble_member")
        assert first["ingested_forecast_length"].values.tolist() == [full, [control_first, *full[1:]]]
        before = {name: first[name].values.copy() for name in VARIABLES}
        # An update while the control's files are still late finds nothing new: the store stays as it is, and
        # that is no source outage (what is published is merged, not lost).
        published_objects = {
            p: p.read_bytes() for p in Path(store).rglob("*") if p.is_file() and "_internal" not in p.parts
        }
        dataset.update(now="2026-05-12T12:30", **runs)
        assert {p: p.read_bytes() for p in Path(store).rglob("*") if p.is_file() and "_internal" not in p.parts} == (
            published_objects
        )
        control_steps = [s for s in LATE_STEPS if late == "*/oper/*" or s >= 150]
        for name in VARIABLES:
            for step in control_steps:
                field = first[name].sel(init_time=AFTER, ensemble_member=0, lead_time=pd.Timedelta(hours=step))
                assert np.isnan(field.values).all(), (name, step)
        server.publish(late)
        server.publish("*/oper/*-360h-*")
        server.reset_counters()
        dataset.update(now="2026-05-12T13:00", **runs)
        requested = {rel for rel in server.requests if rel.startswith(f"{AFTER:%Y%m%d}/") and rel.endswith(".grib2")}
    published = xr.open_zarr(store, decode_timedelta=True)
    assert published.sizes["init_time"] == 2
    assert published["ingested_forecast_length"].values.tolist() == [full, full]
    # Only the control's files were fetched again: from 144 h (precipitation's previous accumulation) when it had
    # that step, all of them when it had none.
    refetched = LATE_STEPS if late == "*/oper/*" else [144, 150, 360]
    assert requested == {f"{archive_path(s)}" for s in refetched}, sorted(requested)
    for name in VARIABLES:
        actual = published[name].values
        np.testing.assert_array_equal(actual[0], before[name][0], err_msg=name)  # BEFORE untouched
        np.testing.assert_array_equal(actual[1, :, 1:], before[name][1, :, 1:], err_msg=name)  # members 1, 50
        expected = expected_dataset(archive, name, INITS)
        np.testing.assert_allclose(
            actual[1, :, 0], expected[1, :, 0], rtol=2**-7, atol=TestEcmwfIfsEns().absolute_tolerance(name)
        )
        assert not np.isnan(actual[1, LEADS.index(150), 0]).any(), name  # the control filled, rate included


def archive_path(step: int) -> str:
    return f"{AFTER:%Y%m%d}/00z/ifs/3/oper/{AFTER:%Y%m%d%H}0000-{step}h-oper-fc.grib2"


def test_recent_nans_are_judged_within_each_members_ingested_leads(tmp_path: Path) -> None:
    """The dataset's own per-member check reads `ingested_forecast_length` per (init, member): a control whose
    `oper` files stop at 144 h is not due past 144 h, while a perturbed member missing a field within its 360 h
    fails the check by name. Judged against one length per init (the longest any member reached), the short
    control would fail it."""
    SMALL_CONFIG.update_template(templates_dir=SMALL_TEMPLATES)
    template = SMALL_CONFIG.get_template("2026-05-13T00:00").sel(init_time=[pd.Timestamp(AFTER)])[list(VARIABLES)]
    control_leads = LEADS.index(144) + 1
    temperature = np.full(template["temperature_2m"].shape, 12.5, dtype=np.float32)
    temperature[:, control_leads:, 0] = np.nan
    precipitation = np.full(template["precipitation_surface"].shape, 1e-5, dtype=np.float32)
    precipitation[:, 0] = np.nan  # no rate at lead 0
    precipitation[:, control_leads:, 0] = np.nan
    lengths = np.full((1, len(MEMBERS)), np.timedelta64(360, "h"), dtype="timedelta64[ns]")
    lengths[0, 0] = np.timedelta64(144, "h")
    ds = template.assign(
        temperature_2m=template["temperature_2m"].copy(data=temperature),
        precipitation_surface=template["precipitation_surface"].copy(data=precipitation),
    ).assign_coords(ingested_forecast_length=template["ingested_forecast_length"].copy(data=lengths))
    (per_member,) = (v for v in SMALL_DATASET.validators() if isinstance(v, RecentNaNsPerMember))

    def check(dataset: xr.Dataset) -> tuple[bool, str]:
        context = ValidationContext(
            ds=dataset,
            store=ObjectStore(tmp_path),
            now=pd.Timestamp(AFTER) + pd.Timedelta(hours=10),
            append_dim="init_time",
            append_dim_start=SMALL_CONFIG.append_dim_start,
            append_dim_frequency=SMALL_CONFIG.append_dim_frequency,
        )
        result = per_member.check(context)
        return result.ok, result.message

    assert check(ds) == (True, "2 variables, worst 0.0% (member 0)")
    as_one_length = ds.assign_coords(
        ingested_forecast_length=ds["ingested_forecast_length"].copy(data=np.full_like(lengths, lengths.max()))
    )
    ok, message = check(as_one_length)
    assert not ok and "(member 0)" in message, message
    temperature[0, 1:6, 1] = np.nan  # member 1's fields at 3-15 h, within its ingested leads: 5 of 85
    ok, message = check(ds.assign(temperature_2m=ds["temperature_2m"].copy(data=temperature)))
    assert not ok and "temperature_2m 5.9% (member 1)" in message, message
