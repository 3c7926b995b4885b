"""`reformatters deploy` and what it renders: valid Kubernetes, least privilege, sized from the code, checked in.

Built-in kinds are validated offline with `kubernetes-validate` (strict: unknown fields fail) against the newest
Kubernetes version it knows; `deploy` itself runs as a subprocess against a `kubectl` stand-in on PATH that
records its arguments and input.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from reformatters.cli import app
from reformatters.cluster import CLUSTER_DIR, dask_cluster_resource, local_cluster_size
from reformatters.deploy.models import (
    BackfillSizing,
    ContainerResources,
    CronJobSpec,
    MaintenanceSpec,
    OperationalResources,
    Quantities,
    parse_quantity,
)
from reformatters.deploy.policy import PolicyViolationError, ensure_least_privilege, violations
from reformatters.deploy.render import (
    CRON_JOB_NAME_LIMIT,
    DEFAULT_IMAGE_REPOSITORY,
    READ_ONLY_CREDENTIALS_SECRET,
    SCRATCH_DIR,
    WRITE_CREDENTIALS_SECRET,
    DeployError,
    check_name,
    dataset_manifests,
    package_version,
    render,
    resolve_image,
    to_yaml,
)
from reformatters.registry import all_datasets, get_dataset

REPO = Path(__file__).resolve().parents[1]
RENDERED_DIR = REPO / "cluster" / "rendered"
K8S_VERSION = kubernetes_validate.utils.latest_version()
DEPLOYED = [
    "ecmwf-ifs-ens-forecast-15-day-0-25-degree",
    "noaa-gefs-analysis",
    "noaa-gefs-forecast-35-day",
    "noaa-gfs-forecast",
    "noaa-hrrr-forecast-48-hour",
]
RERENDER = "reformatters deploy --output-dir cluster/rendered"


@pytest.fixture(autouse=True)
def _no_image_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFORMATTERS_IMAGE", raising=False)


def rendered() -> dict[str, list[dict[str, Any]]]:
    return render(all_datasets(), resolve_image())


def all_manifests() -> list[dict[str, Any]]:
    return [m for manifests in rendered().values() for m in manifests]


def k8s_errors(manifest: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{manifest['kind']} {manifest['metadata']['name']}: {error.message} at {list(error.path)}"
    return None


def as_pod(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pod"}, "spec": pod_spec}


# ---- what is rendered ----


def test_every_deployed_dataset_renders_its_two_cronjobs_and_the_namespace_policy() -> None:
    result = rendered()
    assert sorted(result) == sorted(["namespace", *DEPLOYED])  # the example dataset declares none
    for dataset_id in DEPLOYED:
        names = [(m["kind"], m["metadata"]["name"]) for m in result[dataset_id]]
        assert names == [("CronJob", f"{dataset_id}-update"), ("CronJob", f"{dataset_id}-validate")]
    assert [(m["kind"], m["metadata"]["name"]) for m in result["namespace"]] == [
        ("NetworkPolicy", "reformatters-namespace-only")
    ]


def test_every_rendered_manifest_is_valid_kubernetes() -> None:
    manifests = all_manifests()
    assert len(manifests) == 1 + 2 * len(DEPLOYED)
    assert [k8s_errors(m) for m in manifests] == [None] * len(manifests)
    # The DaskCluster's pods, as the operator creates them, validated as Pods.
    for dataset_id in DEPLOYED:
        resource = dask_cluster_resource(sizing=get_dataset(dataset_id).operational_resources().backfill)
        for role in ("scheduler", "worker"):
            assert k8s_errors(as_pod(resource["spec"][role]["spec"])) is None, (dataset_id, role)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda m: m["spec"].__setitem__("concurencyPolicy", "Forbid"), "concurencyPolicy"),
        (lambda m: m["spec"].__setitem__("startingDeadlineSeconds", "1800"), "1800"),
        (lambda m: container(m)["resources"]["limits"].__setitem__("cpu", ["2"]), "cpu"),
        (lambda m: container(m)["securityContext"].__setitem__("readOnlyRootFs", True), "readOnlyRootFs"),
    ],
    ids=["misspelt-field", "string-for-int", "list-quantity", "misspelt-security-field"],
)
def test_strict_validation_rejects_a_broken_cronjob(breakage: Callable[[dict[str, Any]], None], expected: str) -> None:
    broken = copy.deepcopy(rendered()["noaa-gfs-forecast"][0])
    breakage(broken)
    error = k8s_errors(broken)
    assert error is not None and expected in error, error


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    pod = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    result: dict[str, Any] = pod["containers"][0]
    return result


def pod_of(manifest: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return result


def cli_options(command_name: str) -> set[str]:
    group: Any = typer.main.get_command(app)
    return {opt for param in group.commands[command_name].params for opt in param.opts}


@pytest.mark.parametrize("dataset_id", DEPLOYED)
def test_cronjobs_run_the_right_command_with_what_they_need(dataset_id: str) -> None:
    update, validate = rendered()[dataset_id]
    for manifest, command, secret in (
        (update, "update", WRITE_CREDENTIALS_SECRET),
        (validate, "validate", READ_ONLY_CREDENTIALS_SECRET),
    ):
        spec = manifest["spec"]
        assert spec["concurrencyPolicy"] == "Forbid" and spec["suspend"] is False
        assert spec["startingDeadlineSeconds"] > 0 and spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
        box = container(manifest)
        argv = [*box["command"], *box["args"]]
        assert argv[:3] == ["reformatters", command, dataset_id]
        passed = {a for a in argv[3:] if a.startswith("--")}
        assert passed and passed <= cli_options(command), passed
        env = {e["name"]: e for e in box["env"]}
        assert env["CRON_JOB_NAME"]["value"] == manifest["metadata"]["name"]
        assert set(re.findall(r"\$\((\w+)\)", " ".join(argv))) <= set(env)
        # Credentials: validation reads with a read-only key; no job has them in its environment.
        volumes = {v["name"]: v for v in pod_of(manifest)["volumes"]}
        assert [v["secret"]["secretName"] for v in volumes.values() if "secret" in v] == [secret]
        assert not [e for e in box["env"] if "secretKeyRef" in e.get("valueFrom", {})] and "envFrom" not in box
        credentials_file = env["AWS_SHARED_CREDENTIALS_FILE"]["value"]
        mounts = [m for m in box["volumeMounts"] if "secret" in volumes[m["name"]]]
        assert len(mounts) == 1 and mounts[0]["readOnly"] and credentials_file.startswith(mounts[0]["mountPath"] + "/")
        scratch = [v for v in volumes.values() if "emptyDir" in v]
        assert len(scratch) == 1 and parse_quantity(scratch[0]["emptyDir"]["sizeLimit"]) <= parse_quantity(
            box["resources"]["limits"]["ephemeral-storage"]
        )
        assert env["HOME"]["value"] == env["TMPDIR"]["value"] == env["DASK_TEMPORARY_DIRECTORY"]["value"] == SCRATCH_DIR
    # A validation follows each update, after it had time to publish and before the next one.
    update_fields, validate_fields = update["spec"]["schedule"].split(), validate["spec"]["schedule"].split()
    update_minutes = [int(h) * 60 + int(update_fields[0]) for h in update_fields[1].split(",")]
    validate_minutes = [int(h) * 60 + int(validate_fields[0]) for h in validate_fields[1].split(",")]
    period = 24 * 60 // len(update_minutes)
    assert len(validate_minutes) == len(update_minutes)
    for start in update_minutes:
        assert any(30 <= (v - start) % (24 * 60) < period for v in validate_minutes), (start, validate_minutes)
    assert update["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < period * 60


def variable_region_bytes(dataset_id: str) -> int:
    """One variable-region as float32: one shard along the append dimension x every other dimension, whole."""
    config = get_dataset(dataset_id).template_config
    sizes = {dim: len(values) for dim, values in config.dimension_coordinates().items()}
    var = config.data_vars[0]
    shard_append = var.encoding.shards[list(config.dims).index(config.append_dim)]
    other = 1
    for dim in config.dims:
        if dim != config.append_dim:
            other *= sizes[dim]
    return int(shard_append * other * 4)


# The GFS benchmark (README): peak RSS per worker 1.29-1.61 GB for a variable-region of 868 MB.
PEAK_OVER_REGION = 1.61 / 0.868


def takes_the_scratch_path(dataset_id: str) -> bool:
    threshold = get_dataset(dataset_id).region_job_class.scratch_region_bytes
    return threshold is not None and variable_region_bytes(dataset_id) >= threshold


@pytest.mark.parametrize("dataset_id", [d for d in DEPLOYED if takes_the_scratch_path(d)])
def test_scratch_path_pods_hold_a_variable_region_on_disk_not_in_memory(dataset_id: str) -> None:
    """benchmarks/gefs_scratch.py: ~0.18 GB of anonymous memory per worker whatever the region; the region itself
    (padded to whole shards) and its encoded shards go to the scratch volume."""
    resources = get_dataset(dataset_id).operational_resources()
    region = variable_region_bytes(dataset_id)
    for name, spec, workers in (
        ("update", resources.update, resources.update.workers or 1),
        ("backfill", resources.backfill, 1),
    ):
        scratch = float(parse_quantity(spec.scratch_size_limit))
        assert scratch >= 1.5 * region * workers, (name, scratch / 1e9, region / 1e9)
        memory = float(parse_quantity(spec.resources.limits.memory))
        assert 2**30 * workers <= memory <= 16 * 2**30, (name, memory / 2**30)


@pytest.mark.parametrize("dataset_id", [d for d in DEPLOYED if not takes_the_scratch_path(d)])
def test_pods_are_sized_from_the_variable_region_not_guessed(dataset_id: str) -> None:
    resources = get_dataset(dataset_id).operational_resources()
    region = variable_region_bytes(dataset_id)
    need, ceiling = PEAK_OVER_REGION * region, 3 * region + 2**30
    # The update pod's LocalCluster splits 80 % of the pod's memory between its workers.
    memory = float(parse_quantity(resources.update.resources.limits.memory))
    per_worker = memory * 0.8 / resources.update.workers
    assert need <= per_worker <= ceiling, (dataset_id, region / 1e9, per_worker / 1e9)
    assert float(parse_quantity(resources.update.resources.limits.cpu)) >= resources.update.workers
    from dask.utils import parse_bytes

    dask_limit = parse_bytes(resources.backfill.dask_memory_limit)
    assert need <= dask_limit <= ceiling, (dataset_id, region / 1e9, dask_limit / 1e9)
    if dataset_id == "noaa-gfs-forecast":  # not the 24 GiB the hand-written CronJob asked for
        assert memory <= 8 * 2**30


def test_local_cluster_in_the_update_pod_gets_the_workers_the_cronjob_names() -> None:
    update = rendered()["noaa-gfs-forecast"][0]
    args = container(update)["args"]
    workers = int(args[args.index("--workers") + 1])
    assert local_cluster_size(workers)[0] == workers


# ---- least privilege ----


def test_nothing_rendered_breaks_the_least_privilege_policy() -> None:
    manifests = all_manifests()
    clusters = [dask_cluster_resource(sizing=get_dataset(d).operational_resources().backfill) for d in DEPLOYED]
    assert [violations(m) for m in [*manifests, *clusters]] == [[]] * (len(manifests) + len(clusters))
    policy = rendered()["namespace"][0]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "reformatters"}}
    same_namespace, operator = policy["spec"]["ingress"]
    assert same_namespace == {"from": [{"podSelector": {}}]}
    assert "podSelector" not in operator["from"][0] and {p["port"] for p in operator["ports"]} == {8786, 8787}
    # The DaskCluster's pods carry the label the policy selects.
    cluster = clusters[0]
    for role in ("scheduler", "worker"):
        assert cluster["spec"][role]["metadata"]["labels"]["app.kubernetes.io/name"] == "reformatters"


def _ctx(m: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = container(m)["securityContext"]
    return result


def _env(m: dict[str, Any], name: str) -> None:
    container(m)["env"] = [e for e in container(m)["env"] if e["name"] != name]


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "run-as-root": (
        lambda m: (_ctx(m).__setitem__("runAsUser", 0), pod_of(m)["securityContext"].pop("runAsUser")),
        "runAsUser",
    ),
    "no-run-as-non-root": (
        lambda m: (_ctx(m).pop("runAsNonRoot"), pod_of(m)["securityContext"].pop("runAsNonRoot")),
        "runAsNonRoot",
    ),
    "writable-root": (lambda m: _ctx(m).pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
    "escalation": (lambda m: _ctx(m).__setitem__("allowPrivilegeEscalation", True), "allowPrivilegeEscalation"),
    "capabilities-kept": (lambda m: _ctx(m).pop("capabilities"), "capabilities"),
    "capability-added": (lambda m: _ctx(m)["capabilities"].__setitem__("add", ["NET_ADMIN"]), "capabilities"),
    "no-seccomp": (
        lambda m: (_ctx(m).pop("seccompProfile"), pod_of(m)["securityContext"].pop("seccompProfile")),
        "seccompProfile",
    ),
    "unconfined-seccomp": (lambda m: _ctx(m).__setitem__("seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
    "token": (lambda m: pod_of(m).pop("automountServiceAccountToken"), "automountServiceAccountToken"),
    "secret-in-env": (
        lambda m: (
            container(m)["envFrom"].append({"secretRef": {"name": "x"}})
            if "envFrom" in container(m)
            else container(m).__setitem__("envFrom", [{"secretRef": {"name": "x"}}])
        ),
        "envFrom",
    ),
    "secret-key-in-env": (
        lambda m: container(m)["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "x", "key": "k"}}}
        ),
        "AWS_SECRET_ACCESS_KEY",
    ),
    "home-on-root-fs": (
        lambda m: container(m)["env"].__setitem__(
            [e["name"] for e in container(m)["env"]].index("HOME"), {"name": "HOME", "value": "/home/app"}
        ),
        "HOME",
    ),
    "no-tmpdir": (lambda m: _env(m, "TMPDIR"), "TMPDIR"),
    "no-dask-tmp": (lambda m: _env(m, "DASK_TEMPORARY_DIRECTORY"), "DASK_TEMPORARY_DIRECTORY"),
    "scratch-read-only": (lambda m: container(m)["volumeMounts"][0].__setitem__("readOnly", True), "HOME"),
    "unbounded-scratch": (lambda m: pod_of(m)["volumes"][0]["emptyDir"].pop("sizeLimit"), "sizeLimit"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_the_policy_check_fails_when_a_setting_is_missing(name: str) -> None:
    breakage, expected = BREAKAGES[name]
    for manifest in rendered()["noaa-gfs-forecast"]:
        broken = copy.deepcopy(manifest)
        breakage(broken)
        found = violations(broken)
        assert found and any(expected in problem for problem in found), (name, found)
        with pytest.raises(PolicyViolationError, match=expected):
            ensure_least_privilege([broken])


def test_the_policy_check_covers_the_dask_cluster_pods() -> None:
    resource = dask_cluster_resource()
    for role in ("scheduler", "worker"):
        broken = copy.deepcopy(resource)
        broken["spec"][role]["spec"]["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
        assert any(role in v and "readOnlyRootFilesystem" in v for v in violations(broken)), role


# ---- names and images ----


def test_names_longer_than_their_kind_allows_are_refused_with_the_fix() -> None:
    assert check_name("CronJob", "a" * CRON_JOB_NAME_LIMIT)
    with pytest.raises(DeployError, match=r"allows 52 for a CronJob .*shorten .* by 1 characters"):
        check_name("CronJob", "a" * 53)
    assert check_name("NetworkPolicy", "a" * 63)
    with pytest.raises(DeployError, match="allows 63"):
        check_name("DaskCluster", "a" * 64)
    with pytest.raises(DeployError, match="DNS-1123"):
        check_name("CronJob", "Noaa_GFS")
    resources = get_dataset("noaa-gfs-forecast").operational_resources()
    long_id = "noaa-gfs-forecast-with-a-name-far-too-long-x"  # 44 + "-validate" = 53 characters
    with pytest.raises(DeployError, match=f"CronJob name '{long_id}-validate' is 53 characters"):
        dataset_manifests(long_id, resources, resolve_image())


def test_image_comes_from_the_flag_then_the_environment_then_the_package_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_image() == f"{DEFAULT_IMAGE_REPOSITORY}:{package_version()}"
    monkeypatch.setenv("REFORMATTERS_IMAGE", "registry.example/me/reformatters:abc123")
    assert resolve_image() == "registry.example/me/reformatters:abc123"
    assert resolve_image("registry.example/x/reformatters:def456") == "registry.example/x/reformatters:def456"
    assert resolve_image("0f1e2d3c") == f"{DEFAULT_IMAGE_REPOSITORY}:0f1e2d3c"
    assert resolve_image("registry.example:5000/r@sha256:" + "a" * 64).endswith("a" * 64)
    with pytest.raises(DeployError, match="moving tag 'latest'"):
        resolve_image("ghcr.io/me/reformatters:latest")
    with pytest.raises(DeployError, match="has no tag"):
        resolve_image("registry.example:5000/me/reformatters")
    monkeypatch.setenv("REFORMATTERS_IMAGE", "ghcr.io/me/reformatters:latest")
    with pytest.raises(DeployError, match="latest"):
        resolve_image()


def test_models_refuse_inconsistent_sizes() -> None:
    def res(memory_request: str, memory_limit: str, storage: str = "1Gi") -> ContainerResources:
        return ContainerResources(
            requests=Quantities(cpu="1", memory=memory_request, ephemeral_storage="512Mi"),
            limits=Quantities(cpu="1", memory=memory_limit, ephemeral_storage=storage),
        )

    with pytest.raises(ValueError, match="differs from its limit"):
        res("1Gi", "2Gi")
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        res("1GiB", "1GiB")
    with pytest.raises(ValueError, match="exceeds the ephemeral-storage limit"):
        CronJobSpec(
            schedule="0 * * * *",
            starting_deadline_seconds=60,
            active_deadline_seconds=60,
            resources=res("1Gi", "1Gi"),
            scratch_size_limit="2Gi",
        )
    with pytest.raises(ValueError, match="five-field"):
        CronJobSpec(
            schedule="hourly",
            starting_deadline_seconds=60,
            active_deadline_seconds=60,
            resources=res("1Gi", "1Gi"),
            scratch_size_limit="512Mi",
        )
    with pytest.raises(ValueError, match="below the container's memory limit"):
        BackfillSizing(workers=1, dask_memory_limit="2GiB", resources=res("2Gi", "2Gi"), scratch_size_limit="1Gi")
    gfs = get_dataset("noaa-gfs-forecast").operational_resources()
    with pytest.raises(ValueError, match="needs `workers`"):
        OperationalResources.model_validate(
            {
                "update": {**gfs.update.model_dump(), "workers": None},
                "validation": gfs.validation,
                "backfill": gfs.backfill,
            }
        )
    with pytest.raises(ValueError, match="frozen"):
        gfs.update.suspend = True  # type: ignore[misc]


# ---- checked in ----


def test_checked_in_manifests_are_what_the_code_renders() -> None:
    expected = {f"{stem}.yaml": to_yaml(manifests) for stem, manifests in rendered().items()}
    found = {path.name: path.read_text() for path in sorted(RENDERED_DIR.glob("*.yaml"))}
    stale = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    drifted = sorted(name for name in set(found) & set(expected) if found[name].split("\n", 1)[1] != expected[name])
    assert not (stale or missing or drifted), (
        f"cluster/rendered/ differs from what the code renders (drifted {drifted}, missing {missing}, "
        f"stale {stale}): run `{RERENDER}` (removing stale files) and commit the result"
    )
    # The checked-in files are also what the installed package ships.
    assert (CLUSTER_DIR / "rendered").is_dir()


# ---- `reformatters deploy` against a kubectl stand-in ----

KUBECTL_STAND_IN = """#!{python}
import json, os, sys
record = {{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}
with open(os.environ["KUBECTL_RECORD"], "a") as out:
    out.write(json.dumps(record) + "\\n")
sys.exit(int(os.environ.get("KUBECTL_EXIT", "0")))
"""


def run_deploy(
    args: list[str], tmp_path: Path, *, kubectl: bool = True, **extra: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if kubectl:
        stand_in = bin_dir / "kubectl"
        stand_in.write_text(KUBECTL_STAND_IN.format(python=sys.executable))
        stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k != "REFORMATTERS_IMAGE"}
    env |= {"PATH": str(bin_dir), "KUBECTL_RECORD": str(tmp_path / "kubectl.jsonl"), **extra}
    return subprocess.run(
        [sys.executable, "-m", "reformatters.cli", "deploy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def kubectl_calls(tmp_path: Path) -> list[dict[str, Any]]:
    record = tmp_path / "kubectl.jsonl"
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_deploy_applies_every_resource_through_kubectl(tmp_path: Path) -> None:
    image = "ghcr.io/me/reformatters:0123456789abcdef"
    result = run_deploy(["--docker-image", image], tmp_path)
    assert result.returncode == 0, result.stderr
    calls = kubectl_calls(tmp_path)
    assert [c["argv"] for c in calls] == [["apply", "-f", "-"]]
    applied = list(yaml.safe_load_all(calls[0]["stdin"]))
    assert sorted((m["kind"], m["metadata"]["name"]) for m in applied) == sorted(
        [("NetworkPolicy", "reformatters-namespace-only")]
        + [("CronJob", f"{d}-{c}") for d in DEPLOYED for c in ("update", "validate")]
    )
    assert {container(m)["image"] for m in applied if m["kind"] == "CronJob"} == {image}
    expected = [m for ms in render(all_datasets(), image).values() for m in ms]
    assert applied == expected


def test_deploy_dataset_id_applies_only_that_dataset(tmp_path: Path) -> None:
    result = run_deploy(
        ["--dataset-id", "noaa-hrrr-forecast-48-hour"], tmp_path, REFORMATTERS_IMAGE="r.example/x/y:abc"
    )
    assert result.returncode == 0, result.stderr
    applied = list(yaml.safe_load_all(kubectl_calls(tmp_path)[0]["stdin"]))
    assert [(m["kind"], m["metadata"]["name"]) for m in applied] == [
        ("NetworkPolicy", "reformatters-namespace-only"),
        ("CronJob", "noaa-hrrr-forecast-48-hour-update"),
        ("CronJob", "noaa-hrrr-forecast-48-hour-validate"),
    ]
    assert {container(m)["image"] for m in applied[1:]} == {"r.example/x/y:abc"}


def test_deploy_dry_run_prints_the_yaml_and_calls_no_kubectl(tmp_path: Path) -> None:
    result = run_deploy(["--dry-run", "--dataset-id", "noaa-gfs-forecast"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert kubectl_calls(tmp_path) == []
    printed = list(yaml.safe_load_all(result.stdout))
    assert printed == [*rendered()["namespace"], *rendered()["noaa-gfs-forecast"]]
    assert f":{package_version()}" in result.stdout and ":latest" not in result.stdout


@pytest.mark.parametrize(
    ("args", "kubectl", "extra", "needles"),
    [
        ([], False, {}, ["kubectl not found on PATH", "--dry-run"]),
        ([], True, {"KUBECTL_EXIT": "3"}, ["kubectl apply exited with status 3"]),
        (["--dataset-id", "example"], True, {}, ["example declares no operational resources"]),
        (["--dataset-id", "no-such-dataset"], True, {}, ["no-such-dataset"]),
        (["--docker-image", "ghcr.io/me/reformatters:latest"], True, {}, ["latest", "git rev-parse HEAD"]),
    ],
    ids=["no-kubectl", "kubectl-fails", "undeclared", "unknown", "latest"],
)
def test_deploy_failures_are_one_line(
    tmp_path: Path, args: list[str], kubectl: bool, extra: dict[str, str], needles: list[str]
) -> None:
    result = run_deploy(args, tmp_path, kubectl=kubectl, **extra)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- `backfill --cluster k8s --detach`: the driver as a Job ----


def test_detached_backfill_renders_a_valid_least_privilege_job_and_a_role_for_dask_clusters_only() -> None:
    from reformatters.deploy.backfill_job import DRIVER_ACCOUNT, detached_backfill_manifests

    args = ["backfill", "noaa-gfs-forecast", "2025-01-01T00:00", "--cluster", "k8s", "--store", "s3://b/x.zarr"]
    manifests = detached_backfill_manifests("noaa-gfs-forecast", args, resolve_image("abc123"), suffix="0a1b2c3d")
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("ServiceAccount", DRIVER_ACCOUNT),
        ("Role", DRIVER_ACCOUNT),
        ("RoleBinding", DRIVER_ACCOUNT),
        ("Job", "noaa-gfs-forecast-backfill-0a1b2c3d"),
    ]
    assert [k8s_errors(m) for m in manifests] == [None] * 4
    role = manifests[1]
    writes = {
        (group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if set(rule["verbs"]) - {"get", "list", "watch"}
    }
    assert writes == {("kubernetes.dask.org", r) for r in ("daskclusters", "daskworkergroups", "daskautoscalers")}
    assert "*" not in str(role["rules"])
    job = manifests[-1]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == DRIVER_ACCOUNT and pod["automountServiceAccountToken"] is True
    assert violations(job, token_allowed=True) == []
    # Only this Job may mount a token: without the allowance the policy refuses it.
    assert any("automountServiceAccountToken" in v for v in violations(job))
    box = pod["containers"][0]
    assert [*box["command"], *box["args"]] == ["reformatters", *args]
    assert {e["name"]: e.get("value") for e in box["env"]}["REFORMATTERS_IMAGE"] == box["image"]


def test_backfill_detach_submits_the_job_through_kubectl_and_says_how_to_follow_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "kubectl"
    stand_in.write_text(KUBECTL_STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "REFORMATTERS_IMAGE"}
    env |= {"PATH": str(bin_dir), "KUBECTL_RECORD": str(tmp_path / "kubectl.jsonl")}
    args = ["backfill", "noaa-gfs-forecast", "2025-01-01", "--cluster", "k8s", "--store", "s3://b/x.zarr"]
    extra = ["--workers", "16", "--filter-start", "2024-12-01", "--filter-contains", "2024-12-05"]
    result = subprocess.run(
        [sys.executable, "-m", "reformatters.cli", *args, *extra, "--detach", "--docker-image", "abc123"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    calls = kubectl_calls(tmp_path)
    assert [c["argv"] for c in calls] == [["apply", "-f", "-"]]
    job = list(yaml.safe_load_all(calls[0]["stdin"]))[-1]
    box = job["spec"]["template"]["spec"]["containers"][0]
    assert box["image"] == f"{DEFAULT_IMAGE_REPOSITORY}:abc123"
    argv = box["args"]
    assert argv[: len(args)] == args and "--detach" not in argv and "--docker-image" not in argv
    assert argv[argv.index("--workers") + 1] == "16" and argv[argv.index("--filter-contains") + 1] == "2024-12-05"
    name = job["metadata"]["name"]
    assert f"kubectl logs -f job/{name}" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cluster", "local", "--store", "s3://b/x.zarr", "--detach"], "needs --cluster k8s"),
        (["--cluster", "k8s", "--store", "data/x.zarr", "--detach"], "needs --store s3://"),
        (["--cluster", "k8s", "--store", "s3://b/x.zarr", "--dry-run"], "belong to --detach"),
    ],
    ids=["not-k8s", "local-store", "dry-run-alone"],
)
def test_backfill_detach_refuses_what_a_pod_cannot_do(tmp_path: Path, args: list[str], needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reformatters.cli", "backfill", "noaa-gfs-forecast", "2025-01-01", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_the_image_and_the_manifests_agree_on_user_and_scratch() -> None:
    """The manifests' runAsUser and scratch paths are the Dockerfile's; its base image is pinned, never :latest."""
    from reformatters.deploy.render import RUN_AS_USER

    dockerfile = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", b) for b in bases), bases
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.MULTILINE)
    assert users[-1] == f"{RUN_AS_USER}:{RUN_AS_USER}"
    for variable in ("HOME", "TMPDIR", "DASK_TEMPORARY_DIRECTORY"):
        assert re.search(rf"\b{variable}={re.escape(SCRATCH_DIR)}\b", dockerfile), variable
    assert "requirements.lock" in dockerfile


def test_a_dataset_published_as_icechunk_can_declare_a_maintain_cronjob() -> None:
    dataset_id = "noaa-gfs-forecast"
    resources = get_dataset(dataset_id).operational_resources()
    assert resources is not None
    update = resources.update
    maintenance = MaintenanceSpec(
        schedule="17 4 * * *",
        starting_deadline_seconds=600,
        active_deadline_seconds=3600,
        resources=update.resources,
        scratch_size_limit=update.scratch_size_limit,
        older_than="3d",
        grace="12h",
    )
    manifests = dataset_manifests(dataset_id, resources.model_copy(update={"maintenance": maintenance}), "img:1")
    assert [m["metadata"]["name"] for m in manifests] == [
        f"{dataset_id}-{c}" for c in ("update", "validate", "maintain")
    ]
    maintain = manifests[2]
    assert k8s_errors(maintain) is None
    assert maintain["spec"]["schedule"] == "17 4 * * *" and maintain["spec"]["concurrencyPolicy"] == "Forbid"
    box = container(maintain)
    argv = [*box["command"], *box["args"]]
    assert argv == [
        "reformatters",
        "maintain",
        dataset_id,
        "--store",
        "$(REFORMATTERS_STORE)",
        "--older-than",
        "3d",
        "--grace",
        "12h",
    ]
    assert {a for a in argv if a.startswith("--")} <= cli_options("maintain")
    secrets = [v["secret"]["secretName"] for v in pod_of(maintain)["volumes"] if "secret" in v]
    assert secrets == [WRITE_CREDENTIALS_SECRET]  # it deletes objects
    assert violations(maintain) == []
    # Datasets declare none by default: their stores are plain Zarr.
    assert resources.maintenance is None


def test_replicas_get_their_credentials_profile_in_every_pod_that_writes_or_checks_them_and_staging_none() -> None:
    from reformatters.deploy.backfill_job import detached_backfill_manifests
    from reformatters.deploy.staging import StagedVersion
    from reformatters.replicas import Replica

    replicas = (
        Replica(name="other-cloud", url="s3://other/x.zarr"),
        Replica(name="own", url="s3://mine/x.zarr", credentials_env_prefix="OWN_"),
        Replica(name="gcs", url="gs://bucket/x.zarr"),
    )
    expected = {
        "REFORMATTERS_REPLICA_OTHER_CLOUD_AWS_PROFILE": "replica-other-cloud",
        "OWN_AWS_PROFILE": "replica-own",
    }
    endpoints = {
        "REFORMATTERS_REPLICA_OTHER_CLOUD_AWS_ENDPOINT_URL": "replica-other-cloud-endpoint-url",
        "OWN_AWS_ENDPOINT_URL": "replica-own-endpoint-url",
    }

    def replica_env(manifest: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        pod = manifest["spec"]["template"]["spec"] if manifest["kind"] == "Job" else pod_of(manifest)
        env = pod["containers"][0]["env"]
        literal = {e["name"]: e["value"] for e in env if e["name"] in expected}
        from_config = {e["name"]: e["valueFrom"]["configMapKeyRef"]["key"] for e in env if e["name"] in endpoints}
        return literal, from_config

    resources = get_dataset("noaa-gfs-forecast").operational_resources()
    assert resources is not None
    image = resolve_image("abc123")
    for manifest in dataset_manifests("noaa-gfs-forecast", resources, image, replicas=replicas):
        assert replica_env(manifest) == (expected, endpoints)
        assert "--no-replicas" not in container(manifest)["args"]
        assert k8s_errors(manifest) is None
    staged = StagedVersion(dataset_id="noaa-gfs-forecast", version="0.3.0")
    for manifest in dataset_manifests("noaa-gfs-forecast", resources, image, staged, replicas=replicas):
        assert replica_env(manifest) == ({}, {})
        assert container(manifest)["args"][-1] == "--no-replicas"
    args = ["backfill", "noaa-gfs-forecast", "2025-01-01T00:00", "--cluster", "k8s", "--store", "s3://b/x.zarr"]
    job = detached_backfill_manifests("noaa-gfs-forecast", args, image, suffix="0a1b2c3d", replicas=replicas)[-1]
    assert replica_env(job) == (expected, endpoints)
    # A dataset that declares none renders as before: no replica variables, no flag.
    for manifest in dataset_manifests("noaa-gfs-forecast", resources, image):
        assert replica_env(manifest) == ({}, {}) and "--no-replicas" not in container(manifest)["args"]
