"""The driver finishes every region it was given, or raises: no completion order loses a region.

Regions whose source files are all missing finish in milliseconds, so their results reach the driver in
bunches: a region's later results are often done before its first one is taken from the queue. The driver
must still account for each of them, keep its window of work in flight full, and return one outcome per job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from distributed import Client, Future, LocalCluster, as_completed, wait
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.driver import RegionFailedError, RegionOutcome, run_region_jobs
from reformatters.pipeline.graph import ENCODE_RESOURCE
from reformatters.publish import tmp_metadata_store, variable_metadata

DATASET = ExampleDataset()
CONFIG = DATASET.template_config
# 40 init times at 6 h, 2 per shard: 20 regions.
END = pd.Timestamp("2024-01-11T00:00")


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            resources={ENCODE_RESOURCE: 1},
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit="2GiB",
        ) as cluster,
        Client(cluster) as dask_client,
    ):
        yield dask_client


class SiblingsFinishFirst:
    """A completion queue that hands out a finished future only once every future added so far has finished.

    When the driver takes a region's first result, all its other results are done but still queued: the
    order in which a driver that closes a region on "all futures done" skips those results and loses work.
    """

    def __init__(self) -> None:
        self._inner = as_completed()
        self._added: list[Future[Any]] = []
        self.handed_out = 0

    def add(self, future: Future[Any]) -> None:
        self._added.append(future)
        self._inner.add(future)

    def __iter__(self) -> Iterator[Future[Any]]:
        for future in self._inner:
            wait(self._added)
            self.handed_out += 1
            yield future


def _run(client: Client, tmp_path: Path, **kwargs: Any) -> tuple[list[RegionOutcome], list[int]]:
    template_ds = CONFIG.get_template(END)
    jobs = DATASET.region_job_class.get_jobs(
        template_ds, CONFIG.append_dim, CONFIG.data_vars, None, source_url=str(tmp_path / "empty-source")
    )
    (tmp_path / "empty-source").mkdir(exist_ok=True)
    assert len(jobs) == 20
    done: list[int] = []
    with tmp_metadata_store(template_ds) as tmp_store:
        var_metadata = variable_metadata(tmp_store, [v.name for v in CONFIG.data_vars])
        outcomes = run_region_jobs(
            client,
            jobs,
            var_metadata,
            ObjectStore(tmp_path / "store.zarr"),
            on_region_done=lambda outcome: done.append(outcome.index),
            **kwargs,
        )
    return outcomes, done


def test_every_region_finishes_when_siblings_finish_before_their_result_is_taken(
    client: Client, tmp_path: Path
) -> None:
    queue = SiblingsFinishFirst()
    outcomes, done = _run(client, tmp_path, completion_queue=lambda: queue, max_variables_in_flight=4)
    assert [o.index for o in outcomes] == list(range(20))
    assert sorted(done) == list(range(20))
    assert queue.handed_out == 20 * len(CONFIG.data_vars)
    for outcome in outcomes:
        assert sorted(r.var_name for r in outcome.results) == sorted(v.name for v in CONFIG.data_vars)


def test_a_queue_that_stops_early_raises_instead_of_returning_fewer_outcomes(client: Client, tmp_path: Path) -> None:
    class StopsAfterFive(SiblingsFinishFirst):
        def __iter__(self) -> Iterator[Future[Any]]:
            for count, future in enumerate(super().__iter__()):
                if count == 5:
                    return
                yield future

    with pytest.raises(RegionFailedError, match=r"regions never completed .*re-run the same command"):
        _run(client, tmp_path, completion_queue=StopsAfterFive)


@pytest.mark.parametrize("repeats", [2, pytest.param(20, marks=pytest.mark.slow)])
def test_backfill_with_every_source_file_missing_accounts_for_every_region(
    client: Client, tmp_path: Path, repeats: int
) -> None:
    (tmp_path / "empty-source").mkdir()
    address = client.scheduler.address
    for attempt in range(repeats):
        summary = DATASET.backfill(
            END,
            cluster=address,
            store_url=str(tmp_path / f"store-{attempt}.zarr"),
            source_url=str(tmp_path / "empty-source"),
            show_progress=False,
        )
        assert (summary.regions_done, summary.regions_total) == (20, 20), f"attempt {attempt}"
        assert summary.files_ok == 0


def _pid() -> int:
    import os

    return os.getpid()


def test_a_value_held_on_the_cluster_outlives_every_worker_that_held_it() -> None:
    """The job and the store a region's tasks need are results of a task (`held_on_cluster`): when every worker
    holding one dies, the scheduler runs that task again instead of cancelling what needs it (a scattered value,
    broadcast or not, is gone with its last holder)."""
    import os
    import signal

    from reformatters.pipeline.driver import held_on_cluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        value = {"job": "a region job", "bytes": b"x" * 1000}
        held = held_on_cluster(client, value)
        wait(held)
        holders = client.who_has([held])[held.key]
        pids = client.run(_pid)
        for address in holders:
            os.kill(pids[address], signal.SIGKILL)
        client.wait_for_workers(2, timeout=60)
        assert client.submit(lambda v: v["bytes"], held, pure=False).result(timeout=60) == value["bytes"]
        assert held.status == "finished"
