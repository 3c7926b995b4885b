"""The Kubernetes manifests and the cluster choices of the CLI, checked offline.

The DaskCluster is validated against the CRD schema the dask-kubernetes wheel ships, strictly (unknown
fields rejected, as `kubectl apply` does with server-side field validation). The CronJobs go through the
Kubernetes client's own models. The CLI paths that cannot get a cluster run as real subprocesses.
"""

from __future__ import annotations

import copy
import os
import re
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask_kubernetes
import jsonschema
import pytest
import yaml

from reformatters.cluster import (
    DRIVER_LOG_LENGTHS,
    HOUSEKEEPING_INTERVALS,
    WORKER_MALLOC_ENVIRON,
    ClusterSession,
    ClusterUnavailableError,
    dask_cluster_resource,
    kubernetes_credentials_available,
    open_client,
)
from reformatters.deploy.render import DEFAULT_IMAGE_REPOSITORY, package_version
from reformatters.registry import get_dataset

DASK_K8S = Path(dask_kubernetes.__file__).parent


@pytest.fixture(autouse=True)
def _no_image_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFORMATTERS_IMAGE", raising=False)


# The operator's CRDs with every $ref resolved, as the Helm chart installs them.
CRD_CANDIDATES = [
    DASK_K8S / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml",
    DASK_K8S / "operator/customresources/daskcluster.yaml",
]


def load_crd_schema() -> dict[str, Any]:
    for path in CRD_CANDIDATES:
        if not path.exists():
            continue
        crd = yaml.safe_load(path.read_text())
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        for version in crd["spec"]["versions"]:
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if version["name"] == "v1" and schema and "$ref" not in schema:
                assert crd["spec"]["names"]["kind"] == "DaskCluster"
                return {"group": crd["spec"]["group"], "schema": schema}
    pytest.fail(f"no resolved DaskCluster v1 CRD schema in the installed dask-kubernetes ({DASK_K8S})")


