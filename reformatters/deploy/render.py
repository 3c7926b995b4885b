"""Each dataset's Kubernetes resources rendered from its `OperationalResources`, and the namespace's NetworkPolicy.

`reformatters deploy` pipes these to `kubectl apply -f -`; `cluster/rendered/` holds them as checked in (a test
fails when code and files drift). Every manifest is checked for name limits and least privilege here, before
anything is printed or applied.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from reformatters.deploy.models import CronJobSpec, OperationalResources
from reformatters.deploy.policy import ensure_least_privilege
from reformatters.deploy.staging import STORE_BASE_ENV, STORE_BASE_KEY, StagedVersion

if TYPE_CHECKING:
    from reformatters.replicas import Replica

IMAGE_ENVIRON = "REFORMATTERS_IMAGE"
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/dynamical-org/reformatters"

# The image's user (Dockerfile: USER 10001:10001) and its only writable path.
RUN_AS_USER = 10001
SCRATCH_DIR = "/scratch"
SCRATCH_VOLUME = "scratch"

# Set up once per namespace (cluster/README.md): the stores' URLs, and the object-store credentials as a file
# in the AWS shared-credentials format (key `credentials`); validation gets a read-only key of its own.
CONFIG_MAP = "reformatters-config"
WRITE_CREDENTIALS_SECRET = "reformatters-storage"
READ_ONLY_CREDENTIALS_SECRET = "reformatters-storage-read-only"
CREDENTIALS_VOLUME = "storage-credentials"
CREDENTIALS_DIR = "/var/run/secrets/reformatters/storage"
CREDENTIALS_FILE = f"{CREDENTIALS_DIR}/credentials"

# Where the dask-kubernetes operator runs (its Helm chart's namespace in cluster/README.md): it calls the
# scheduler's API to scale and retire workers, so the NetworkPolicy lets it reach the scheduler's ports.
OPERATOR_NAMESPACE = "dask-operator"
NETWORK_POLICY_NAME = "reformatters-namespace-only"

APP_LABELS = {"app.kubernetes.io/name": "reformatters", "app.kubernetes.io/managed-by": "reformatters-deploy"}
DATASET_LABEL = "reformatters.dynamical.org/dataset"

CRON_JOB_NAME_LIMIT = 52  # the CronJob controller appends an 11-character suffix to name each Job
NAME_LIMIT = 63
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE_LIMIT = 63
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


class DeployError(ValueError):
    """A resource cannot be rendered as asked; the message says what to change."""


def package_version() -> str:
    return importlib.metadata.version("reformatters")


def resolve_image(docker_image: str | None = None) -> str:
    """`--docker-image`, else $REFORMATTERS_IMAGE, else this package's version on the project's registry.

    A bare tag (no '/' and no ':') names a tag of the project's repository. `:latest` and untagged references
    are refused: a manifest must name the exact image it was rendered for.
    """
    chosen = docker_image or os.environ.get(IMAGE_ENVIRON) or f"{DEFAULT_IMAGE_REPOSITORY}:{package_version()}"
    if "/" not in chosen and ":" not in chosen and "@" not in chosen:
        chosen = f"{DEFAULT_IMAGE_REPOSITORY}:{chosen}"
    if "@" in chosen:
        return chosen
    repository, _, tag = chosen.rpartition(":")
    if not repository or "/" in tag:
        raise DeployError(
            f"image {chosen!r} has no tag; name one, e.g. {chosen}:$(git rev-parse HEAD) (the deploy workflow "
            "tags images with the git sha)"
        )
    if tag == "latest":
        raise DeployError(
            f"image {chosen!r} uses the moving tag 'latest'; name the exact image, e.g. "
            f"{repository}:$(git rev-parse HEAD) or {repository}:{package_version()}"
        )
    return chosen


def check_name(kind: str, name: str) -> str:
    limit = CRON_JOB_NAME_LIMIT if kind == "CronJob" else NAME_LIMIT
    if len(name) > limit:
        raise DeployError(
            f"{kind} name {name!r} is {len(name)} characters; Kubernetes allows {limit} for a {kind}"
            + (" (each Job gets an 11-character suffix)" if kind == "CronJob" else "")
            + f": shorten the dataset id or the name by {len(name) - limit} characters"
        )
    if not _DNS_LABEL.fullmatch(name):
        raise DeployError(
            f"{kind} name {name!r} is not a DNS-1123 label; use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_label(value: str) -> str:
    if len(value) > LABEL_VALUE_LIMIT or not _LABEL_VALUE.fullmatch(value):
        raise DeployError(
            f"label value {value!r} is not a Kubernetes label value (at most {LABEL_VALUE_LIMIT} characters: "
            "letters, digits, '-', '_', '.', starting and ending with a letter or digit); shorten or rename it"
        )
    return value


def metadata(kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": check_name(kind, name), "labels": labels}


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,  # the mounted credentials are readable by the group, not by everyone
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_environ() -> list[dict[str, str]]:
    """Everything a run writes goes to the scratch emptyDir: the root filesystem is read-only."""
    return [
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "DASK_TEMPORARY_DIRECTORY", "value": SCRATCH_DIR},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]


def storage_environ(
    dataset_id: str, staged: StagedVersion | None = None, replicas: Sequence[Replica] = ()
) -> list[dict[str, Any]]:
    """The store's URL and endpoint from the ConfigMap; the credentials as a file (never in the environment).

    The primary's store is the ConfigMap's `DATASET_ID-store`; a staged version's lies under its `store-base`.
    Each replica's credentials are the profile `replica-NAME` of the same file and its endpoint the ConfigMap's
    `replica-NAME-endpoint-url` when set (else the primary's): `replica_environ`.
    """
    if staged is None:
        store = [
            {
                "name": "REFORMATTERS_STORE",
                "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": f"{dataset_id}-store"}},
            }
        ]
    else:
        store = [
            {"name": STORE_BASE_ENV, "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": STORE_BASE_KEY}}},
            {"name": "REFORMATTERS_STORE", "value": staged.store(f"$({STORE_BASE_ENV})")},
        ]
    return [
        *store,
        {
            "name": "AWS_ENDPOINT_URL",
            "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": "aws-endpoint-url", "optional": True}},
        },
        {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": CREDENTIALS_FILE},
        *replica_environ(replicas),
    ]


def replica_profile(replica: Replica) -> str:
    """The replica's profile in the mounted credentials file."""
    return f"replica-{replica.name}"


def replica_environ(replicas: Sequence[Replica]) -> list[dict[str, Any]]:
    """`{prefix}AWS_PROFILE` and `{prefix}AWS_ENDPOINT_URL` of each replica (`Replica.env_prefix`): a replica in
    another account reads its own profile of the credentials file, never the primary's keys."""
    environ: list[dict[str, Any]] = []
    for replica in replicas:
        if not replica.url.startswith("s3://"):
            continue  # gs:// replicas use the pod's Google credentials; a local path has none
        profile = replica_profile(replica)
        environ += [
            {"name": f"{replica.env_prefix}AWS_PROFILE", "value": profile},
            {
                "name": f"{replica.env_prefix}AWS_ENDPOINT_URL",
                "valueFrom": {
                    "configMapKeyRef": {"name": CONFIG_MAP, "key": f"{profile}-endpoint-url", "optional": True}
                },
            },
        ]
    return environ


def pod_volumes(scratch_size_limit: str, credentials_secret: str) -> list[dict[str, Any]]:
    return [
        {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": scratch_size_limit}},
        {"name": CREDENTIALS_VOLUME, "secret": {"secretName": credentials_secret, "defaultMode": 0o440}},
    ]


def volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR},
        {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True},
    ]


