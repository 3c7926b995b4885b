"""Backfills on a cluster started with Dask's own command-line tools (`dask scheduler`, `dask worker`).

This is what `--cluster tcp://HOST:PORT` meets in production: separate worker processes (nanny +
worker) that share nothing with the driver but the network and the environment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
from distributed import Client
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.cluster import workers_have_encode_resource

INITS = pd.date_range("2024-01-01", periods=4, freq="6h")
MISSING = [(INITS[0], 4)]
CORRUPT = [(INITS[3], 1)]
STARTUP_TIMEOUT_SECONDS = 60


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)


@contextmanager
def dask_cli_cluster(workdir: Path, n_workers: int = 2, resources: str | None = "encode=1") -> Iterator[str]:
    """`dask scheduler` and `n_workers` separate `dask worker` processes on 127.0.0.1; yields the address."""
    workdir.mkdir(parents=True, exist_ok=True)
    scheduler_file = workdir / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log_name: str) -> None:
        with (workdir / log_name).open("wb") as log:
            processes.append(
                subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    try:
        start(
            [
                "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert processes[0].poll() is None, (workdir / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for index in range(n_workers):
            worker_args = ["dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "2"]
            worker_args += ["--no-dashboard", "--name", f"cli-worker-{index}", "--memory-limit", "2GiB"]
            if resources:
                worker_args += ["--resources", resources]
            start(worker_args, f"worker-{index}.log")
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=STARTUP_TIMEOUT_SECONDS)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Factory fixture: `with cli_cluster(resources=...) as address:`; processes always stopped."""

    def make(resources: str | None = "encode=1") -> object:
        return dask_cli_cluster(tmp_path / "dask-cluster", resources=resources)

    yield make


def run_backfill(address: str, source_url: str, store_url: str):  # type: ignore[no-untyped-def]
    return ExampleDataset().backfill(
        "2024-01-02",
        cluster=address,
        store_url=store_url,
        source_url=source_url,
        show_progress=False,
    )


def test_backfill_on_a_dask_cli_cluster(cli_cluster, example_source, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = example_source(INITS, missing=MISSING, corrupt=CORRUPT)
    store_url = str(tmp_path / "store.zarr")
    with cli_cluster() as address:
        with Client(address) as client:
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2
            # Two separate worker processes, each with its own address.
            assert len({w["id"] for w in workers.values()}) == 2
            assert workers_have_encode_resource(client)
        summary = run_backfill(address, src.url, store_url)
    src.check_published(xr.open_zarr(store_url, decode_timedelta=True))
    src.check_summary(summary)
    assert summary.regions_done == 2


@pytest.mark.timeout(240)
def test_workers_without_the_encode_resource_still_complete(  # type: ignore[no-untyped-def]
    cli_cluster, example_source, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tasks annotated with a resource no worker has would wait forever: the driver must notice and not ask.
    src = example_source(INITS, missing=MISSING, corrupt=CORRUPT)
    store_url = str(tmp_path / "store.zarr")
    with cli_cluster(resources=None) as address, caplog.at_level(logging.INFO, logger="reformatters.driver"):
        with Client(address) as client:
            assert not workers_have_encode_resource(client)
        summary = run_backfill(address, src.url, store_url)
    assert any("no 'encode' resource" in r.getMessage() for r in caplog.records)
    src.check_published(xr.open_zarr(store_url, decode_timedelta=True))
    src.check_summary(summary)
