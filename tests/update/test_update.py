"""The operational update on the example dataset: publish order, equality with a backfill, guards, gate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.kernels import VariableResult
from reformatters.publish import publish_metadata
from reformatters.update.drift import StructureDriftError
from reformatters.update.driver import SourceOutageError
from reformatters.update.lease import LEASE_KEY, read_lease
from reformatters.update.progress_tracker import PROGRESS_PREFIX, UpdateProgressTracker

from .conftest import (
    INITS,
    NOW,
    REPO,
    UpdateFixture,
    assert_same_store,
    cli_env,
    copy_store,
    store_objects,
    update_command,
)

DATASET = ExampleDataset()


def _update(store: Path, src: Path, now: pd.Timestamp = NOW) -> object:
    return DATASET.update(
        cluster="local", store_url=str(store), source_url=str(src), now=now, n_workers=2, show_progress=False
    )


def test_reference_update_appends_every_init_with_source_values(update_fixture: UpdateFixture) -> None:
    ds = DATASET.open_published(str(update_fixture.reference_store))
    np.testing.assert_array_equal(ds.init_time.values, INITS.values)
    for i, init in enumerate(INITS):
        for hour in source.LEAD_HOURS:
            np.testing.assert_allclose(
                ds.temperature_2m.isel(init_time=i, lead_time=hour).values, source.temperature(init, hour), rtol=1e-3
            )
    assert not ObjectStore(update_fixture.reference_store).list(PROGRESS_PREFIX), "records must go once published"
    lease = read_lease(ObjectStore(update_fixture.reference_store))
    assert lease is not None and lease.released, "the lease must be released"


def test_backfill_then_updates_equals_one_backfill(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    """backfill [a, c) == backfill [a, b) + update to an intermediate now + update to c (and one update to c)."""
    full = tmp_path / "full.zarr"
    DATASET.backfill(
        NOW + pd.Timedelta("6h"),
        cluster="local",
        store_url=str(full),
        source_url=str(update_fixture.source),
        n_workers=2,
        show_progress=False,
    )
    stepped = copy_store(update_fixture.base_store, tmp_path / "stepped.zarr")
    _update(stepped, update_fixture.source, now=INITS[4])
    assert DATASET.open_published(str(stepped)).sizes["init_time"] == 5
    _update(stepped, update_fixture.source, now=NOW)
    assert_same_store(stepped, full)
    assert_same_store(update_fixture.reference_store, full)


def test_nothing_new_at_the_source_publishes_nothing_and_exits_zero(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = copy_store(update_fixture.reference_store, tmp_path / "store.zarr")
    before = store_objects(store)
    root_mtime = (store / "zarr.json").stat().st_mtime_ns
    # Twelve hours later, nothing newer than INITS[-1] exists at the source.
    result = subprocess.run(
        update_command(store, update_fixture.source, now=NOW + pd.Timedelta("12h")),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing new to publish" in result.stderr
    assert (store / "zarr.json").stat().st_mtime_ns == root_mtime, "the root metadata must not be rewritten"
    after = store_objects(store)
    assert {k: after[k] for k in before} == before, "no published object may change"
    # Only the all-NaN shards of the positions that failed may have been written, beyond the extent.
    assert all(k.split("/")[2] == "4" for k in set(after) - set(before)), sorted(set(after) - set(before))
    assert "not uploaded, same as published" in result.stderr


def test_drift_refuses_and_lists_each_difference(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store.zarr")
    template = DATASET.template_config.get_template(INITS[3])
    drifted = template.drop_vars("precipitation_surface")
    drifted["temperature_2m"].encoding["chunks"] = (1, 6, 16, 16)
    drifted["temperature_2m"].encoding["shards"] = (2, 6, 16, 32)
    publish_metadata(drifted, store)
    before = store_objects(tmp_path / "store.zarr")
    with pytest.raises(StructureDriftError) as error:
        _update(tmp_path / "store.zarr", tmp_path / "no-source")
    message = str(error.value)
    assert "precipitation_surface: in the template, not in the published store" in message
    assert "temperature_2m: chunks template [1, 6, 8, 16] != published [1, 6, 16, 16]" in message
    assert "backfill into a new dataset version" in message
    assert store_objects(tmp_path / "store.zarr") == before
    lease = read_lease(store)
    assert lease is not None and lease.released


def test_update_of_missing_store_says_backfill_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Run `reformatters backfill example"):
        _update(tmp_path / "absent.zarr", tmp_path / "no-source")


def test_outage_fails_loudly_then_partial_outage_keeps_published_values(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    src = copy_store(update_fixture.source, tmp_path / "source")
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    newest = INITS[2]  # the newest published init, which every update reprocesses
    published = DATASET.open_published(str(store)).load()
    before = store_objects(store)

    # 1. Full outage of the newest published init, nothing newer: publishing would shorten the dataset.
    newest_dir = src / f"{newest:%Y%m%d%H}"
    stash = tmp_path / "stash"
    newest_dir.rename(stash)
    for init in INITS[3:]:
        (src / f"{init:%Y%m%d%H}").rename(tmp_path / f"later-{init:%H%d}")
    with pytest.raises(SourceOutageError, match="nothing was published and the published data is unchanged"):
        _update(store, src, now=INITS[3])
    assert store_objects(store) == before, "an outage must leave every published object as it was"

    # 2. Partial outage (leads 2-5 of the newest init gone) while the next init arrives: the next init is
    # published, the newest published init keeps its values instead of becoming NaN.
    stash.rename(newest_dir)
    for hour in range(2, 6):
        (newest_dir / f"example.f{hour:03d}.npz").unlink()
    (tmp_path / f"later-{INITS[3]:%H%d}").rename(src / f"{INITS[3]:%Y%m%d%H}")
    _update(store, src, now=INITS[3])
    after = DATASET.open_published(str(store)).load()
    assert after.sizes["init_time"] == 4
    xr.testing.assert_identical(after.isel(init_time=slice(0, 3)).drop_encoding(), published.drop_encoding())
    assert int(after.temperature_2m.isel(init_time=3).notnull().sum()) == 6 * 16 * 32


def test_progress_area_is_invisible_to_readers(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    store_path = copy_store(update_fixture.reference_store, tmp_path / "store.zarr")
    tracker = UpdateProgressTracker(str(store_path), "run-x")
    tracker.record("init_time-a-b", VariableResult("temperature_2m", [], 0, 0, 0), "digest")
    (store_path / LEASE_KEY).write_text("{}")
    assert (store_path / PROGRESS_PREFIX / "init_time-a-b" / "temperature_2m.json").exists()
    ds = xr.open_zarr(store_path)
    assert set(ds.variables) == set(DATASET.open_published(str(update_fixture.reference_store)).variables)
    group = zarr.open_group(str(store_path), mode="r")
    assert "_internal" not in dict(group.members())
    assert tracker.load("init_time-a-b")["temperature_2m"].run_id == "run-x"


def test_two_updates_started_together_one_publishes_the_other_stops(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    procs = [
        subprocess.Popen(
            update_command(store, update_fixture.source),
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    tails = [o[1][-2000:] for o in outputs]
    # 3: the other held the lease. On a loaded machine one may start only after the other finished: then it
    # finds nothing new, which is as correct (the lease's own exclusion is tested in test_publish.py).
    assert codes in ([0, 3], [0, 0]), tails
    if codes == [0, 3]:
        loser = next(o for p, o in zip(procs, outputs, strict=True) if p.returncode != 0)
        assert "another publisher is writing to" in loser[1]
    else:
        assert any("nothing new to publish" in o[1] for o in outputs), tails
    assert all("Traceback" not in o[1] for o in outputs), tails
    assert_same_store(store, update_fixture.reference_store)
