"""Failure policy: a bug in a hook fails the run with its traceback and publishes nothing; a task that fails once
is run again; declared source failures mark their file and the run goes on."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.testing.archive_server import ArchiveServer
from reformatters.update.progress_tracker import BACKFILL_PROGRESS_PREFIX, UpdateProgressTracker

from .buggy_dataset import BUGGY_INIT
from .conftest import (
    BASE_END,
    INITS,
    NOW,
    UpdateFixture,
    assert_same_store,
    copy_store,
    run_cli,
    store_objects,
    update_command,
)

DATASET = ExampleDataset()
BUGGY = {"REFORMATTERS_EXTRA_DATASETS": "tests.update.buggy_dataset:BuggyExampleDataset"}


def _backfill_command(store: Path, source_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reformatters.cli",
        "backfill",
        "example",
        BASE_END.isoformat(),
        "--store",
        str(store),
        "--source-url",
        source_url,
        "--workers",
        "2",
    ]


@pytest.mark.parametrize("kind", ["backfill", "update"])
def test_a_bug_in_a_hook_fails_the_run_with_its_traceback_and_publishes_nothing(
    kind: str, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    assert INITS[2] == BUGGY_INIT  # in the backfill's second region and the update's first
    if kind == "update":
        store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
        command = update_command(store, update_fixture.source)
    else:
        store = tmp_path / "store.zarr"
        command = _backfill_command(store, str(update_fixture.source))
    before = store_objects(store) if store.exists() else {}

    done = run_cli(command, env=BUGGY)

    assert done.returncode not in (0, 2, 3, 4), done.stderr[-3000:]
    assert "Traceback" in done.stderr
    assert "AttributeError" in done.stderr and "values_of_the_field" in done.stderr
    if kind == "update":
        after = store_objects(store)
        assert [key for key in before if after.get(key) != before[key]] == [], "a published object changed"
        # Regions still in flight may have uploaded shards past the published end: invisible, as no metadata
        # reaches them (the update publishes nothing once a task failed).
        published_shards = -(-3 // 2)
        assert all(int(key.split("/")[2]) >= published_shards for key in set(after) - set(before)), after.keys()
    else:
        assert not (store / "zarr.json").exists()
    if kind == "backfill":
        # The first region (work that was in flight or done) is recorded: the same command resumes from it.
        tracker = UpdateProgressTracker(str(store), "inspect", prefix=BACKFILL_PROGRESS_PREFIX)
        assert set(tracker.load("init_time-20240101T000000-20240101T060000")) == {
            "temperature_2m",
            "precipitation_surface",
        }


def test_a_download_failing_once_is_run_again_and_the_run_succeeds(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    # The first attempt's GET is cut mid-body (the HEAD before it consumes one injection): aiohttp raises, which no
    # hook declared as a source failure, so the download task fails and Dask runs it again.
    failing = source.relative_path(INITS[1], 2)
    with ArchiveServer(update_fixture.source) as server:
        server.add_fault(failing, "truncate", times=2)
        store = tmp_path / "store.zarr"
        summary = DATASET.backfill(
            BASE_END, cluster="local", store_url=str(store), source_url=server.url, n_workers=2, show_progress=False
        )
        assert server.requests[failing] == 4, "one attempt (HEAD, cut GET), then the task again"
    assert summary.files_failed == 0
    assert_same_store(store, update_fixture.base_store)
    published = DATASET.open_published(str(store))
    assert not np.isnan(published.temperature_2m.sel(init_time=INITS[1]).isel(lead_time=2).values).any()


def test_failures_over_the_threshold_publish_the_good_part_and_exit_non_zero(tmp_path: Path) -> None:
    """2 unreadable files of 18, for both variables (11.1 % > 5 %): published, then exit 4 naming the count and
    the threshold."""
    inits = INITS[:3]
    corrupt = [(inits[0], 1), (inits[1], 2)]
    src = source.generate_source(tmp_path / "source", inits, corrupt=corrupt)
    store = tmp_path / "store.zarr"
    done = run_cli([*_backfill_command(store, str(src)), "--summary", str(tmp_path / "summary.json")])
    assert done.returncode == 4, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "4 of the 36 source files due failed (11.1%" in error_lines[0], error_lines
    assert "threshold of 5%" in error_lines[0]
    published = DATASET.open_published(str(store))
    assert published.sizes["init_time"] == 3  # BASE_END: what is good is published
    assert int(published.temperature_2m.notnull().sum()) == (3 * 6 - len(corrupt)) * 16 * 32


def test_summary_tells_leads_not_due_from_failures(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    """The newest init's leads 3-5 are absent and not due at `now` (their valid time is later): "not published
    yet", not failed nor missing."""
    src = tmp_path / "source"
    shutil.copytree(update_fixture.source, src)
    for hour in (3, 4, 5):
        (src / source.relative_path(NOW, hour)).unlink()
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    summary = DATASET.update(
        cluster="local", store_url=str(store), source_url=str(src), now=NOW, n_workers=2, show_progress=False
    )
    for entry in summary.variables.values():
        assert (entry.files_not_published_yet, entry.files_not_found, entry.files_failed) == (3, 0, 0), entry
    assert summary.failed_fraction == 0.0 and not summary.too_many_failures
    assert "3 not published yet" not in summary.render_lines()[0]  # per variable 3, two variables
    assert "6 not published yet" in summary.render_lines()[0]