def to_json_schema(node: Any, *, strict: bool = True) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema for `jsonschema`.

    `x-kubernetes-int-or-string` becomes integer|string; `x-kubernetes-preserve-unknown-fields` keeps an
    object open; other `x-kubernetes-*` keys (list/map types, validations) are dropped. With `strict`,
    objects that declare properties reject unknown fields, as the API server does under strict field
    validation: a misspelt field fails instead of being pruned silently.
    """
    if isinstance(node, list):
        return [to_json_schema(item, strict=strict) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub, strict=strict) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value, strict=strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if strict and "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator() -> Iterator[jsonschema.protocols.Validator]:
    crd = load_crd_schema()
    schema = to_json_schema(crd["schema"])
    # The API server supplies these at the root of every custom resource; the CRD schema leaves them out.
    schema["properties"] |= {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    yield cls(schema)


def validation_errors(validator: jsonschema.protocols.Validator, resource: dict[str, Any]) -> list[str]:
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
    if resource.get("apiVersion") != "kubernetes.dask.org/v1":
        problems.append(f"apiVersion {resource.get('apiVersion')!r}")
    if resource.get("kind") != "DaskCluster":
        problems.append(f"kind {resource.get('kind')!r}")
    name = resource.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r} is not a DNS-1123 label")
    return problems


def parse_quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    units |= {"k": 1e3, "M": 1e6, "G": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    match = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def option_value(args: list[str], option: str) -> str:
    assert option in args, f"{option} missing from {args}"
    return args[args.index(option) + 1]


# ---- DaskCluster ----


def test_dask_cluster_resource_validates_against_the_operator_crd(crd_validator: Any) -> None:
    resource = dask_cluster_resource()
    assert validation_errors(crd_validator, resource) == []
    # With the overrides `--cluster k8s` applies.
    custom = dask_cluster_resource(image="registry.example/reformatters:2026.5.1", n_workers=3)
    assert validation_errors(crd_validator, custom) == []
    containers = [*custom["spec"]["scheduler"]["spec"]["containers"], *custom["spec"]["worker"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {"registry.example/reformatters:2026.5.1"}
    assert custom["spec"]["worker"]["replicas"] == 3
    # Without overrides: the image `reformatters deploy` would use (this package's version), never :latest.
    plain = dask_cluster_resource()["spec"]["worker"]["spec"]["containers"][0]
    assert plain["image"] == f"{DEFAULT_IMAGE_REPOSITORY}:{package_version()}"


@pytest.mark.parametrize(
    "dataset_id",
    [
        "noaa-gfs-forecast",
        "noaa-gefs-forecast-35-day",
        "noaa-gefs-analysis",
        "noaa-hrrr-forecast-48-hour",
        "ecmwf-ifs-ens-forecast-15-day-0-25-degree",
    ],
)
def test_each_datasets_backfill_cluster_validates_and_is_sized_from_its_code(
    crd_validator: Any, dataset_id: str
) -> None:
    sizing = get_dataset(dataset_id).operational_resources().backfill
    resource = dask_cluster_resource(sizing=sizing)
    assert validation_errors(crd_validator, resource) == []
    worker = resource["spec"]["worker"]
    container = worker["spec"]["containers"][0]
    assert worker["replicas"] == sizing.workers
    assert container["resources"] == sizing.resources.as_manifest()
    assert option_value(container["args"], "--memory-limit") == sizing.dask_memory_limit
    assert option_value(container["args"], "--nthreads") == str(sizing.threads)
    assert [v["emptyDir"]["sizeLimit"] for v in worker["spec"]["volumes"] if "emptyDir" in v] == [
        sizing.scratch_size_limit
    ]
    # `backfill --workers N` wins over the dataset's default.
    assert dask_cluster_resource(sizing=sizing, n_workers=3)["spec"]["worker"]["replicas"] == 3


def test_each_k8s_backfill_gets_a_cluster_of_its_own(crd_validator: Any) -> None:
    from dask_kubernetes.operator.validation import validate_cluster_name

    renamed = dask_cluster_resource(name="reformatters-backfill-0a1b2c3d")
    assert validation_errors(crd_validator, renamed) == []
    assert renamed["metadata"]["name"] == "reformatters-backfill-0a1b2c3d"
    # The Service must follow the rename, or it selects no scheduler pod.
    assert (
        renamed["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "reformatters-backfill-0a1b2c3d"
    )
    validate_cluster_name(renamed["metadata"]["name"])


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda r: r["spec"]["worker"].__setitem__("replicas", "8"), "replicas"),
        (lambda r: r["spec"]["worker"].__setitem__("replica", 8), "replica"),
        (lambda r: r["spec"].pop("scheduler"), "scheduler"),
        (lambda r: r["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"].__setitem__("cpu", 2), "cpu"),
        (lambda r: r["spec"]["worker"]["spec"]["containers"][0].__setitem__("args", "dask worker"), "args"),
        (lambda r: r["spec"]["scheduler"]["service"]["ports"][0].__setitem__("port", "tcp"), "port"),
        (lambda r: r.__setitem__("kind", "DaskWorkerGroup"), "kind"),
        (lambda r: r["metadata"].__setitem__("name", "Reformatters_Backfill"), "metadata.name"),
    ],
    ids=[
        "replicas-string",
        "misspelt-field",
        "no-scheduler",
        "cpu-integer",
        "args-string",
        "port-string",
        "kind",
        "name",
    ],
)
def test_a_broken_dask_cluster_fails_validation(crd_validator: Any, breakage: Any, expected: str) -> None:
    broken = copy.deepcopy(dask_cluster_resource())
    breakage(broken)
    problems = validation_errors(crd_validator, broken)
    assert problems, "the broken resource passed validation"
    assert any(expected in p for p in problems), problems


def test_dask_cluster_workers_and_scheduler_are_wired_for_backfills() -> None:
    resource = dask_cluster_resource()
    name = resource["metadata"]["name"]
    scheduler = resource["spec"]["scheduler"]
    worker_container = resource["spec"]["worker"]["spec"]["containers"][0]
    args = worker_container["args"]
    assert args[:2] == ["dask", "worker"]
    assert option_value(args, "--resources") == "encode=1"
    assert option_value(args, "--nthreads") == "2"
    dask_memory = parse_quantity(option_value(args, "--memory-limit"))
    limits = worker_container["resources"]["limits"]
    requests = worker_container["resources"]["requests"]
    # One GFS variable-region (868 MB) encoding plus the next one's fields and downloads in flight: the
    # benchmark's peak RSS per worker was 1.29-1.61 GB.
    assert 1.61e9 <= dask_memory <= 4 * 2**30
    # Dask must pause/spill before the kernel OOM-kills the container.
    assert dask_memory < parse_quantity(limits["memory"])
    assert parse_quantity(requests["memory"]) == parse_quantity(limits["memory"])
    assert parse_quantity(requests["cpu"]) >= 2
    assert not worker_container["image"].endswith(":latest")
    # The scheduler's Service selects the scheduler pod of this very cluster and exposes the comm port.
    assert scheduler["service"]["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    container_ports = {p["name"]: p["containerPort"] for p in scheduler["spec"]["containers"][0]["ports"]}
    service_ports = {p["targetPort"]: p["port"] for p in scheduler["service"]["ports"]}
    assert container_ports["tcp-comm"] == service_ports["tcp-comm"] == 8786
    assert scheduler["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]


# ---- the CLI without a cluster ----


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reformatters.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    env.update(extra)
    return env


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output, output
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_k8s_without_credentials_fails_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    env = clean_env(KUBECONFIG=str(missing))
    store = tmp_path / "store.zarr"
    result = run_cli(["backfill", "example", "2024-01-02", "--cluster", "k8s", "--store", str(store)], tmp_path, env)
    assert_one_clear_line(result, "Kubernetes credentials", str(missing), "--cluster local")


def test_k8s_with_an_unreachable_api_server_fails_with_one_clear_line(tmp_path: Path) -> None:
    """Credentials exist but the API server does not answer: one line, and no traceback at exit either."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "gone",
                        "cluster": {"server": f"https://127.0.0.1:{closed_port()}", "insecure-skip-tls-verify": True},
                    }
                ],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u", "namespace": "default"}}],
                "current-context": "gone",
            }
        )
    )
    env = clean_env(KUBECONFIG=str(kubeconfig))
    store = tmp_path / "store.zarr"
    result = run_cli(["backfill", "example", "2024-01-02", "--cluster", "k8s", "--store", str(store)], tmp_path, env)
    assert_one_clear_line(result, "could not create the DaskCluster", str(kubeconfig))