def _cron_job(
    dataset_id: str,
    component: str,
    spec: CronJobSpec,
    image: str,
    args: list[str],
    credentials_secret: str,
    staged: StagedVersion | None,
    replicas: Sequence[Replica],
) -> dict[str, Any]:
    name = f"{dataset_id}-{component}" if staged is None else staged.name(component, CRON_JOB_NAME_LIMIT)
    labels = {**APP_LABELS, "app.kubernetes.io/component": component, DATASET_LABEL: check_label(dataset_id)}
    if staged is not None:
        labels |= {key: check_label(value) for key, value in staged.labels().items()}
    schedule = spec.schedule if staged is None else staged.schedule(spec.schedule)
    container = {
        "name": component,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["reformatters"],
        "args": args,
        "env": [
            # The Sentry cron monitor's slug and, when the ConfigMap has one, its DSN (reformatters.monitoring).
            {"name": "CRON_JOB_NAME", "value": name},
            {"name": "CRON_SCHEDULE", "value": schedule},
            {"name": "CRON_TIME_ZONE", "value": spec.time_zone},
            {"name": "CRON_CHECKIN_MARGIN_MINUTES", "value": str(-(-spec.starting_deadline_seconds // 60))},
            {"name": "CRON_MAX_RUNTIME_MINUTES", "value": str(-(-spec.active_deadline_seconds // 60))},
            {
                "name": "SENTRY_DSN",
                "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": "sentry-dsn", "optional": True}},
            },
            *storage_environ(dataset_id, staged, replicas),
            *scratch_environ(),
            # zarr/Blosc/BLAS thread pools at one thread: the LocalCluster's threads are the parallelism.
            {"name": "OMP_NUM_THREADS", "value": "1"},
            {"name": "OPENBLAS_NUM_THREADS", "value": "1"},
            {"name": "BLOSC_NTHREADS", "value": "1"},
        ],
        "resources": spec.resources.as_manifest(),
        "securityContext": container_security_context(),
        "volumeMounts": volume_mounts(),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata("CronJob", name, labels),
        "spec": {
            "schedule": schedule,
            "timeZone": spec.time_zone,
            "concurrencyPolicy": spec.concurrency_policy,
            "startingDeadlineSeconds": spec.starting_deadline_seconds,
            "suspend": spec.suspend,
            "successfulJobsHistoryLimit": spec.successful_jobs_history_limit,
            "failedJobsHistoryLimit": spec.failed_jobs_history_limit,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    "backoffLimit": spec.backoff_limit,
                    "activeDeadlineSeconds": spec.active_deadline_seconds,
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "restartPolicy": "Never",
                            "automountServiceAccountToken": False,
                            "enableServiceLinks": False,
                            "securityContext": pod_security_context(),
                            "containers": [container],
                            "volumes": pod_volumes(spec.scratch_size_limit, credentials_secret),
                        },
                    },
                },
            },
        },
    }


