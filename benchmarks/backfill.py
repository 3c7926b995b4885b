"""The backfill benchmark (issue 6): the project's pipelined backfill against its staged form, the naive script
a user would write, and the machine's bound, on a generated GFS-layout archive served over loopback.

    python3 -m benchmarks.backfill [--sizes 1,3] [--leads 0-48] [--variables a,b,c] [--json PATH]

Everything runs in one process tree: this driver, the archive server (a subprocess), the LocalCluster's
worker processes and the naive script (a spawned subprocess). Each measured mode runs at two sizes (init times)
with the same leads and variables, so the fixed cost of a run and its marginal (warm) throughput separate:
marginal = (work at the larger size - work at the smaller) / (wall at the larger - wall at the smaller).
A mode's sizes run back to back; the machine's bound is measured before the first mode and after each one,
and a mode is judged against the two measurements around it (this VM's speed per core drifts within minutes).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

BENCHMARK_VERSION = 1
FIRST_INIT = datetime(2021, 5, 1, 0)
HRRR_FIRST_INIT = datetime(2018, 7, 13, 12)  # the HRRR dataset's first init (runs of that era have no f37-f48)
INIT_STEP = timedelta(hours=6)
DEFAULT_SIZES = (1, 3)
DEFAULT_LEADS = tuple(range(0, 49))
DEFAULT_VARIABLES = ("temperature_2m", "relative_humidity_2m", "wind_u_10m", "precipitation_surface")
MODES = ("pipelined", "read-tasks", "staged", "naive")
# Opt-in with --modes: the pipelined backfill into an Icechunk repository (benchmarks/icechunk.py interleaves it
# with `pipelined` for their ratio).
EXTRA_MODES = ("icechunk",)
GFS_ID, HRRR_ID = "noaa-gfs-forecast", "noaa-hrrr-forecast-48-hour"
# HRRR is measured in the project's own modes only: the staged and naive baselines are written for GFS.
HRRR_MODES = ("pipelined", "read-tasks")
RSS_SAMPLE_SECONDS = 0.05
MB = 1e6


# --------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    leads: tuple[int, ...] = DEFAULT_LEADS
    variables: tuple[str, ...] = DEFAULT_VARIABLES
    modes: tuple[str, ...] = MODES
    filler_ratio: float = 3.0
    n_workers: int | None = None  # None: what `open_client("local")` gives a user
    bound_fields: int = 105  # fields per variable in the one-core compression measurement (one chunk deep)
    repeat: int = 1  # runs per (mode, size); the fastest is kept, all walls are reported
    workdir: Path | None = None
    dataset: str = GFS_ID

    @property
    def first_init(self) -> datetime:
        return HRRR_FIRST_INIT if self.dataset == HRRR_ID else FIRST_INIT

    @property
    def init_times(self) -> list[datetime]:
        return [self.first_init + i * INIT_STEP for i in range(max(self.sizes))]


@dataclass
class RunResult:
    mode: str
    size: int
    wall_seconds: float
    fields: int
    var_regions: int
    bytes_fetched: int
    bytes_served: int
    requests_served: int
    archive_bytes: int
    bytes_written: int
    server_cpu_seconds: float
    peak_rss_per_worker: dict[str, int] = field(default_factory=dict)
    worker_cpu_seconds: float = 0.0  # user + system, all workers (naive: its process)
    worker_system_seconds: float = 0.0
    driver_cpu_seconds: float = 0.0  # this process: the driver, and the scheduler of a LocalCluster
    tasks: int = 0
    mean_task_seconds: float = 0.0
    task_seconds_by_kind: dict[str, float] = field(default_factory=dict)
    tasks_by_kind: dict[str, int] = field(default_factory=dict)
    cluster_ready_seconds: float | None = None
    worker_threads: int = 0
    files_ok: int = 0
    files_failed: int = 0
    wall_seconds_all: list[float] = field(default_factory=list)  # every repetition; `wall_seconds` is the least

    @property
    def peak_rss_max(self) -> int:
        return max(self.peak_rss_per_worker.values(), default=0)


# --------------------------------------------------------------------------------------------------
# Archive server in a subprocess


class ServerProcess:
    """`benchmarks.serve` in a child process: its URL, its body-byte counters and its CPU time."""

    def __init__(self, root: Path) -> None:
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serve", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self._popen.stdout is not None and self._popen.stdin is not None
        self.url = self._popen.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError(f"archive server did not start (said {self.url!r})")
        self._process = psutil.Process(self._popen.pid)

    def _ask(self, command: str) -> str:
        assert self._popen.stdin is not None and self._popen.stdout is not None
        self._popen.stdin.write(command + "\n")
        self._popen.stdin.flush()
        return self._popen.stdout.readline().strip()

    def counters(self) -> tuple[int, int]:
        answer = json.loads(self._ask("counters"))
        return int(answer["bytes"]), int(answer["requests"])

    def reset(self) -> None:
        self._ask("reset")

    def cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        if self._popen.stdin is not None:
            self._popen.stdin.close()
        try:
            self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()


@contextmanager
def serve(root: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(root)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------------------------------
# Cluster instrumentation: worker RSS sampling and the task stream


class RssSampler(threading.Thread):
    """Peak resident memory of each worker process, sampled from the driver."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._processes = {address: psutil.Process(pid) for address, pid in pids.items()}
        self.peaks: dict[str, int] = dict.fromkeys(pids, 0)
        self._cpu_at_start = {address: self._cpu(process) for address, process in self._processes.items()}
        self._stop_event = threading.Event()

    @staticmethod
    def _cpu(process: psutil.Process) -> tuple[float, float]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return 0.0, 0.0
        return float(times.user), float(times.system)

    def cpu_seconds(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds each worker process used since sampling started."""
        used = {}
        for address, process in self._processes.items():
            user, system = self._cpu(process)
            user0, system0 = self._cpu_at_start[address]
            used[address] = (user - user0, system - system0)
        return used

    def sample(self) -> None:
        for address, process in self._processes.items():
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            self.peaks[address] = max(self.peaks[address], rss)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(RSS_SAMPLE_SECONDS)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join(timeout=5)
        self.sample()
        return dict(self.peaks)


@dataclass
class ClusterProbe:
    """What the instrumented client saw, filled in while the cluster is up, and where the run started from."""

    started: float = 0.0
    server_cpu_before: float = 0.0
    driver_cpu_before: float = 0.0
    opened_at: float = 0.0
    ready_at: float = 0.0
    peaks: dict[str, int] = field(default_factory=dict)
    worker_cpu: dict[str, tuple[float, float]] = field(default_factory=dict)
    task_records: list[dict[str, Any]] = field(default_factory=list)
    threads: int = 0

    @classmethod
    def start(cls, server: ServerProcess) -> ClusterProbe:
        """A probe for a run that starts now: the server's counters cleared, the CPU clocks read."""
        server.reset()
        return cls(
            server_cpu_before=server.cpu_seconds(),
            driver_cpu_before=_own_cpu_seconds(),
            started=time.perf_counter(),
        )


def _task_kind(key: Any) -> str:
    text = key[0] if isinstance(key, tuple) else str(key)
    return text.split("-", 1)[0]


def summarise_tasks(records: Sequence[Mapping[str, Any]]) -> tuple[int, float, dict[str, float], dict[str, int]]:
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = 0.0
    for record in records:
        compute = sum(s["stop"] - s["start"] for s in record.get("startstops", ()) if s.get("action") == "compute")
        kind = _task_kind(record["key"])
        seconds[kind] = seconds.get(kind, 0.0) + compute
        counts[kind] = counts.get(kind, 0) + 1
        total += compute
    n = len(records)
    return n, (total / n if n else 0.0), seconds, counts


def quiet_source_warnings() -> None:
    """The benchmark's archive lacks most leads on purpose: keep the expected 404 warnings off the terminal."""
    for name in ("reformatters", "reformatters.pipeline", "reformatters.sources"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def instrumented_open_client(probe: ClusterProbe) -> Iterator[Callable[..., Any]]:
    """A stand-in for `open_client` that opens the real one and watches it; patched into the backfill."""
    from distributed import get_task_stream

    from reformatters import cluster as cluster_module

    real_open_client = cluster_module.open_client

    @contextmanager
    def open_client(spec: str = "local", *, n_workers: int | None = None, **options: Any) -> Iterator[Any]:
        probe.opened_at = time.perf_counter()
        with real_open_client(spec, n_workers=n_workers, **options) as client, ExitStack() as stack:
            probe.ready_at = time.perf_counter()
            pids = client.run(os.getpid)
            client.run(quiet_source_warnings)
            probe.threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
            sampler = RssSampler(pids)
            sampler.start()
            stream = stack.enter_context(get_task_stream(client=client))
            try:
                yield client
            finally:
                probe.worker_cpu = sampler.cpu_seconds()
                probe.peaks = sampler.stop()
                stack.close()
                probe.task_records = list(stream.data)

    yield open_client


# --------------------------------------------------------------------------------------------------
# The workload


def present_fields(variables: Sequence[str], leads: Sequence[int], size: int, dataset: str = GFS_ID) -> int:
    """Fields the source actually holds for `size` inits (windowed variables have none at lead 0)."""
    by_name = _dataset_vars(dataset)
    step_text = _step_text(dataset)
    return size * sum(1 for v in variables for lead in leads if step_text(by_name[v], lead) is not None)


def _dataset_vars(dataset: str) -> dict[str, Any]:
    if dataset == HRRR_ID:
        from reformatters_datasets.noaa.hrrr.forecast_48_hour.template_config import DATA_VARS as HRRR_VARS

        return {v.name: v for v in HRRR_VARS}
    return _gfs_vars()


def _step_text(dataset: str) -> Callable[[Any, int], str | None]:
    if dataset == HRRR_ID:
        from reformatters_datasets.noaa.hrrr.forecast_48_hour.region_job import step_text as hrrr_step_text

        hrrr: Callable[[Any, int], str | None] = hrrr_step_text
        return hrrr
    from reformatters_datasets.noaa.gfs.forecast.region_job import step_text

    gfs: Callable[[Any, int], str | None] = step_text
    return gfs


def _dataset_and_job_class(dataset: str) -> tuple[Any, Any]:
    if dataset == HRRR_ID:
        from reformatters_datasets.noaa.hrrr.forecast_48_hour.dataset import HrrrForecast48HourDataset
        from reformatters_datasets.noaa.hrrr.forecast_48_hour.region_job import HrrrForecast48HourRegionJob

        return HrrrForecast48HourDataset(), HrrrForecast48HourRegionJob
    from reformatters_datasets.noaa.gfs.forecast.dataset import GfsForecastDataset
    from reformatters_datasets.noaa.gfs.forecast.region_job import GfsForecastRegionJob

    return GfsForecastDataset(), GfsForecastRegionJob


def _gfs_vars() -> dict[str, Any]:
    from reformatters_datasets.noaa.gfs.forecast.template_config import DATA_VARS

    return {v.name: v for v in DATA_VARS}


def _end(size: int, first_init: datetime = FIRST_INIT) -> str:
    return (first_init + size * INIT_STEP).isoformat()


def _archive_bytes(manifest: Any, size: int, first_init: datetime = FIRST_INIT) -> int:
    inits = {first_init + i * INIT_STEP for i in range(size)}
    return sum(f.size for f in manifest.files if f.init_time in inits)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _data_var_bytes(store: Path, variables: Sequence[str]) -> int:
    return sum(_tree_bytes(store / name / "c") for name in variables if (store / name / "c").exists())


def cluster_run_result(
    mode: str,
    config: BenchConfig,
    size: int,
    server: ServerProcess,
    manifest: Any,
    probe: ClusterProbe,
    *,
    bytes_fetched: int,
    bytes_written: int,
    files_ok: int,
    files_failed: int,
) -> RunResult:
    """What a run on the instrumented cluster measured, taken now that it has finished."""
    wall = time.perf_counter() - probe.started
    served, requests = server.counters()
    n_tasks, mean_task, by_kind, counts = summarise_tasks(probe.task_records)
    return RunResult(
        mode=mode,
        size=size,
        wall_seconds=wall,
        fields=present_fields(config.variables, config.leads, size, config.dataset),
        var_regions=size * len(config.variables),
        bytes_fetched=bytes_fetched,
        bytes_served=served,
        requests_served=requests,
        archive_bytes=_archive_bytes(manifest, size, config.first_init),
        bytes_written=bytes_written,
        server_cpu_seconds=server.cpu_seconds() - probe.server_cpu_before,
        peak_rss_per_worker=probe.peaks,
        worker_cpu_seconds=sum(user + system for user, system in probe.worker_cpu.values()),
        worker_system_seconds=sum(system for _, system in probe.worker_cpu.values()),
        driver_cpu_seconds=_own_cpu_seconds() - probe.driver_cpu_before,
        tasks=n_tasks,
        mean_task_seconds=mean_task,
        task_seconds_by_kind=by_kind,
        tasks_by_kind=counts,
        cluster_ready_seconds=probe.ready_at - probe.started,
        worker_threads=probe.threads,
        files_ok=files_ok,
        files_failed=files_failed,
    )


# --------------------------------------------------------------------------------------------------
# (1) the project's backfill


def run_pipelined(
    config: BenchConfig,
    size: int,
    server: ServerProcess,
    manifest: Any,
    work: Path,
    *,
    read_tasks: bool = False,
    store_format: str = "zarr",
) -> RunResult:
    """The backfill as a user runs it; `read_tasks` switches to the graph shape with separate read tasks,
    `store_format="icechunk"` writes an Icechunk repository instead of a plain Zarr store (mode `icechunk`)."""
    from unittest import mock

    from reformatters.region_job import RegionJobFilters

    dataset, job_class = _dataset_and_job_class(config.dataset)
    mode = "read-tasks" if read_tasks else "icechunk" if store_format == "icechunk" else "pipelined"
    store = work / f"{mode}-{size}.{store_format}"
    control = Path(f"{store}.reformatters")  # an Icechunk store's lease and records
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(control, ignore_errors=True)
    probe = ClusterProbe.start(server)
    with (
        instrumented_open_client(probe) as open_client,
        mock.patch("reformatters.cluster.open_client", open_client),
        mock.patch.object(job_class, "separate_read_tasks", read_tasks),
    ):
        summary = dataset.backfill(
            _end(size, config.first_init),
            cluster="local",
            n_workers=config.n_workers,
            store_url=str(store),
            source_url=server.url,
            filters=RegionJobFilters(variable_names=config.variables),
            show_progress=False,
        )
    result = cluster_run_result(
        mode,
        config,
        size,
        server,
        manifest,
        probe,
        bytes_fetched=summary.bytes_fetched,
        bytes_written=summary.bytes_written,
        files_ok=summary.files_ok,
        files_failed=summary.files_failed,
    )
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(control, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# (2) the same kernels, one stage at a time


def run_staged(config: BenchConfig, size: int, server: ServerProcess, manifest: Any, work: Path) -> RunResult:
    from distributed import wait
    from reformatters_datasets.noaa.gfs.forecast.dataset import GfsForecastDataset

    from reformatters.cluster import workers_have_encode_resource
    from reformatters.pipeline.graph import ENCODE_RESOURCE, coord_batches, shares_inventories
    from reformatters.pipeline.kernels import (
        download_kernel,
        encode_variable_kernel,
        index_kernel,
        read_kernel,
        upload_kernel,
    )
    from reformatters.publish import publish_from_tmp_store, tmp_metadata_store, variable_metadata
    from reformatters.region_job import RegionJobFilters, SourceFileCoord, SourceFileStatus

    store = work / f"staged-{size}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    probe = ClusterProbe.start(server)
    dataset = GfsForecastDataset()
    template_config = dataset.template_config
    final_store = dataset.store(str(store))
    template_ds = template_config.get_template(_end(size))
    jobs = dataset.region_job_class.get_jobs(
        template_ds,
        template_config.append_dim,
        template_config.data_vars,
        RegionJobFilters(variable_names=config.variables),
        source_url=server.url,
    )
    all_results: dict[str, list[SourceFileCoord]] = {}
    bytes_fetched = bytes_written = files_ok = files_failed = 0
    with (
        tmp_metadata_store(template_ds) as tmp_store,
        instrumented_open_client(probe) as open_client,
        open_client("local", n_workers=config.n_workers) as client,
    ):
        publish_from_tmp_store(tmp_store, final_store)
        var_metadata = variable_metadata(tmp_store, [v.name for v in template_config.data_vars])
        encode_resources = {ENCODE_RESOURCE: 1} if workers_have_encode_resource(client) else None
        store_future = client.scatter(final_store, broadcast=True, hash=False)

        # Stage 1: every download of every region, shared by a group or one set per variable, as the graph has it.
        planned: list[tuple[Any, Any, Any, list[Any], bool]] = []  # (job future, job, data var, downloads, count)
        for job in jobs:
            job_future = client.scatter(job.for_workers(), broadcast=True, hash=False)
            processing_ds = job.template_ds.isel({job.append_dim: job.get_processing_region()})
            for group in job.source_groups(job.data_vars):
                coords = list(job.generate_source_file_coords(processing_ds, group))
                batches = coord_batches(job, coords)
                # The inventories once per batch for every variable's downloads, as the graph fetches them.
                shares = shares_inventories(job, group, coords)
                indexes = [client.submit(index_kernel, job_future, b, pure=False) if shares else None for b in batches]

                def submit(
                    variables: list[Any], job_future: Any = job_future, batches: Any = batches, indexes: Any = indexes
                ) -> list[Any]:
                    return [
                        client.submit(download_kernel, job_future, b, variables, i, pure=False)
                        for b, i in zip(batches, indexes, strict=True)
                    ]

                shared = [] if job.download_per_variable else submit(list(group))
                for var_index, data_var in enumerate(group):
                    downloads = submit([data_var]) if job.download_per_variable else shared
                    count = job.download_per_variable or var_index == 0
                    planned.append((job_future, job, data_var, downloads, count))
        wait([d for *_, downloads, _ in planned for d in downloads])

        # Stage 2 (only in the graph shape with read tasks): every read.
        inputs: list[tuple[Any, Any, Any, list[Any], bool]] = []  # (job future, job, data var, inputs, count)
        for job_future, job, data_var, downloads, count in planned:
            var_inputs = downloads
            if job.separate_read_tasks:
                batch = max(1, job.read_batch_size // max(1, job.download_batch_size))
                var_inputs = [
                    client.submit(read_kernel, job_future, data_var, downloads[s : s + batch], count, pure=False)
                    for s in range(0, len(downloads), batch)
                ]
            inputs.append((job_future, job, data_var, var_inputs, count))
        if any(job.separate_read_tasks for job in jobs):
            wait([r for *_, var_inputs, _ in inputs for r in var_inputs])
        del planned

        # Stage 3: every encode (decoding the downloads unless read tasks did).
        encodes = [
            client.submit(
                encode_variable_kernel,
                job_future,
                data_var,
                var_inputs,
                var_metadata[data_var.name],
                store_future,
                first,
                resources=encode_resources,
                pure=False,
            )
            for job_future, _, data_var, var_inputs, first in inputs
        ]
        wait(encodes)
        del inputs

        # Stage 4: every upload.
        uploads = [client.submit(upload_kernel, e, store_future, pure=False) for e in encodes]
        wait(uploads)
        del encodes
        for result in client.gather(uploads):
            all_results.setdefault(result.var_name, []).extend(result.results)
            bytes_fetched += result.bytes_fetched
            bytes_written += result.bytes_written
            ok = sum(1 for c in result.results if c.status is SourceFileStatus.Succeeded)
            files_ok += ok
            files_failed += len(result.results) - ok
        del uploads
    dataset.finalize(template_ds, all_results, final_store)
    result = cluster_run_result(
        "staged",
        config,
        size,
        server,
        manifest,
        probe,
        bytes_fetched=bytes_fetched,
        bytes_written=bytes_written,
        files_ok=files_ok,
        files_failed=files_failed,
    )
    shutil.rmtree(store, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# (3) the naive script a user would write


_TYPE_OF_LEVEL = {1: "surface", 101: "meanSea", 103: "heightAboveGround", 200: "atmosphere", 215: "cloudCeiling"}


def _cfgrib_filter(var_name: str, lead: int) -> dict[str, Any] | None:
    """filter_by_keys that pick this variable's message at this lead out of a whole GFS-layout file."""
    from reformatters_datasets.noaa.gfs.forecast.region_job import window_start_hours

    from reformatters.testing.noaa_archive import get_variable

    v = get_variable(var_name)
    keys: dict[str, Any] = {
        "discipline": v.discipline,
        "parameterCategory": v.category,
        "parameterNumber": v.number,
        "typeOfLevel": _TYPE_OF_LEVEL[v.level_type],
    }
    if v.level_value is not None:
        keys["level"] = v.level_value
    if v.kind == "instant":
        keys["stepType"] = "instant"
    elif lead == 0:
        return None  # windowed fields have no lead-0 message
    else:
        keys["stepRange"] = f"{window_start_hours(lead)}-{lead}"
    return keys


def naive_backfill(
    source_url: str, init_times: Sequence[datetime], leads: Sequence[int], variables: Sequence[str], work: str
) -> dict[str, Any]:
    """What a user writes without the framework: GET whole files, cfgrib per variable, concat, `to_zarr`.

    Same output layout as the dataset (all 209 leads, NaN where absent, -180..180 longitudes, degC, the same
    encoding, chunks and shards); no deaccumulation or rounding. Runs in its own process.
    """
    started = time.perf_counter()
    import httpx
    import numpy as np
    import pandas as pd
    import xarray as xr
    from reformatters_datasets.noaa.gfs.forecast.template_config import DATA_VARS, LEAD_HOURS

    by_name = {v.name: v for v in DATA_VARS}
    store = Path(work) / "naive.zarr"
    downloads = Path(work) / "naive-downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    fetched = fields = 0
    all_leads = pd.to_timedelta(np.asarray(LEAD_HOURS, dtype=np.int64), unit="h")
    latitude = np.linspace(90.0, -90.0, 721)
    longitude = np.arange(-180.0, 180.0, 0.25)
    with httpx.Client(timeout=60.0) as http:
        for n, init in enumerate(init_times):
            paths: dict[int, Path] = {}
            for lead in leads:
                url = f"{source_url}/gfs.{init:%Y%m%d}/{init:%H}/atmos/gfs.t{init:%H}z.pgrb2.0p25.f{lead:03d}"
                response = http.get(url)
                if response.status_code != 200:
                    continue
                fetched += len(response.content)
                path = downloads / f"{init:%Y%m%d%H}.f{lead:03d}.grib2"
                path.write_bytes(response.content)
                paths[lead] = path
            data_vars: dict[str, Any] = {}
            for name in variables:
                cube = np.full((1, len(all_leads), 721, 1440), np.nan, dtype=np.float32)
                for lead, path in paths.items():
                    keys = _cfgrib_filter(name, lead)
                    if keys is None:
                        continue
                    with xr.open_dataset(
                        path, engine="cfgrib", backend_kwargs={"filter_by_keys": keys, "indexpath": ""}
                    ) as ds:
                        (short_name,) = list(ds.data_vars)
                        values = ds[short_name].values.astype(np.float32)
                    if values.ndim == 3:  # identical duplicates of the message: take the first
                        values = values[0]
                    values = np.roll(values, 720, axis=1)
                    if by_name[name].internal_attrs.kelvin_to_celsius:
                        values -= np.float32(273.15)
                    cube[0, int(np.flatnonzero(all_leads == pd.Timedelta(hours=lead))[0])] = values
                    fields += 1
                data_vars[name] = (("init_time", "lead_time", "latitude", "longitude"), cube)
            ds_out = xr.Dataset(
                data_vars,
                coords={
                    "init_time": [pd.Timestamp(init)],
                    "lead_time": all_leads,
                    "latitude": latitude,
                    "longitude": longitude,
                },
            )
            if n == 0:
                encoding = {name: by_name[name].encoding.to_xarray_encoding() for name in variables}
                encoding["init_time"] = {"units": "hours since 1970-01-01", "dtype": "int64"}
                ds_out.to_zarr(store, mode="w", zarr_format=3, encoding=encoding, consolidated=True)
            else:
                ds_out.to_zarr(store, append_dim="init_time", zarr_format=3, consolidated=True)
            del ds_out, data_vars
            for path in paths.values():
                path.unlink()
    written = _data_var_bytes(store, variables)
    shutil.rmtree(store, ignore_errors=True)
    return {
        "seconds_inside": time.perf_counter() - started,
        "bytes_fetched": fetched,
        "fields": fields,
        "bytes_written": written,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "system_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_stime,
    }


def run_naive(config: BenchConfig, size: int, server: ServerProcess, manifest: Any, work: Path) -> RunResult:
    server.reset()
    cpu_before = server.cpu_seconds()
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        out = pool.apply(
            naive_backfill,
            (server.url, config.init_times[:size], list(config.leads), list(config.variables), str(work)),
        )
        # Let the process exit on its own: terminating it (what leaving the block does) leaks the semaphores it
        # registered, and the resource tracker warns about them at shutdown.
        pool.close()
        pool.join()
    wall = time.perf_counter() - started
    served, requests = server.counters()
    expected = present_fields(config.variables, config.leads, size)
    if out["fields"] != expected:
        raise RuntimeError(f"naive script read {out['fields']} fields, the archive holds {expected}")
    return RunResult(
        mode="naive",
        size=size,
        wall_seconds=wall,
        fields=out["fields"],
        var_regions=size * len(config.variables),
        bytes_fetched=out["bytes_fetched"],
        bytes_served=served,
        requests_served=requests,
        archive_bytes=_archive_bytes(manifest, size, config.first_init),
        bytes_written=out["bytes_written"],
        server_cpu_seconds=server.cpu_seconds() - cpu_before,
        peak_rss_per_worker={"naive-process": int(out["peak_rss"])},
        worker_cpu_seconds=float(out["cpu_seconds"]),
        worker_system_seconds=float(out["system_seconds"]),
        worker_threads=1,
        files_ok=out["fields"],
    )


# --------------------------------------------------------------------------------------------------
# (4) the machine's bound: decode + rounding + compression per field, on one core


def measure_bound(config: BenchConfig, manifest: Any) -> dict[str, Any]:
    """Per-field seconds of the unavoidable work, measured here on one core, one variable at a time."""
    import numpy as np
    import zarr
    import zarr.storage
    from zarr.codecs import BloscCodec

    from reformatters.common.binary_rounding import round_float32_inplace
    from reformatters.pipeline.kernels import limit_library_threads
    from reformatters.sources.grib_decode import decode_message
    from reformatters.sources.grib_index import find_message, parse_ncep_idx

    limit_library_threads()
    by_name = _dataset_vars(config.dataset)
    step_text = _step_text(config.dataset)
    grid = _dataset_grid(config.dataset)
    per_variable: dict[str, dict[str, float]] = {}
    for name in config.variables:
        var = by_name[name]
        messages: list[bytes] = []
        for lead in config.leads:
            step = step_text(var, lead)
            if step is None:
                continue
            path = manifest.path(config.first_init, lead)
            entries = parse_ncep_idx(Path(f"{path}.idx").read_text())
            entry = find_message(entries, var.internal_attrs.grib_element, var.internal_attrs.grib_level, step)
            with open(path, "rb") as f:
                f.seek(entry.start)
                messages.append(f.read() if entry.end is None else f.read(entry.end - entry.start))
        depth = min(config.bound_fields, var.encoding.chunks[1])  # one chunk deep along lead time
        cube = np.empty((1, depth, grid.nj, grid.ni), dtype=np.float32)
        decode_seconds: list[float] = []
        round_seconds: list[float] = []
        for i in range(depth):
            message = messages[i % len(messages)]
            t0 = time.perf_counter()
            values = decode_message(message, grid)
            t1 = time.perf_counter()
            keep = var.internal_attrs.keep_mantissa_bits
            if isinstance(keep, int):
                round_float32_inplace(values, keep)
            t2 = time.perf_counter()
            cube[0, i] = values
            if i < len(messages):
                decode_seconds.append(t1 - t0)
                round_seconds.append(t2 - t1)
        encoding = var.encoding
        chunks = (1, depth, *encoding.chunks[2:])
        shards = (1, depth, *(encoding.shards or encoding.chunks)[2:])
        compressors = [BloscCodec(cname=c.cname, clevel=c.clevel, shuffle=c.shuffle) for c in encoding.compressors]
        store = zarr.storage.MemoryStore()
        array = zarr.create_array(
            store,
            shape=cube.shape,
            chunks=chunks,
            shards=shards,
            dtype="float32",
            compressors=compressors,
            fill_value=float("nan"),
        )
        t0 = time.perf_counter()
        array[...] = cube
        compress_seconds = (time.perf_counter() - t0) / depth
        per_variable[name] = {
            "decode_seconds": statistics.median(decode_seconds),
            "round_seconds": statistics.median(round_seconds),
            "compress_seconds": compress_seconds,
            "message_bytes": statistics.median(len(m) for m in messages),
        }
        del cube, store, array
    fields_per_var = {name: present_fields([name], config.leads, 1, config.dataset) for name in config.variables}
    total_fields = sum(fields_per_var.values())
    per_field = (
        sum(
            fields_per_var[name] * (p["decode_seconds"] + p["round_seconds"] + p["compress_seconds"])
            for name, p in per_variable.items()
        )
        / total_fields
    )
    cores = int(_cpu_count())
    return {
        "per_variable": per_variable,
        "seconds_per_field_one_core": per_field,
        "cores": cores,
        "fields_per_second": cores / per_field,
    }


def _dataset_grid(dataset: str) -> Any:
    if dataset == HRRR_ID:
        from reformatters_datasets.noaa.hrrr.forecast_48_hour.template_config import GRID as HRRR_GRID

        return HRRR_GRID
    from reformatters_datasets.noaa.gfs.forecast.region_job import GRID

    return GRID


def combine_bounds(bounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One bound from several measurements of it: the mean per-field cost, each measurement kept."""
    samples = [float(b["seconds_per_field_one_core"]) for b in bounds]
    per_field = statistics.fmean(samples)
    cores = int(bounds[0]["cores"])
    return {
        "per_variable": bounds[0]["per_variable"],
        "per_variable_all": [b["per_variable"] for b in bounds],
        "samples_seconds_per_field": samples,
        "seconds_per_field_one_core": per_field,
        "cores": cores,
        "fields_per_second": cores / per_field,
    }


def _own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _cpu_count() -> int:
    import dask.system

    return int(dask.system.CPU_COUNT)


# --------------------------------------------------------------------------------------------------
# Derived numbers


def split_cost(small: RunResult, large: RunResult) -> dict[str, Any]:
    """Fixed cost of a run and marginal (warm) throughput from two sizes of the same work."""
    extra_seconds = large.wall_seconds - small.wall_seconds
    extra_inits = large.size - small.size
    per_init = extra_seconds / extra_inits
    usable = extra_seconds > 0
    return {
        "marginal_seconds_per_init": per_init,
        "fixed_seconds": small.wall_seconds - small.size * per_init,
        "marginal_fields_per_second": (large.fields - small.fields) / extra_seconds if usable else float("nan"),
        "marginal_var_regions_per_second": (
            (large.var_regions - small.var_regions) / extra_seconds if usable else float("nan")
        ),
        "marginal_output_mb_per_second": (
            (large.bytes_written - small.bytes_written) / MB / extra_seconds if usable else float("nan")
        ),
        # CPU is steadier than wall on a shared VM: what the extra fields cost every process of the run.
        "marginal_cpu_ms_per_field": {
            part: 1000 * (_cpu_of(large, part) - _cpu_of(small, part)) / max(1, large.fields - small.fields)
            for part in ("workers", "driver", "server")
        },
    }


def _cpu_of(run: RunResult, part: str) -> float:
    return {
        "workers": run.worker_cpu_seconds,
        "driver": run.driver_cpu_seconds,
        "server": run.server_cpu_seconds,
    }[part]


def derive(
    runs: Sequence[RunResult],
    bound: Mapping[str, Any] | None,
    bound_by_mode: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Marginal and fixed costs per mode, and the ratios between them; each mode against the bound measured
    around its own runs when `bound_by_mode` has it, else against `bound`."""
    by_mode: dict[str, list[RunResult]] = {}
    for run in runs:
        by_mode.setdefault(run.mode, []).append(run)
    derived: dict[str, Any] = {}
    for mode, mode_runs in by_mode.items():
        mode_runs.sort(key=lambda r: r.size)
        if len(mode_runs) >= 2:
            derived[mode] = split_cost(mode_runs[0], mode_runs[-1])
    for mode, d in derived.items():
        if "naive" in derived and mode != "naive":
            d["speedup_over_naive"] = d["marginal_fields_per_second"] / derived["naive"]["marginal_fields_per_second"]
        mode_bound = (bound_by_mode or {}).get(mode, bound)
        if mode_bound is not None:
            d["efficiency_vs_bound"] = d["marginal_fields_per_second"] / mode_bound["fields_per_second"]
            used = sum(d["marginal_cpu_ms_per_field"].values()) / 1000
            d["cpu_efficiency_vs_bound"] = mode_bound["seconds_per_field_one_core"] / used if used > 0 else float("nan")
            d["bound_ms_per_field"] = 1000 * mode_bound["seconds_per_field_one_core"]
    goals: dict[str, Any] = {}
    pipelined = derived.get("pipelined")
    if pipelined is not None:
        if "speedup_over_naive" in pipelined:
            goals["speedup_over_naive_ge_5"] = pipelined["speedup_over_naive"] >= 5
        if "efficiency_vs_bound" in pipelined:
            goals["efficiency_vs_bound_ge_0.7"] = pipelined["efficiency_vs_bound"] >= 0.7
        if "staged" in derived:
            staged = derived["staged"]
            both_measured = staged["marginal_seconds_per_init"] > 0 and pipelined["marginal_seconds_per_init"] > 0
            pipelined["overlap_gain_over_staged"] = (
                staged["marginal_seconds_per_init"] / pipelined["marginal_seconds_per_init"]
                if both_measured
                else float("nan")
            )
            pipelined["overlap_seconds_saved_per_init"] = (
                staged["marginal_seconds_per_init"] - pipelined["marginal_seconds_per_init"]
            )
        goals["fixed_cost_lt_8s"] = pipelined["fixed_seconds"] < 8
        peaks = {r.size: r.peak_rss_max for r in by_mode["pipelined"]}
        goals["peak_rss_per_worker_le_1.5GB"] = max(peaks.values()) <= 1.5e9
        goals["peak_rss_by_size"] = {str(k): v for k, v in sorted(peaks.items())}
    derived["goals"] = goals
    return derived


# --------------------------------------------------------------------------------------------------
# Report


def machine_description() -> dict[str, Any]:
    from importlib.metadata import version

    memory = psutil.virtual_memory().total
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": _cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "dask": version("dask"),
        "distributed": version("distributed"),
        "zarr": version("zarr"),
        "platform": platform.platform(),
    }


def render_table(report: Mapping[str, Any]) -> str:
    runs = [RunResult(**{k: v for k, v in r.items() if k != "peak_rss_max"}) for r in report["runs"]]
    derived = report["derived"]
    lines = [
        "| mode | inits | wall s | fields | var-regions | fetched MB / archive MB | written MB | "
        "peak RSS/worker MB | tasks | mean task s | worker CPU s (system) | driver CPU s | server CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r.mode} | {r.size} | {r.wall_seconds:.1f} | {r.fields} | {r.var_regions} | "
            f"{r.bytes_served / MB:.0f} / {r.archive_bytes / MB:.0f} | {r.bytes_written / MB:.0f} | "
            f"{r.peak_rss_max / MB:.0f} | {r.tasks or '-'} | "
            f"{r.mean_task_seconds:.3f} | {r.worker_cpu_seconds:.1f} ({r.worker_system_seconds:.1f}) | "
            f"{r.driver_cpu_seconds:.1f} | {r.server_cpu_seconds:.1f} |"
        )
    lines += [
        "",
        "| mode | fixed s | marginal s/init | marginal fields/s | var-regions/s | output MB/s | vs naive | "
        "bound ms/field | vs bound | overlap gain | marginal CPU ms/field (workers + driver + server) | bound / CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in (*MODES, *EXTRA_MODES):
        d = derived.get(mode)
        if d is None:
            continue
        speedup = f"{d['speedup_over_naive']:.1f}x" if "speedup_over_naive" in d else "-"
        efficiency = f"{100 * d['efficiency_vs_bound']:.0f} %" if "efficiency_vs_bound" in d else "-"
        mode_bound = f"{d['bound_ms_per_field']:.1f}" if "bound_ms_per_field" in d else "-"
        overlap = f"{d['overlap_gain_over_staged']:.2f}x" if "overlap_gain_over_staged" in d else "-"
        cpu = d["marginal_cpu_ms_per_field"]
        cpu_parts = f"{sum(cpu.values()):.1f} ({cpu['workers']:.1f} + {cpu['driver']:.1f} + {cpu['server']:.1f})"
        cpu_efficiency = f"{100 * d['cpu_efficiency_vs_bound']:.0f} %" if "cpu_efficiency_vs_bound" in d else "-"
        lines.append(
            f"| {mode} | {d['fixed_seconds']:.1f} | {d['marginal_seconds_per_init']:.1f} | "
            f"{d['marginal_fields_per_second']:.1f} | {d['marginal_var_regions_per_second']:.2f} | "
            f"{d['marginal_output_mb_per_second']:.1f} | {speedup} | {mode_bound} | {efficiency} | {overlap} | "
            f"{cpu_parts} | {cpu_efficiency} |"
        )
    bound = report.get("bound")
    if bound is not None:
        samples = ", ".join(f"{1000 * seconds:.1f}" for seconds in bound.get("samples_seconds_per_field", ()))
        lines += [
            "",
            f"Machine bound: {1000 * bound['seconds_per_field_one_core']:.1f} ms per field on one core "
            f"(decode + rounding + compression; mean of the measurements before, between and after the modes' "
            f"runs: {samples}) x {bound['cores']} cores = {bound['fields_per_second']:.1f} fields/s. "
            "Each mode's 'vs bound' and 'bound / CPU' use the two measurements around its own runs.",
        ]
    goals = derived.get("goals", {})
    if goals:
        lines.append("Goals: " + ", ".join(f"{k}={v}" for k, v in goals.items() if isinstance(v, bool)))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Entry points


RUNNERS: dict[str, Callable[[BenchConfig, int, ServerProcess, Any, Path], RunResult]] = {
    "pipelined": run_pipelined,
    "read-tasks": functools.partial(run_pipelined, read_tasks=True),
    "staged": run_staged,
    "naive": run_naive,
    "icechunk": functools.partial(run_pipelined, store_format="icechunk"),
}


def prepare_archive(config: BenchConfig) -> Any:
    from reformatters.testing.noaa_archive import generate_gfs_archive, generate_hrrr_archive

    generate = generate_hrrr_archive if config.dataset == HRRR_ID else generate_gfs_archive
    return generate(
        config.init_times,
        config.leads,
        variables=config.variables,
        filler_ratio=config.filler_ratio,
        workers=max(1, _cpu_count()),
    )


def _warm_page_cache(manifest: Any) -> None:
    for f in manifest.files:
        path = manifest.root / f.path
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def config_problem(config: BenchConfig) -> str | None:
    """What makes `config` unusable, or None."""
    if len(set(config.sizes)) < 2:
        return (
            f"sizes {list(config.sizes)}: give at least two different ones (e.g. 1,3) so the fixed cost and the "
            "marginal throughput separate"
        )
    if config.dataset not in (GFS_ID, HRRR_ID):
        return f"unknown dataset {config.dataset!r}; choose {GFS_ID} or {HRRR_ID}"
    modes, label = (HRRR_MODES, "HRRR") if config.dataset == HRRR_ID else ((*MODES, *EXTRA_MODES), "GFS")
    unknown = set(config.modes) - set(modes)
    if unknown:
        return f"unknown modes {sorted(unknown)} for {label}; choose from {', '.join(modes)}"
    known_variables = _dataset_vars(config.dataset)
    unknown = set(config.variables) - set(known_variables)
    if unknown or not config.variables:
        return f"unknown or no variables {sorted(unknown)}; choose {label} variables from {', '.join(known_variables)}"
    if not config.leads:
        return "no lead hours: give some, e.g. --leads 0-48"
    if config.repeat < 1:
        return f"--repeat {config.repeat}: run each mode and size at least once"
    return None


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    problem = config_problem(config)
    if problem is not None:
        raise ValueError(problem)
    started = time.perf_counter()
    log(f"archive: {len(config.init_times)} inits x {len(config.leads)} leads x {len(config.variables)} variables")
    quiet_source_warnings()
    manifest = prepare_archive(config)
    _warm_page_cache(manifest)
    log(f"archive ready at {manifest.root} ({sum(f.size for f in manifest.files) / 1e9:.2f} GB)")
    log("measuring the machine's bound on one core")
    # This VM's speed per core drifts within minutes: each mode's sizes run back to back, between two
    # measurements of the bound, and the mode is judged against their mean.
    bound_samples = [measure_bound(config, manifest)]
    bound_by_mode: dict[str, dict[str, Any]] = {}
    runs: list[RunResult] = []
    with ExitStack() as stack:
        work = Path(config.workdir) if config.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(serve(manifest.root))
        for mode in config.modes:
            for size in sorted(set(config.sizes)):
                log(f"{mode}: {size} init(s)")
                repetitions = [RUNNERS[mode](config, size, server, manifest, work) for _ in range(config.repeat)]
                # The fastest repetition is the one least disturbed by whatever else shares the machine.
                run = min(repetitions, key=lambda r: r.wall_seconds)
                run.wall_seconds_all = [r.wall_seconds for r in repetitions]
                walls = ", ".join(f"{w:.1f}" for w in run.wall_seconds_all)
                log(f"  {walls} s, peak worker RSS {run.peak_rss_max / MB:.0f} MB")
                runs.append(run)
            log(f"measuring the machine's bound again (after {mode})")
            bound_samples.append(measure_bound(config, manifest))
            bound_by_mode[mode] = combine_bounds(bound_samples[-2:])
    bound = combine_bounds(bound_samples)
    report: dict[str, Any] = {
        "benchmark_version": BENCHMARK_VERSION,
        "machine": machine_description(),
        "config": {
            "dataset": config.dataset,
            "sizes": list(config.sizes),
            "leads": list(config.leads),
            "variables": list(config.variables),
            "modes": list(config.modes),
            "filler_ratio": config.filler_ratio,
            "n_workers": config.n_workers,
            "repeat": config.repeat,
            "archive_root": str(manifest.root),
            "archive_bytes": sum(f.size for f in manifest.files),
            "archive_files": len(manifest.files),
        },
        "bound": bound,
        "bound_by_mode": bound_by_mode,
        "runs": [{**asdict(r), "peak_rss_max": r.peak_rss_max} for r in runs],
        "derived": {},
        "total_seconds": 0.0,
    }
    report["derived"] = derive(runs, bound, bound_by_mode)
    report["total_seconds"] = time.perf_counter() - started
    return report


def _parse_ints(text: str) -> tuple[int, ...]:
    values: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = part.split("-", 1)
                values.extend(range(int(low), int(high) + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers and ranges, e.g. 0-48 or 0,1,2,6") from None
    return tuple(values)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_parse_ints, default="1,3", help="init times per run, e.g. 1,3")
    parser.add_argument(
        "--leads", type=_parse_ints, default="0-48", help="lead hours in the archive, e.g. 0-48 or 0,1,2,6"
    )
    parser.add_argument("--variables", default=",".join(DEFAULT_VARIABLES), help="GFS variables, comma-separated")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated, run in this order; of {', '.join((*MODES, *EXTRA_MODES))} "
        f"(default: {', '.join(MODES)})",
    )
    parser.add_argument("--workers", type=int, default=None, help="default: what open_client('local') picks")
    parser.add_argument(
        "--filler-ratio",
        type=float,
        default=3.0,
        help="filler messages per wanted message in each file, each as large as one",
    )
    parser.add_argument(
        "--bound-fields",
        type=int,
        default=105,
        help="fields per variable in each measurement of the bound (at most 105, one lead chunk)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each mode and size; the fastest counts (default 1)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where runs write (default: a temporary directory)")
    parser.add_argument(
        "--dataset",
        default=GFS_ID,
        choices=(GFS_ID, HRRR_ID),
        help=f"the dataset whose backfill is measured; {HRRR_ID} runs the modes {', '.join(HRRR_MODES)} only",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    config = BenchConfig(
        sizes=args.sizes,
        leads=args.leads,
        variables=tuple(v.strip() for v in args.variables.split(",") if v.strip()),
        modes=(
            tuple(m.strip() for m in args.modes.split(",") if m.strip())
            if args.modes is not None
            else (HRRR_MODES if args.dataset == HRRR_ID else MODES)
        ),
        filler_ratio=args.filler_ratio,
        n_workers=args.workers,
        bound_fields=args.bound_fields,
        repeat=args.repeat,
        workdir=args.workdir,
        dataset=args.dataset,
    )
    problem = config_problem(config)
    if problem is not None:
        parser.error(problem)
    return config, args.json


def main(argv: Sequence[str] | None = None) -> int:
    config, json_path = parse_args(argv)
    report = run_benchmark(config, log=lambda message: print(message, flush=True))
    print()
    print(render_table(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nreport written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