def test_credentials_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert kubernetes_credentials_available()[0] is False
    (tmp_path / "config").write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    assert kubernetes_credentials_available() == (True, str(tmp_path / "config"))
    # A KUBECONFIG list (as kubectl accepts) counts when any of its files exists.
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "config")]))
    assert kubernetes_credentials_available() == (True, str(tmp_path / "config"))
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "gone")]))
    assert kubernetes_credentials_available()[0] is False
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert kubernetes_credentials_available()[0] is True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # the failed-start test of an unreachable scheduler (tests/test_failed_start.py) runs by default
def test_unreachable_scheduler_fails_with_one_clear_line(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{closed_port()}"
    store = tmp_path / "store.zarr"
    result = run_cli(
        ["backfill", "example", "2024-01-02", "--cluster", address, "--store", str(store)], tmp_path, clean_env()
    )
    assert_one_clear_line(result, address, "dask scheduler")


def test_unknown_cluster_spec_is_refused() -> None:
    with pytest.raises(ClusterUnavailableError, match="unknown --cluster"), open_client("kubernetes"):
        pass


def test_a_remote_session_that_cannot_start_fails_when_asked_and_leaves_cleanly() -> None:
    with ClusterSession("kubernetes") as session, pytest.raises(ClusterUnavailableError, match="unknown --cluster"):
        session.client()


PRELOADED = ("eccodes", "reformatters.pipeline.kernels", "reformatters_datasets.noaa.gfs.forecast.region_job")


def _preloaded_modules() -> list[str]:
    return [name for name in PRELOADED if name in sys.modules]


def test_local_session_workers_start_with_the_pipeline_imported_and_close_in_the_background() -> None:
    with ClusterSession("local", n_workers=2) as session:
        client = session.client()
        # client.run is no task: only the preload can have imported these.
        loaded = client.run(_preloaded_modules)
        assert len(loaded) == 2 and all(modules == list(PRELOADED) for modules in loaded.values()), loaded
        closing = session.close_in_background()
        closing.result(timeout=60)
        assert client.status == "closed"
        assert session.close_in_background() is closing


def test_local_cluster_is_sized_by_the_memory_limit_not_the_host() -> None:
    """In a pod the host's RAM is visible; the LocalCluster must fit the container's limit instead."""
    limit = 3 * 2**30
    code = "from reformatters.cluster import local_cluster_size; print(local_cluster_size(2)[2])"

    def limit_rss() -> None:
        resource.setrlimit(resource.RLIMIT_RSS, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=limit_rss, check=True
    )
    per_worker = int(result.stdout.strip())
    assert 0 < per_worker <= limit * 0.8 / 2


def _worker_malloc_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def test_local_workers_get_the_projects_malloc_settings() -> None:
    """Dask's default MALLOC_TRIM_THRESHOLD_ alone makes every shard write map and fault in its buffers afresh."""
    with open_client("local", n_workers=2) as client:
        environs = client.run(_worker_malloc_environ)
    assert list(environs.values()) == [WORKER_MALLOC_ENVIRON, WORKER_MALLOC_ENVIRON]


def _housekeeping_intervals() -> dict[str, str]:
    return {key: str(dask.config.get(key)) for key in HOUSEKEEPING_INTERVALS}


def test_local_clusters_slow_dasks_housekeeping_unless_configured_otherwise() -> None:
    ours = {key: value for key, (_, value) in HOUSEKEEPING_INTERVALS.items()}
    assert all(dask.config.get(key) == default for key, (default, _) in HOUSEKEEPING_INTERVALS.items()), (
        "Dask's defaults changed: re-measure and update HOUSEKEEPING_INTERVALS"
    )
    with open_client("local", n_workers=2) as client:
        on_workers = client.run(_housekeeping_intervals)
        on_scheduler = client.run_on_scheduler(_housekeeping_intervals)
    assert list(on_workers.values()) == [ours, ours] and on_scheduler == ours
    with dask.config.set({"distributed.worker.profile.interval": "20ms"}), open_client("local", n_workers=2) as client:
        kept = client.run(_housekeeping_intervals)
    assert [v["distributed.worker.profile.interval"] for v in kept.values()] == ["20ms", "20ms"]
    assert [v["distributed.admin.tick.interval"] for v in kept.values()] == ["200ms", "200ms"]
    worker_container = dask_cluster_resource()["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in worker_container["env"] if "value" in e}
    from_manifest = dask.config.collect_env(env)
    for key, value in ours.items():
        assert dask.config.get(key, config=from_manifest) == value, key


def test_kubernetes_workers_get_the_projects_malloc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed.nanny import _get_env_variables

    worker_container = dask_cluster_resource()["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in worker_container["env"] if "value" in e}
    assert not any(name.startswith("MALLOC_") for name in env)  # through the nanny, for the worker process only
    for name in WORKER_MALLOC_ENVIRON:
        monkeypatch.delenv(name, raising=False)
    # What the worker pod's nanny computes from the manifest's environment.
    overrides = dask.config.collect_env(
        {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]}
    )
    with dask.config.set(dask.config.merge(dask.config.config, overrides)):
        spawned = _get_env_variables("distributed.nanny.pre-spawn-environ")
    assert {k: v for k, v in spawned.items() if k.startswith("MALLOC_")} == WORKER_MALLOC_ENVIRON
    assert spawned["OMP_NUM_THREADS"] == "1"


def _driver_comm_log_lengths(dask_scheduler: Any) -> list[int | None]:
    return [comm.recent_message_log.maxlen for comm in dask_scheduler.stream_comms.values()]


def test_the_drivers_comms_keep_short_message_logs() -> None:
    """Each message logged holds a task's arguments: Dask's 1,000 per comm grew the driver with the backfill."""
    (key, (default, ours)), *_ = DRIVER_LOG_LENGTHS.items()
    assert dask.config.get(key) == default, "Dask's default changed: re-measure with benchmarks/driver_memory.py"
    with open_client("local", n_workers=2) as client:
        scheduler_side = client.run_on_scheduler(_driver_comm_log_lengths)
        client_side = client.scheduler_comm.recent_message_log.maxlen
    assert scheduler_side == [ours, ours] and client_side == ours
    assert dask.config.get(key) == default, "the driver's setting lasts only while it holds the client"
