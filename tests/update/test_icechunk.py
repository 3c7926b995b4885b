"""Icechunk stores: backfill and update into a local repository and one on the tests' S3 server hold exactly the
objects of the plain-Zarr store of the same run, one commit on `main` per region, records beside the repository."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.icechunk_store import IcechunkCommitRefusedError, IcechunkStore, is_icechunk_url, maintain
from reformatters.common.storage import ObjectStore, open_store
from reformatters.publish import icechunk_order
from reformatters.testing.icechunk_checks import differences_from_plain
from reformatters.testing.object_store_server import S3Server
from reformatters.update.lease import COMMITS_PREFIX, read_lease

from .conftest import BASE_END, INITS, NOW, REPO, UpdateFixture, cli_env, update_command
from .snapshot_reader import digest, read

DATASET = ExampleDataset()

# backfill [INITS[0], INITS[3]): two regions; the update: INITS[2..3] (merging into the half-full shard),
# INITS[4..5], INITS[6]
EXPECTED_MESSAGES = [
    "Repository initialized",
    "create the dataset's structure (no positions yet)",
    "publish backfill of example, region init_time-20240101T000000-20240101T060000",
    "publish backfill of example, region init_time-20240101T120000-20240101T120000",
    "publish region init_time-20240101T120000-20240101T180000",
    "publish region init_time-20240102T000000-20240102T060000",
    "publish region init_time-20240102T120000-20240102T120000",
]


def _backfill_and_update(store_url: str, source: Path) -> None:
    common = {"cluster": "local", "n_workers": 2, "store_url": store_url, "source_url": str(source)}
    DATASET.backfill(BASE_END, show_progress=False, **common)  # type: ignore[arg-type]
    DATASET.update(now=NOW, show_progress=False, **common)  # type: ignore[arg-type]


def _check_repository(url: str, update_fixture: UpdateFixture) -> None:
    store = open_store(url)
    assert isinstance(store, IcechunkStore)
    assert differences_from_plain(store, ObjectStore(update_fixture.reference_store)) == []
    messages = [snapshot.message for snapshot in store.repo.ancestry(branch="main")]
    assert messages[::-1] == EXPECTED_MESSAGES
    # Lease and commit records beside the repository, none inside it.
    control = store.control_store()
    assert control.url == store.url + ".reformatters"
    lease = read_lease(control)
    assert lease is not None and lease.released
    assert len(control.list(COMMITS_PREFIX)) == len(EXPECTED_MESSAGES) - 1
    assert not [k for k in store.list() if k.startswith("_internal")]
    # What a reader opens: a read-only session on main.
    session = icechunk.Repository.open(store.storage).readonly_session(branch="main")
    ds = xr.open_zarr(session.store, consolidated=False, decode_timedelta=True)
    reference = xr.open_zarr(update_fixture.reference_store, decode_timedelta=True)
    xr.testing.assert_identical(ds.load(), reference.load())


def test_is_icechunk_url() -> None:
    assert is_icechunk_url("s3://bucket/example/v0.1.0.icechunk")
    assert is_icechunk_url("data/x.icechunk/")
    assert not is_icechunk_url("data/x.zarr")


def test_local_icechunk_backfill_and_update_equal_the_plain_store(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    url = str(tmp_path / "example.icechunk")
    _backfill_and_update(url, update_fixture.source)
    _check_repository(url, update_fixture)
    # A second update with nothing new commits nothing.
    before = [s.id for s in open_store(url).repo.ancestry(branch="main")]  # type: ignore[attr-defined]
    DATASET.update(
        cluster="local", n_workers=2, store_url=url, source_url=str(update_fixture.source), now=NOW, show_progress=False
    )
    after = [s.id for s in open_store(url).repo.ancestry(branch="main")]  # type: ignore[attr-defined]
    assert len(after) == len(before) + 1, "the newest init is re-ingested: one commit for its region"


@pytest.mark.slow  # about 30 s: two runs against the S3 server
def test_s3_icechunk_backfill_and_update_equal_the_plain_store(update_fixture: UpdateFixture, s3: S3Server) -> None:
    url = s3.url("icechunk-equality/example.icechunk")
    with s3.environment():
        _backfill_and_update(url, update_fixture.source)
        _check_repository(url, update_fixture)
    keys = s3.list_keys("icechunk-equality/")
    assert any(k.startswith("icechunk-equality/example.icechunk/snapshots/") for k in keys)
    assert any(k.startswith("icechunk-equality/example.icechunk.reformatters/_internal/") for k in keys)


def test_gcs_icechunk_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="Icechunk stores on GCS are not supported"):
        open_store("gs://bucket/example/v0.1.0.icechunk")


def test_summary_counts_committed_regions(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    url = str(tmp_path / "summary.icechunk")
    summary = DATASET.backfill(
        BASE_END,
        cluster="local",
        n_workers=2,
        store_url=url,
        source_url=str(update_fixture.source),
        show_progress=False,
        summary_path=tmp_path / "summary.json",
    )
    assert summary.regions_done == summary.regions_total == 2
    assert json.loads((tmp_path / "summary.json").read_text())["store"] == str(Path(url).absolute())
    assert pd.Timestamp(summary.published_append_dim_end) == BASE_END - pd.Timedelta("6h")


CLI = [sys.executable, "-m", "reformatters.cli"]


def _chunk_objects(repository: Path) -> set[str]:
    return {p.name for p in (repository / "chunks").iterdir()}


def test_maintain_removes_expired_snapshots_and_their_chunks_and_keeps_main(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    repository = tmp_path / "maintained.icechunk"
    _backfill_and_update(str(repository), update_fixture.source)
    store = open_store(repository)
    assert isinstance(store, IcechunkStore)
    history = list(store.repo.ancestry(branch="main"))
    # The backfill's snapshot of the half-full shard (INITS[2]) that the update rewrote.
    backfilled = next(s.id for s in history if s.message.startswith("publish backfill") and "T120000" in s.message)
    key = "temperature_2m/c/1/0/0/0"
    old_bytes = IcechunkStore(str(repository), session=store.repo.readonly_session(snapshot_id=backfilled)).get(key)
    assert old_bytes is not None
    before_ds = store.open_dataset().load()
    before_objects = {k: store.get(k) for k in store.list()}
    chunks_before = _chunk_objects(repository)

    # Nothing is old enough yet: a run now expires and deletes nothing.
    now_report = maintain(str(repository), older_than=datetime.timedelta(days=7), grace=datetime.timedelta(days=1))
    assert (now_report.expired_snapshots, now_report.deleted_chunks) == (0, 0)
    assert _chunk_objects(repository) == chunks_before

    # Eight days later: every snapshot but main's tip is expired and the chunks only they reached are deleted.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=8)
    report = maintain(
        str(repository), older_than=datetime.timedelta(days=7), grace=datetime.timedelta(days=1), now=later
    )
    assert report.expired_snapshots == len(history) - 1  # all but the tip
    assert report.deleted_snapshots == len(history) - 2  # the repository's first snapshot stays as the root
    assert report.deleted_chunks > 0
    chunks_after = _chunk_objects(repository)
    assert chunks_after < chunks_before and len(chunks_before - chunks_after) == report.deleted_chunks
    fresh = IcechunkStore(str(repository))
    assert next(s.id for s in fresh.repo.ancestry(branch="main")) == history[0].id
    with pytest.raises(Exception, match=r"(?i)not found|no such|missing|expired|snapshot"):
        IcechunkStore(str(repository), session=fresh.repo.readonly_session(snapshot_id=backfilled)).get(key)
    # What main reaches is unchanged, object by object, and reads back the same.
    assert {k: fresh.get(k) for k in fresh.list()} == before_objects
    xr.testing.assert_identical(fresh.open_dataset().load(), before_ds)
    assert differences_from_plain(fresh, ObjectStore(update_fixture.reference_store)) == []


def test_dataset_urls_and_maintain_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faulthandler

    from typer.testing import CliRunner

    from reformatters.cli import app

    # In process: the CLI's SIGUSR1 stack dump wants a real stderr file, which the runner's capture is not.
    monkeypatch.setattr(faulthandler, "register", lambda *args, **kwargs: None)
    runner = CliRunner()
    urls = runner.invoke(app, ["dataset-urls", "example", "--store-base", "s3://bucket/datasets"])
    assert urls.exit_code == 0, urls.output
    assert 'import xarray as xr\n\nds = xr.open_zarr("s3://bucket/datasets/example/v' in urls.stdout
    assert 'icechunk.s3_storage(bucket="bucket", prefix="datasets/example/' in urls.stdout
    assert 'readonly_session(branch="main")' in urls.stdout
    stores = ["--store", str(tmp_path / "x.icechunk"), "--store", str(tmp_path / "x.zarr")]
    local = runner.invoke(app, ["dataset-urls", "example", *stores])
    assert local.stdout.count("ds = xr.open_zarr(") == 2
    assert f'icechunk.local_filesystem_storage("{tmp_path / "x.icechunk"}")' in local.stdout

    refused = runner.invoke(app, ["maintain", "example", "--store", str(tmp_path / "plain.zarr")])
    assert refused.exit_code == 2 and "ending in .icechunk" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["maintain", "example", "--store", str(tmp_path / "none.icechunk")])
    assert missing.exit_code == 2 and "found none" in missing.stderr
    bad = runner.invoke(app, ["maintain", "example", "--store", str(tmp_path / "x.icechunk"), "--grace", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.stderr
    # Durations in days and hours are read as such: past the parsing, the missing repository is what stops it.
    for older_than, grace in (("7d", "1d"), ("36h", "90min"), ("1.5d", "12h")):
        parsed = runner.invoke(
            app,
            [
                "maintain",
                "example",
                "--store",
                str(tmp_path / "x.icechunk"),
                "--older-than",
                older_than,
                "--grace",
                grace,
            ],
        )
        assert parsed.exit_code == 2 and "found none" in parsed.stderr, parsed.stderr


@pytest.fixture(scope="module")
def icechunk_base(update_fixture: UpdateFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backfill of the first three inits into a local Icechunk repository (its control prefix beside it)."""
    root = tmp_path_factory.mktemp("icechunk-base")
    DATASET.backfill(
        BASE_END,
        cluster="local",
        n_workers=2,
        store_url=str(root / "base.icechunk"),
        source_url=str(update_fixture.source),
        show_progress=False,
    )
    return root / "base.icechunk"


