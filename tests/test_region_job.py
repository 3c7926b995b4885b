from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset
from reformatters_datasets.example.region_job import ExampleRegionJob

from reformatters.common.binary_rounding import round_float32_inplace
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.graph import build_region_graph, count_tasks
from reformatters.pipeline.kernels import (
    RegionBufferPool,
    choose_layout,
    download_kernel,
    encode_variable_kernel,
    read_kernel,
    region_buffer_shape,
    slabs_holding_data,
    upload_kernel,
)
from reformatters.pipeline.region_layout import RegionLayout
from reformatters.pipeline.shard_encoding import ShardEncoder
from reformatters.publish import metadata_keys, publish_from_tmp_store, tmp_metadata_store, variable_metadata
from reformatters.region_job import FieldShapeError, RegionJob, RegionJobFilters, SourceFileStatus

DATASET = ExampleDataset()
CONFIG = DATASET.template_config


def jobs_for(filters: RegionJobFilters, end: str = "2024-01-04T00:00") -> list[ExampleRegionJob]:
    template = CONFIG.get_template(end)
    return ExampleRegionJob.get_jobs(template, "init_time", CONFIG.data_vars, filters)


def starts(jobs: list[ExampleRegionJob]) -> list[str]:
    return sorted({f"{job.template_ds.init_time.values[job.region.start]}"[:13] for job in jobs})


def test_filters_select_whole_shard_aligned_regions() -> None:
    # 12 init times, shards of 2: regions start at 00z and 12z.
    assert len(jobs_for(RegionJobFilters())) == 6
    # 2024-01-01T06 lies inside the region [00z, 06z]: the whole region is processed.
    selected = jobs_for(RegionJobFilters.parse(start="2024-01-01T06:00", end="2024-01-02T00:00"))
    assert starts(selected) == ["2024-01-01T00", "2024-01-01T12"]
    assert all(job.region.stop - job.region.start == 2 for job in selected)
    contains = jobs_for(RegionJobFilters.parse(contains=["2024-01-02T18:00Z"]))
    assert starts(contains) == ["2024-01-02T12"]


def test_variable_filter_and_cap_on_variables_per_job() -> None:
    only_temperature = jobs_for(RegionJobFilters.parse(variable_names=["temperature_2m"]))
    assert {tuple(v.name for v in j.data_vars) for j in only_temperature} == {("temperature_2m",)}
    with pytest.raises(ValueError, match=r"unknown variable.*choose from"):
        jobs_for(RegionJobFilters.parse(variable_names=["temperature_3m"]))

    class OneVariablePerJob(ExampleRegionJob):
        max_vars_per_job = 1

    template = CONFIG.get_template("2024-01-02T00:00")
    jobs = OneVariablePerJob.get_jobs(template, "init_time", CONFIG.data_vars)
    assert len(jobs) == 2 * len(CONFIG.data_vars)
    assert all(len(job.data_vars) == 1 for job in jobs)


def test_worker_copy_carries_only_the_processing_region() -> None:
    job = jobs_for(RegionJobFilters())[1]
    small = job.for_workers()
    assert small.template_ds.sizes["init_time"] == 2
    assert small.template_ds.init_time.values[0] == job.template_ds.init_time.values[job.region.start]


class PaddedExampleJob(ExampleRegionJob):
    """Pads its region by one position each side, clamped to the template: a hook that reads the template's length."""

    def get_processing_region(self) -> slice:
        length = self.template_ds.sizes[self.append_dim]
        return slice(max(0, self.region.start - 1), min(length, self.region.stop + 1))


class CuttingExampleJob(ExampleRegionJob):
    def get_processing_region(self) -> slice:
        return slice(self.region.start + 1, self.region.stop)


def test_worker_copy_keeps_the_padded_processing_region_the_hook_gave_on_the_whole_template() -> None:
    template = CONFIG.get_template("2024-01-04T00:00")
    job = PaddedExampleJob.get_jobs(template, "init_time", CONFIG.data_vars)[1]
    small = job.for_workers()
    assert small.processing_region() == job.processing_region() == slice(job.region.start - 1, job.region.stop + 1)
    # Asked again on the cut template, the hook would clamp to its shorter length and lose the padding after.
    assert small.get_processing_region() != small.processing_region()
    assert small.template_ds.sizes["init_time"] == job.region.stop - job.region.start + 2
    assert small.for_workers() is small
    cutting = CuttingExampleJob.get_jobs(template, "init_time", CONFIG.data_vars)[1]
    with pytest.raises(ValueError, match="must be a contiguous slice holding the region"):
        cutting.for_workers()