def dataset_manifests(
    dataset_id: str,
    resources: OperationalResources,
    image: str,
    staged: StagedVersion | None = None,
    replicas: Sequence[Replica] = (),
) -> list[dict[str, Any]]:
    """The update CronJob (write credentials) and the validate CronJob (read-only credentials) of one dataset, and
    its maintain CronJob (write credentials) if it declares one; with `staged`, those of that version staged beside
    the primary (`reformatters.deploy.staging`). The update and validate CronJobs write and check `replicas`; a
    staged version writes only its own store (`--no-replicas`): the replicas belong to the version readers use."""
    if staged is not None and staged.dataset_id != dataset_id:
        raise DeployError(f"staged version of {staged.dataset_id} rendered as {dataset_id}; pass the same dataset id")
    replica_args = []
    if staged is not None and replicas:
        replicas, replica_args = (), ["--no-replicas"]
    update_args = ["update", dataset_id, "--cluster", "local", "--workers", str(resources.update.workers)]
    manifests = [
        _cron_job(
            dataset_id,
            "update",
            resources.update,
            image,
            [*update_args, "--store", "$(REFORMATTERS_STORE)", *replica_args],
            WRITE_CREDENTIALS_SECRET,
            staged,
            replicas,
        ),
        _cron_job(
            dataset_id,
            "validate",
            resources.validation,
            image,
            ["validate", dataset_id, "--store", "$(REFORMATTERS_STORE)", *replica_args],
            READ_ONLY_CREDENTIALS_SECRET,
            staged,
            replicas,
        ),
    ]
    if resources.maintenance is not None:
        maintenance = resources.maintenance
        maintain_args = ["maintain", dataset_id, "--store", "$(REFORMATTERS_STORE)"]
        maintain_args += ["--older-than", maintenance.older_than, "--grace", maintenance.grace]
        # It deletes objects: the write credentials.
        manifests.append(
            _cron_job(dataset_id, "maintain", maintenance, image, maintain_args, WRITE_CREDENTIALS_SECRET, staged, ())
        )
    ensure_least_privilege(manifests)
    return manifests


def namespace_manifests() -> list[dict[str, Any]]:
    """The NetworkPolicy: this project's pods (Dask scheduler and dashboard among them) answer only inside the
    namespace, and the dask-kubernetes operator may reach the scheduler's ports."""
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata("NetworkPolicy", NETWORK_POLICY_NAME, dict(APP_LABELS)),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": APP_LABELS["app.kubernetes.io/name"]}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {}}]},
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}}
                    ],
                    "ports": [{"protocol": "TCP", "port": 8786}, {"protocol": "TCP", "port": 8787}],
                },
            ],
        },
    }
    return [policy]


def render(datasets: Sequence[Any], image: str) -> dict[str, list[dict[str, Any]]]:
    """File stem -> manifests: `namespace` and one entry per dataset that declares operational resources."""
    rendered: dict[str, list[dict[str, Any]]] = {"namespace": namespace_manifests()}
    for dataset in datasets:
        resources = dataset.operational_resources()
        if resources is not None:
            rendered[dataset.dataset_id] = dataset_manifests(
                dataset.dataset_id, resources, image, replicas=dataset.replicas
            )
    return rendered


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: a label dict shared by several places is written out at each."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    return yaml.dump_all(manifests, Dumper=_PlainDumper, sort_keys=False, explicit_start=True, width=120)


RENDER_HEADER = (
    "# Rendered by `reformatters deploy --output-dir cluster/rendered` from the datasets' code: do not edit.\n"
)


def write_rendered(rendered: dict[str, list[dict[str, Any]]], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, manifests in rendered.items():
        path = output_dir / f"{stem}.yaml"
        path.write_text(RENDER_HEADER + to_yaml(manifests))
        written.append(path)
    return written