def _copy_repository(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    shutil.copytree(Path(f"{base}.reformatters"), Path(f"{target}.reformatters"))
    return target


def _tip(url: Path) -> str:
    return str(IcechunkStore(str(url)).repo.lookup_branch("main"))


@pytest.mark.parametrize(
    ("point", "skip", "commits_before_kill"),
    [
        ("upload", 0, 0),  # a worker holds its fork: nothing committed
        ("mid_publish", 0, 0),  # the first region's metadata is in the pending session, not committed
        pytest.param("before_publish", 1, 1, marks=pytest.mark.slow),  # the first region committed, not the second
    ],
)
def test_sigkill_then_rerun_equals_an_undisturbed_update(
    point: str, skip: int, commits_before_kill: int, icechunk_base: Path, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    store = _copy_repository(icechunk_base, tmp_path / "killed.icechunk")
    base_tip = _tip(store)
    base_objects = {k: v for k, v in ((k, open_store(store).get(k)) for k in open_store(store).list())}
    marker = tmp_path / "paused"
    update = subprocess.Popen(
        update_command(store, update_fixture.source),
        cwd=REPO,
        env=cli_env(
            {
                "REFORMATTERS_TEST_PAUSE_AT": point,
                "REFORMATTERS_TEST_PAUSE_SKIP": str(skip),
                "REFORMATTERS_TEST_PAUSE_FILE": str(marker),
            }
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert update.poll() is None, f"the update exited before pausing: {update.stderr and update.stderr.read()}"
            assert time.monotonic() < deadline, "the update never reached its pause point"
            time.sleep(0.05)
    finally:
        os.killpg(update.pid, signal.SIGKILL)
        update.wait(timeout=30)

    # Only commits are visible: main moved by exactly the regions committed before the kill.
    killed = open_store(store)
    assert isinstance(killed, IcechunkStore)
    history = [s.id for s in killed.repo.ancestry(branch="main")]
    assert history[commits_before_kill] == base_tip
    if commits_before_kill == 0:
        assert {k: killed.get(k) for k in killed.list()} == base_objects, "nothing uncommitted is visible"
    assert killed.open_dataset().sizes["init_time"] == 3 + commits_before_kill

    DATASET.update(
        cluster="local",
        store_url=str(store),
        source_url=str(update_fixture.source),
        now=NOW,
        n_workers=2,
        show_progress=False,
    )
    rerun = open_store(store)
    assert differences_from_plain(rerun, ObjectStore(update_fixture.reference_store)) == []
    xr.testing.assert_identical(
        rerun.open_dataset().load(), xr.open_zarr(update_fixture.reference_store, decode_timedelta=True).load()
    )
    lease = read_lease(rerun.control_store())
    assert lease is not None and lease.released, "the re-run took over the killed run's lease and released it"


def test_two_writers_on_s3_with_the_lease_bypassed_one_commit_wins_the_other_is_refused(
    icechunk_base: Path, s3: S3Server
) -> None:
    """Two publishers of overlapping regions, no lease between them, on the S3 server: the first commit wins,
    the second is refused whole (nothing of it on main), and the winner's data is all there."""
    url = s3.url(f"conflict-{time.time_ns()}/example.icechunk")
    source = open_store(icechunk_base)
    key = "temperature_2m/c/1/0/0/0"
    with s3.environment():
        seed = IcechunkStore(url)
        seed.begin_writing()
        for name in icechunk_order(source.list()):
            seed.put(name, source.get(name))  # type: ignore[arg-type]
        seed.commit("seed: the backfill's objects")
        first, second = IcechunkStore(url), IcechunkStore(url)
        first.begin_writing()
        second.begin_writing()
        original = first.get(key)
        assert original is not None and second.get(key) == original
        # Each writes the same shard, through a fork as the workers do, merged into its pending session.
        for writer, data in ((first, b"first" * 100), (second, b"second" * 100)):
            fork = pickle.loads(writer.fork_bytes())
            IcechunkStore(url, session=fork).put(key, data)
            writer.merge([fork])
        won = first.commit("first writer's region")
        with pytest.raises(IcechunkCommitRefusedError, match="another writer committed in between") as refused:
            second.commit("second writer's region")
        assert len(str(refused.value).splitlines()) == 1
        reader = IcechunkStore(url)
        assert str(reader.repo.lookup_branch("main")) == won
        assert reader.get(key) == b"first" * 100
        assert [k for k in reader.list() if k != key] == [k for k in source.list() if k != key]
        assert all(reader.get(k) == source.get(k) for k in source.list() if k != key)
        # The refused writer cannot sneak in later either: its next session starts from a snapshot it did not read.
        with pytest.raises(IcechunkCommitRefusedError):
            second.commit("second writer, again")
        assert str(IcechunkStore(url).repo.lookup_branch("main")) == won


def _reader(store: Path, result: Path, stop: Path, seed: int) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("snapshot_reader.py")
    return subprocess.Popen(
        [sys.executable, str(script), str(store), str(result), str(stop), str(READS), str(seed)],
        cwd=REPO,
        env=cli_env(),
    )


READS = 1000


@pytest.mark.slow  # about a minute: six updates while two readers read
def test_readers_during_updates_icechunk_snapshots_are_exact_plain_zarr_is_reported(
    icechunk_base: Path, update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """Two readers, each in its own process, read at random (single chunks, slices across shards, whole variables)
    while a series of updates runs: one reads an Icechunk repository, the other the plain store of the same run.
    Every Icechunk read must succeed and equal the same read made again at the snapshot it was made on; what the
    plain-Zarr reader saw is reported."""
    ice = _copy_repository(icechunk_base, tmp_path / "read.icechunk")
    plain = tmp_path / "read.zarr"
    shutil.copytree(update_fixture.base_store, plain)
    stop = tmp_path / "stop"
    results = {"icechunk": tmp_path / "icechunk.json", "plain": tmp_path / "plain.json"}
    readers = [_reader(ice, results["icechunk"], stop, 1), _reader(plain, results["plain"], stop, 2)]
    try:
        time.sleep(2)  # both readers are reading the backfilled stores before the first update starts
        for now in INITS[4:]:
            for store in (ice, plain):
                DATASET.update(
                    cluster="local",
                    store_url=str(store),
                    source_url=str(update_fixture.source),
                    now=now,
                    n_workers=2,
                    show_progress=False,
                )
    finally:
        stop.touch()
        for reader in readers:
            reader.wait(timeout=600)

    ice_result = json.loads(results["icechunk"].read_text())
    reads = ice_result["reads"]
    errors = [r for r in reads if "error" in r]
    assert len(reads) >= READS and not errors, errors[:5]
    snapshots = {r["snapshot"] for r in reads[: ice_result["reads_before_stop"]]}
    assert len(snapshots) >= 3, "the reader saw several of the updates' commits"
    repo = IcechunkStore(str(ice)).repo
    groups: dict[str, Any] = {}
    mismatches = []
    for r in reads:
        group = groups.setdefault(
            r["snapshot"], zarr.open_group(repo.readonly_session(snapshot_id=r["snapshot"]).store, mode="r")
        )
        if digest(read(group, r["var"], r["bounds"])) != r["digest"]:
            mismatches.append(r)
    assert mismatches == []
    assert differences_from_plain(open_store(ice), ObjectStore(plain)) == []

    plain_reads = json.loads(results["plain"].read_text())
    # The plain store went through the same states as the repository's commits: a successful plain read whose
    # values equal the same read at none of them got a mix of two versions (or wrong values).
    states = [
        zarr.open_group(repo.readonly_session(snapshot_id=s.id).store, mode="r")
        for s in repo.ancestry(branch="main")
        if s.message.startswith("publish")
    ]
    seen: dict[str, Any] = {"reads": len(plain_reads["reads"]), "during_updates": plain_reads["reads_before_stop"]}
    errors_by_kind: dict[str, int] = {}
    matched, unmatched = 0, []
    for r in plain_reads["reads"]:
        if "error" in r:
            kind = r["error"].split(":")[0]
            errors_by_kind[kind] = errors_by_kind.get(kind, 0) + 1
            continue
        candidates = [g for g in states if list(g[r["var"]].shape) == r["shape"]]
        if any(digest(read(g, r["var"], r["bounds"])) == r["digest"] for g in candidates):
            matched += 1
        else:
            unmatched.append(r)
    seen.update(errors=errors_by_kind, equal_to_a_published_state=matched, equal_to_none=len(unmatched))
    print(
        f"icechunk reader: {len(reads)} reads ({ice_result['reads_before_stop']} during the updates) on "
        f"{len({r['snapshot'] for r in reads})} snapshots, 0 errors, all equal at their snapshot; plain reader: {seen}"
    )
    assert len(plain_reads["reads"]) >= READS
    assert matched + len(unmatched) + sum(errors_by_kind.values()) == len(plain_reads["reads"])


@pytest.mark.slow  # the updates' twin (two writers on S3) runs by default
def test_two_backfills_on_s3_with_the_lease_bypassed_the_second_commit_is_refused(
    update_fixture: UpdateFixture, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backfill A (a CLI process) reads `main`, merges its first region and stops right before committing it; backfill
    B of the same regions, its lease moved elsewhere (bypassed), commits every region meanwhile. A, resumed, is
    refused in one line and commits nothing; `main` holds B's commits, all of them."""
    from reformatters_datasets.example import source

    url = s3.url(f"two-backfills-{time.time_ns()}/example.icechunk")
    other_source = source.generate_source(
        tmp_path / "other-source", INITS[:3], missing=frozenset({(INITS[0], 1), (INITS[2], 2)})
    )
    marker = tmp_path / "paused"
    first = subprocess.Popen(
        [
            *CLI,
            "backfill",
            "example",
            BASE_END.isoformat(),
            "--store",
            url,
            "--source-url",
            str(update_fixture.source),
            "--workers",
            "2",
        ],
        cwd=REPO,
        env=cli_env(
            {
                **s3.env(),
                "REFORMATTERS_TEST_PAUSE_AT": "before_publish",
                "REFORMATTERS_TEST_PAUSE_MODE": "stop",
                "REFORMATTERS_TEST_PAUSE_FILE": str(marker),
            }
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert first.poll() is None, f"backfill A exited before pausing: {first.stderr and first.stderr.read()}"
            assert time.monotonic() < deadline, "backfill A never reached its pause point"
            time.sleep(0.05)
        with s3.environment():
            read_by_first = str(IcechunkStore(url).repo.lookup_branch("main"))
            monkeypatch.setattr(IcechunkStore, "control_store", lambda self: ObjectStore(self.url + ".bypassed"))
            DATASET.backfill(
                BASE_END,
                cluster="local",
                n_workers=2,
                store_url=url,
                source_url=str(other_source),
                show_progress=False,
            )
            monkeypatch.undo()
            second = IcechunkStore(url)
            history = [s.id for s in second.repo.ancestry(branch="main")]
            assert history[2] == read_by_first, "B committed its two regions on the snapshot A had read"
            objects = {k: second.get(k) for k in second.list()}
        os.killpg(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == 2, stderr[-2000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Icechunk commit refused" in error_lines[0], stderr[-2000:]
    assert "another writer committed in between" in error_lines[0]
    with s3.environment():
        after = IcechunkStore(url)
        assert [s.id for s in after.repo.ancestry(branch="main")] == history
        assert {k: after.get(k) for k in after.list()} == objects
        published = after.open_dataset()
        # B's source lacks two files: B's values (NaN there) are what main holds, not A's.
        assert np.isnan(published.temperature_2m.sel(init_time=INITS[0], lead_time="1h").values).all()
        assert not np.isnan(published.temperature_2m.sel(init_time=INITS[1], lead_time="1h").values).any()


def test_a_killed_icechunk_backfill_resumes_from_its_committed_regions(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """SIGKILL a backfill once its first region is committed; the re-run skips that region (its records are
    written only once it is committed) and ends with the objects of an undisturbed backfill."""
    store = tmp_path / "resumed.icechunk"
    marker = tmp_path / "paused"
    args = [*CLI, "-v", "backfill", "example", BASE_END.isoformat(), "--store", str(store)]
    args += ["--source-url", str(update_fixture.source), "--workers", "2"]
    killed = subprocess.Popen(
        args,
        cwd=REPO,
        env=cli_env({"REFORMATTERS_TEST_PAUSE_AT": "region_committed", "REFORMATTERS_TEST_PAUSE_FILE": str(marker)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert killed.poll() is None and time.monotonic() < deadline, "the backfill never reached its pause"
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    messages = [s.message for s in IcechunkStore(str(store)).repo.ancestry(branch="main")]
    assert messages[0] == EXPECTED_MESSAGES[2], "the first region is committed, the second is not"

    rerun = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming, 2 variable-regions already uploaded by an earlier run" in rerun.stderr, rerun.stderr[-3000:]
    resumed = open_store(store)
    assert [s.message for s in resumed.repo.ancestry(branch="main")][::-1] == EXPECTED_MESSAGES[:4]  # type: ignore[attr-defined]
    plain = tmp_path / "plain.zarr"
    DATASET.backfill(
        BASE_END,
        cluster="local",
        n_workers=2,
        store_url=str(plain),
        source_url=str(update_fixture.source),
        show_progress=False,
    )
    assert differences_from_plain(resumed, ObjectStore(plain)) == []


def test_validation_lists_the_shards_of_an_icechunk_repository(icechunk_base: Path, tmp_path: Path) -> None:
    """Icechunk lists only under a group or an array; a chunk-key prefix (`var/c/`) lists through its array."""
    store = IcechunkStore(str(icechunk_base))
    everything = store.list()
    for prefix in ("temperature_2m/c/", "temperature_2m/c/1", "temperature_2m/", "temperature_2m"):
        assert store.list(prefix) == [k for k in everything if k.startswith(prefix)]
    assert store.list("temperature_2m/c/0/")
    assert store.list("no_such_variable/c/") == []
    report = DATASET.run_validators(store_url=str(icechunk_base), now=INITS[2])
    (shards,) = [r for r in report.results if r.name.startswith("expected shards")]
    assert shards.ok and re.fullmatch(r"all [1-9]\d* shard objects present", shards.message), shards.message