def test_graph_shape_per_region(tmp_path: Path) -> None:
    job = jobs_for(RegionJobFilters())[0]
    with tmp_metadata_store(job.template_ds) as tmp_store:
        metadata = variable_metadata(tmp_store, [v.name for v in job.data_vars])
    graphs = build_region_graph(job, metadata, ObjectStore(tmp_path / "store.zarr"))
    files = 2 * len(source.LEAD_HOURS)
    download_tasks = -(-files // job.download_batch_size)
    variables = len(job.data_vars)
    # job + store + downloads + (encode + upload) per variable: encodes decode the downloads themselves
    assert len(graphs) == variables
    assert count_tasks(graphs) == 2 + download_tasks + variables * 2
    keys = set().union(*(g.__dask_graph__().keys() for g in graphs))
    assert not any(str(k).startswith("read-") for k in keys)


def test_graph_shape_with_separate_read_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ExampleRegionJob, "separate_read_tasks", True)
    job = jobs_for(RegionJobFilters())[0]
    with tmp_metadata_store(job.template_ds) as tmp_store:
        metadata = variable_metadata(tmp_store, [v.name for v in job.data_vars])
    graphs = build_region_graph(job, metadata, ObjectStore(tmp_path / "store.zarr"))
    files = 2 * len(source.LEAD_HOURS)
    download_tasks = -(-files // job.download_batch_size)
    reads_per_var = -(-download_tasks // (job.read_batch_size // job.download_batch_size))
    variables = len(job.data_vars)
    # job + store + downloads + (reads + encode + upload) per variable
    assert count_tasks(graphs) == 2 + download_tasks + variables * (reads_per_var + 2)


def test_per_variable_downloads_share_one_inventory_task_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ExampleRegionJob, "download_per_variable", True)
    monkeypatch.setattr(ExampleRegionJob, "source_index_url", lambda self, coord: f"{coord.get_url()}.idx")
    job = jobs_for(RegionJobFilters())[0]
    with tmp_metadata_store(job.template_ds) as tmp_store:
        metadata = variable_metadata(tmp_store, [v.name for v in job.data_vars])
    graphs = build_region_graph(job, metadata, ObjectStore(tmp_path / "store.zarr"))
    batches = -(-2 * len(source.LEAD_HOURS) // job.download_batch_size)
    variables = len(job.data_vars)
    # job + store + one inventory task per batch + (downloads + encode + upload) per variable
    assert count_tasks(graphs) == 2 + batches + variables * (batches + 2)
    graph = dict(graphs[0].__dask_graph__())
    index_keys = {k for k in graph if str(k).startswith("index-")}
    assert len(index_keys) == batches
    for key, task in graph.items():
        if str(key).startswith("download-"):
            assert len(task.dependencies & index_keys) == 1, key

    monkeypatch.setattr(ExampleRegionJob, "source_index_url", RegionJob.source_index_url)
    graphs = build_region_graph(job, metadata, ObjectStore(tmp_path / "store.zarr"))
    assert count_tasks(graphs) == 2 + variables * (batches + 2)


def run_job_without_cluster(job: ExampleRegionJob, store: ObjectStore, metadata: dict[str, bytes]) -> dict[str, list]:
    worker_job = job.for_workers()
    processing = job.template_ds.isel(init_time=job.get_processing_region())
    results = {}
    for group in job.source_groups(job.data_vars):
        coords = job.generate_source_file_coords(processing, group)
        downloads = download_kernel(worker_job, coords, list(group))
        for data_var in group:
            reads = [read_kernel(worker_job, data_var, [downloads], True)]
            encoded = encode_variable_kernel(worker_job, data_var, reads, metadata[data_var.name], store)
            results[data_var.name] = upload_kernel(encoded, store).results
    return results


def job_on_a_faulty_source(
    tmp_path: Path, job_class: type[ExampleRegionJob] = ExampleRegionJob
) -> tuple[ExampleRegionJob, dict[str, bytes], list[Any], ObjectStore]:
    """A worker copy of the first job over two example inits with one missing and one corrupt file, its
    variables' metadata, its source coords and a store holding only the template's metadata."""
    inits = pd.date_range("2024-01-01", periods=2, freq="6h")
    source.generate_source(tmp_path / "src", inits, missing=[(inits[0], 2)], corrupt=[(inits[1], 4)])
    template = CONFIG.get_template("2024-01-01T12:00")
    job = job_class.get_jobs(template, "init_time", CONFIG.data_vars, source_url=str(tmp_path / "src"))[0]
    store = ObjectStore(tmp_path / "store.zarr")
    with tmp_metadata_store(template) as tmp_store:
        publish_from_tmp_store(tmp_store, store)
        metadata = variable_metadata(tmp_store, [v.name for v in CONFIG.data_vars])
    coords = job.generate_source_file_coords(job.template_ds.isel(init_time=job.get_processing_region()), [])
    return job.for_workers(), metadata, list(coords), store


def test_decoding_in_the_shard_task_writes_what_read_tasks_would(tmp_path: Path) -> None:
    worker_job, metadata, coords, store = job_on_a_faulty_source(tmp_path)
    batches = [
        download_kernel(worker_job, coords[i : i + 5], list(worker_job.data_vars)) for i in range(0, len(coords), 5)
    ]
    for index, data_var in enumerate(worker_job.data_vars):
        reads = [
            read_kernel(worker_job, data_var, batches[:2], index == 0),
            read_kernel(worker_job, data_var, batches[2:], index == 0),
        ]
        via_reads = encode_variable_kernel(worker_job, data_var, reads, metadata[data_var.name], store)
        direct = encode_variable_kernel(worker_job, data_var, batches, metadata[data_var.name], store, index == 0)
        assert direct.objects == via_reads.objects
        assert [(c.get_url(), c.status) for c in direct.results] == [(c.get_url(), c.status) for c in via_reads.results]
        assert (
            direct.bytes_fetched
            == via_reads.bytes_fetched
            == (sum(d.nbytes for b in batches for d in b) if index == 0 else 0)
        )
    assert any(c.status == SourceFileStatus.ReadFailed for c in direct.results)
    assert any(c.status == SourceFileStatus.DownloadFailed for c in direct.results)


def write_two_inits_without_cluster(
    tmp_path: Path, job_class: type[ExampleRegionJob], **faults: Any
) -> tuple[pd.DatetimeIndex, ObjectStore, dict[str, list]]:
    """Two example inits (the source generated with `faults`) written into a fresh store by one region job."""
    inits = pd.date_range("2024-01-01", periods=2, freq="6h")
    source.generate_source(tmp_path / "src", inits, **{k: f(inits) for k, f in faults.items()})
    store = ObjectStore(tmp_path / "store.zarr")
    template = CONFIG.get_template("2024-01-01T12:00")
    job = job_class.get_jobs(template, "init_time", CONFIG.data_vars, source_url=str(tmp_path / "src"))[0]
    with tmp_metadata_store(template) as tmp_store:
        publish_from_tmp_store(tmp_store, store)
        metadata = variable_metadata(tmp_store, [v.name for v in CONFIG.data_vars])
    return inits, store, run_job_without_cluster(job, store, metadata)


def test_chunk_major_buffers_write_the_bytes_row_major_ones_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Untransformed variables are assembled chunk by chunk; the shards are byte for byte the row-major ones."""
    pool = RegionBufferPool(keep=1)
    monkeypatch.setattr("reformatters.pipeline.kernels.REGION_BUFFERS", pool)
    worker_job, metadata, coords, store = job_on_a_faulty_source(tmp_path)
    downloads = [download_kernel(worker_job, coords, list(worker_job.data_vars))]
    layouts = {}
    for data_var in worker_job.data_vars:
        encoder = ShardEncoder(metadata[data_var.name])
        layouts[data_var.name] = choose_layout(worker_job, data_var, encoder, [c.coord for c in downloads[0]], False)
        for inputs in (downloads, [read_kernel(worker_job, data_var, downloads, False)]):
            chunked = encode_variable_kernel(worker_job, data_var, inputs, metadata[data_var.name], store)
            assert pool._idle[-1].layout == layouts[data_var.name]
            rows = encode_variable_kernel(
                worker_job, data_var, inputs, metadata[data_var.name], store, chunk_major=False
            )
            assert not pool._idle[-1].layout.chunk_major
            assert chunked.objects == rows.objects, data_var.name
            assert len(chunked.objects) == 1
    assert {name: layout.chunk_major for name, layout in layouts.items()} == {
        "temperature_2m": True,
        "precipitation_surface": False,  # the transform hook needs the region as one array
    }
    shape = layouts["temperature_2m"].shape
    # A partial shard is merged from the region's values: row-major.
    temperature = next(v for v in worker_job.data_vars if v.name == "temperature_2m")
    encoder = ShardEncoder(metadata["temperature_2m"])
    assert not choose_layout(worker_job, temperature, encoder, [], True).chunk_major
    expected = RegionLayout.chunked(shape, encoder.chunk_shape)
    assert choose_layout(worker_job, temperature, encoder, [], False) == expected


def test_kernels_mark_failures_and_write_whole_shards(tmp_path: Path) -> None:
    inits, store, results = write_two_inits_without_cluster(
        tmp_path,
        ExampleRegionJob,
        missing=lambda inits: [(inits[0], 2)],
        corrupt=lambda inits: [(inits[1], 4)],
    )
    statuses = {(c.init_time, c.lead_time.total_seconds() // 3600): c.status for c in results["temperature_2m"]}
    assert statuses[(inits[0], 2)] == SourceFileStatus.DownloadFailed
    assert statuses[(inits[1], 4)] == SourceFileStatus.ReadFailed
    assert sum(s == SourceFileStatus.Succeeded for s in statuses.values()) == 10
    failed = next(c for c in results["temperature_2m"] if c.status == SourceFileStatus.DownloadFailed)
    assert failed.status_reason and "example.f002.npz" in failed.status_reason
    # One shard object per variable (shards of 2 x 6 x 16 x 32 cover the whole region).
    assert store.list("temperature_2m/c") == ["temperature_2m/c/0/0/0/0"]
    ds = store.open_dataset()
    assert np.isnan(ds.temperature_2m.sel(init_time=inits[0]).values[2]).all()
    assert not np.isnan(ds.temperature_2m.sel(init_time=inits[0]).values[3]).any()


class GapFillingJob(ExampleRegionJob):
    """Fills the second init time with a constant where the source delivered nothing (a stand-in for gap filling)."""

    def apply_data_transformations(self, data_array: Any, data_var: Any) -> None:
        data_array[{"init_time": 1}] = 7.0
        super().apply_data_transformations(data_array, data_var)


def test_values_a_transform_puts_where_no_field_arrived_are_written(tmp_path: Path) -> None:
    """Shard writes skip scanning delivered fields for data, never the others: a transform may fill them.
    The example names temperature as untransformed; a subclass overriding the hook does not inherit that."""
    template = CONFIG.get_template("2024-01-01T12:00")
    temperature = CONFIG.data_var("temperature_2m")
    assert not ExampleRegionJob.get_jobs(template, "init_time", CONFIG.data_vars)[0].transforms_region(temperature)
    assert GapFillingJob.get_jobs(template, "init_time", CONFIG.data_vars)[0].transforms_region(temperature)
    inits, store, results = write_two_inits_without_cluster(
        tmp_path, GapFillingJob, missing=lambda inits: [(inits[1], h) for h in source.LEAD_HOURS]
    )
    second = [c for c in results["temperature_2m"] if c.init_time == inits[1]]
    assert second and all(c.status == SourceFileStatus.DownloadFailed for c in second)
    ds = store.open_dataset()
    assert (ds.temperature_2m.sel(init_time=inits[1]).values == 7.0).all()
    assert not np.isnan(ds.temperature_2m.sel(init_time=inits[0]).values).any()


def test_region_covering_part_of_a_shard_merges_into_published_content(tmp_path: Path) -> None:
    inits = pd.date_range("2024-01-01", periods=2, freq="6h")
    source.generate_source(tmp_path / "src", inits)
    store = ObjectStore(tmp_path / "store.zarr")
    template = CONFIG.get_template("2024-01-01T12:00")
    with tmp_metadata_store(template) as tmp_store:
        publish_from_tmp_store(tmp_store, store)
        metadata = variable_metadata(tmp_store, [v.name for v in CONFIG.data_vars])
    full = ExampleRegionJob.get_jobs(template, "init_time", CONFIG.data_vars, source_url=str(tmp_path / "src"))[0]
    run_job_without_cluster(full, store, metadata)
    before = store.open_dataset().temperature_2m.values.copy()

    # Now only the second init time of the shard is re-processed, from a source where every file is gone:
    # the first init time keeps its published values, and so does the second (no field arrived to replace them).
    second_only = full.model_copy(update={"region": slice(1, 2), "source_url": str(tmp_path / "empty")})
    run_job_without_cluster(second_only, store, metadata)
    after = store.open_dataset().temperature_2m.values
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.isnan(before[1]).all()
    np.testing.assert_array_equal(after[1], before[1])


def test_metadata_is_published_root_last(tmp_path: Path) -> None:
    with tmp_metadata_store(CONFIG.get_template("2024-01-02T00:00")) as tmp_store:
        keys = metadata_keys(tmp_store)
    assert keys[-1] == "zarr.json"
    assert keys.index("temperature_2m/zarr.json") > keys.index("init_time/c/0")


def test_region_buffers_are_reused_refilled_and_bounded() -> None:
    pool = RegionBufferPool(keep=1)
    first = pool.take((2, 3), np.float32, np.nan)
    first[:] = 7.0
    pool.give_back(first)
    second = pool.take((2, 3), np.float32, np.nan)
    assert np.shares_memory(first, second), "an idle buffer of the same shape is reused"
    assert np.isnan(second).all(), "a reused buffer holds no values of its previous variable"
    third = pool.take((2, 3), np.float32, np.nan)
    assert not np.shares_memory(second, third)
    pool.give_back(second)
    pool.give_back(third)
    assert pool.idle_count() == 1, "at most `keep` idle buffers stay allocated"
    other = pool.take((4, 3), np.float32, np.nan)
    pool.give_back(other)
    assert pool.idle_count() == 1, "at most `keep` idle buffers whatever their shape"
    assert pool.take((4, 3), np.float32, np.nan).shape == (4, 3)


def test_a_reused_buffer_is_refilled_where_its_last_user_said_values_may_be() -> None:
    pool = RegionBufferPool(keep=1)
    buffer = pool.take((2, 3, 4, 5), np.float32, np.nan)
    buffer[0, 1] = 1.0
    buffer[1, 2, 3, 4] = 2.0
    dirty = np.zeros((2, 3), dtype=bool)
    dirty[0, 1] = dirty[1, 2] = True
    pool.give_back(buffer, np.nan, dirty_slabs=dirty)
    again = pool.take((2, 3, 4, 5), np.float32, np.nan)
    assert np.shares_memory(again, buffer) and np.isnan(again).all()

    # Only the slabs named dirty are refilled: the map is the caller's promise (slabs_holding_data keeps it).
    again[0, 0] = 3.0
    pool.give_back(again, np.nan, dirty_slabs=np.zeros((2, 3), dtype=bool))
    assert (pool.take((2, 3, 4, 5), np.float32, np.nan)[0, 0] == 3.0).all()
    # No map, or another fill value: refilled whole.
    pool.give_back(again)
    assert np.isnan(pool.take((2, 3, 4, 5), np.float32, np.nan)).all()
    again[0, 0] = 3.0
    pool.give_back(again, 0.0, dirty_slabs=np.zeros((2, 3), dtype=bool))
    assert np.isnan(pool.take((2, 3, 4, 5), np.float32, np.nan)).all()
    with pytest.raises(ValueError, match="dirty_slabs of shape"):
        pool.give_back(again, np.nan, dirty_slabs=np.zeros((3, 2), dtype=bool))


def test_a_variable_missing_fields_its_predecessor_had_writes_nan_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both variables share one reused buffer: the second, missing lead 2, must not show the first's values."""
    monkeypatch.setattr("reformatters.pipeline.kernels.REGION_BUFFERS", RegionBufferPool(keep=1))
    inits = pd.date_range("2024-01-01", periods=2, freq="6h")
    source.generate_source(tmp_path / "src", inits)
    template = CONFIG.get_template("2024-01-01T12:00")
    job = ExampleRegionJob.get_jobs(template, "init_time", CONFIG.data_vars, source_url=str(tmp_path / "src"))[0]
    store = ObjectStore(tmp_path / "store.zarr")
    with tmp_metadata_store(template) as tmp_store:
        publish_from_tmp_store(tmp_store, store)
        metadata = variable_metadata(tmp_store, [v.name for v in CONFIG.data_vars])
    worker_job = job.for_workers()
    coords = job.generate_source_file_coords(job.template_ds.isel(init_time=job.get_processing_region()), [])
    downloads = download_kernel(worker_job, coords, list(job.data_vars))
    temperature, precipitation = (v for v in job.data_vars if v.name in ("temperature_2m", "precipitation_surface"))
    upload_kernel(
        encode_variable_kernel(worker_job, temperature, [downloads], metadata[temperature.name], store), store
    )
    without_lead_2 = [d for d in downloads if d.coord.out_loc()["lead_time"] != pd.Timedelta(hours=2)]
    assert len(without_lead_2) == len(downloads) - 2
    encoded = encode_variable_kernel(worker_job, precipitation, [without_lead_2], metadata[precipitation.name], store)
    upload_kernel(encoded, store)
    ds = store.open_dataset()
    assert not np.isnan(ds.temperature_2m.sel(lead_time="2h").values).any()
    assert np.isnan(ds.precipitation_surface.sel(lead_time="2h").values).all()
    assert not np.isnan(ds.precipitation_surface.sel(lead_time="4h").values).any()


def test_slabs_holding_data_trusts_delivered_fields_and_scans_the_rest() -> None:
    padded = np.full((2, 3, 4, 5), np.nan, dtype=np.float32)
    delivered = np.zeros((2, 3), dtype=bool)
    delivered[0, 0] = True  # delivered but all NaN (a field missing everywhere): taken as data, not scanned
    padded[1, 2, 3, 4] = 5.0  # not delivered, filled by a transform, in a corner
    padded[0, 2, 1, 2] = 6.0  # not delivered, one value inside
    holding = slabs_holding_data(padded, delivered)
    expected = np.zeros((2, 3), dtype=bool)
    expected[0, 0] = expected[1, 2] = expected[0, 2] = True
    np.testing.assert_array_equal(holding, expected)
    assert not delivered[0, 2], "the delivered map is left as it was"


def test_the_first_region_buffer_is_warmed_in_the_background_once() -> None:
    pool = RegionBufferPool(keep=1)
    assert pool.warm((3, 5), np.float32, np.nan)
    buffer = pool.take((3, 5), np.float32, np.nan)  # waits for the warm-up and gets its buffer
    assert buffer.shape == (3, 5) and np.isnan(buffer).all()
    assert not pool.warm((3, 5), np.float32, np.nan), "a buffer is in use: no second one"
    pool.give_back(buffer)
    assert not pool.warm((3, 5), np.float32, np.nan), "a buffer is idle: nothing to warm"
    assert pool.idle_count() == 1
    assert np.shares_memory(pool.take((3, 5), np.float32, np.nan), buffer)


def test_downloads_warm_the_shard_padded_buffer_their_variables_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = RegionBufferPool(keep=1)
    monkeypatch.setattr("reformatters.pipeline.kernels.REGION_BUFFERS", pool)
    inits = pd.date_range("2024-01-01", periods=2, freq="6h")
    source.generate_source(tmp_path / "src", inits)
    template = CONFIG.get_template("2024-01-01T12:00")
    job = ExampleRegionJob.get_jobs(template, "init_time", CONFIG.data_vars, source_url=str(tmp_path / "src"))[0]
    worker_job = job.for_workers()
    coords = job.generate_source_file_coords(job.template_ds.isel(init_time=job.get_processing_region()), [])
    download_kernel(worker_job, coords[:1], list(job.data_vars))
    data_var = job.data_vars[0]
    expected = region_buffer_shape(worker_job, data_var, data_var.encoding.shards)
    assert pool.take(expected, np.float32, np.nan).shape == expected
    assert pool.idle_count() == 0, "the warmed buffer was the one taken"


class DecodesInPlaceJob(ExampleRegionJob):
    """Implements only `read_data_into`, and leaves half a field behind when a file turns out corrupt."""

    read_data = RegionJob.read_data  # type: ignore[assignment]

    def read_data_into(self, coord: Any, data_var: Any, payload: Any, out: np.ndarray) -> None:
        out[: out.shape[0] // 2] = 123.0
        out[...] = ExampleRegionJob.read_data(self, coord, data_var, payload)


class NoReadHookJob(ExampleRegionJob):
    read_data = RegionJob.read_data  # type: ignore[assignment]


class WrongShapeJob(ExampleRegionJob):
    def read_data(self, coord: Any, data_var: Any, payload: Any) -> np.ndarray:
        return ExampleRegionJob.read_data(self, coord, data_var, payload)[:, :-1]


def encode_both_ways(tmp_path: Path, job_class: type[ExampleRegionJob]) -> list[tuple[Any, Any]]:
    """Each variable encoded from read tasks' fields and decoded inside the shard task."""
    worker_job, metadata, coords, store = job_on_a_faulty_source(tmp_path, job_class)
    downloads = [download_kernel(worker_job, coords, list(worker_job.data_vars))]
    return [
        (
            encode_variable_kernel(
                worker_job, var, [read_kernel(worker_job, var, downloads, True)], metadata[var.name], store
            ),
            encode_variable_kernel(worker_job, var, downloads, metadata[var.name], store, True),
        )
        for var in worker_job.data_vars
    ]


def source_statuses(encoded: Any) -> list[tuple[str, SourceFileStatus]]:
    return [(c.get_url().split("/src/")[1], c.status) for c in encoded.results]


def test_a_dataset_may_decode_in_place_and_a_failed_decode_leaves_no_trace(tmp_path: Path) -> None:
    plain = encode_both_ways(tmp_path / "plain", ExampleRegionJob)
    in_place = encode_both_ways(tmp_path / "in-place", DecodesInPlaceJob)
    for (plain_reads, plain_direct), (reads, direct) in zip(plain, in_place, strict=True):
        assert reads.objects == direct.objects == plain_reads.objects == plain_direct.objects
        statuses = source_statuses(direct)
        assert statuses == source_statuses(plain_direct) == source_statuses(reads)
        # The corrupt file's half-written field (123.0) became NaN again: the bytes equal the plain job's.
        assert sum(status == SourceFileStatus.ReadFailed for _, status in statuses) == 1


def test_bugs_in_a_datasets_read_hooks_fail_the_task_instead_of_each_file(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match=r"NoReadHookJob must implement read_data\(\) or read_data_into\(\)"):
        encode_both_ways(tmp_path / "none", NoReadHookJob)
    with pytest.raises(
        FieldShapeError, match=r"temperature_2m: read_data returned shape \(16, 31\) .* expects \(16, 32\)"
    ):
        encode_both_ways(tmp_path / "shape", WrongShapeJob)


class RecordsWhatTheHookSees(ExampleRegionJob):
    seen: ClassVar[dict[str, np.ndarray]] = {}
    transforms_region = ExampleRegionJob.transforms_region  # recording changes no value

    def apply_data_transformations(self, data_array: Any, data_var: Any) -> None:
        type(self).seen[data_var.name] = data_array.values.copy()
        super().apply_data_transformations(data_array, data_var)


def is_rounded(values: np.ndarray, bits: int) -> bool:
    return np.array_equal(round_float32_inplace(values.copy(), bits), values, equal_nan=True)


@pytest.mark.parametrize("read_tasks", [False, True])
def test_untransformed_variables_are_rounded_as_decoded_the_others_after_the_hook(
    tmp_path: Path, read_tasks: bool
) -> None:
    worker_job, metadata, coords, store = job_on_a_faulty_source(tmp_path, RecordsWhatTheHookSees)
    downloads = [download_kernel(worker_job, coords, list(worker_job.data_vars))]
    for var in worker_job.data_vars:
        inputs = [read_kernel(worker_job, var, downloads, True)] if read_tasks else downloads
        upload_kernel(encode_variable_kernel(worker_job, var, inputs, metadata[var.name], store, True), store)
    stored = store.open_dataset()
    for var in worker_job.data_vars:
        bits = var.internal_attrs.keep_mantissa_bits
        assert is_rounded(stored[var.name].values, bits), var.name
        if not worker_job.transforms_region(var):
            assert var.name not in RecordsWhatTheHookSees.seen, "the hook runs only where it changes values"
            continue
        seen = RecordsWhatTheHookSees.seen[var.name]
        assert np.isfinite(seen).sum() > 100
        assert not is_rounded(seen, bits), f"{var.name}: the hook sees the values before rounding"
    assert [v.name for v in worker_job.data_vars if worker_job.transforms_region(v)] == ["precipitation_surface"]
