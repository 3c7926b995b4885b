"""A backfill that does not depend on the operator's machine: its driver runs as a Kubernetes Job.

`reformatters backfill ID END --cluster k8s --detach` renders a Job running the same command (without
`--detach`) and a ServiceAccount whose Role lets it create and delete DaskClusters in its namespace and read the
Services and Pods KubeCluster waits for; nothing else.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reformatters.deploy.policy import ensure_least_privilege
from reformatters.deploy.render import (
    APP_LABELS,
    DATASET_LABEL,
    IMAGE_ENVIRON,
    WRITE_CREDENTIALS_SECRET,
    container_security_context,
    metadata,
    pod_security_context,
    pod_volumes,
    scratch_environ,
    storage_environ,
    volume_mounts,
)

if TYPE_CHECKING:
    from reformatters.replicas import Replica

DRIVER_ACCOUNT = "reformatters-backfill-driver"
FINISHED_JOB_TTL_SECONDS = 7 * 24 * 3600

# The DaskCluster resources of the dask-kubernetes operator, and what KubeCluster reads to find the scheduler.
DRIVER_RULES = [
    {
        "apiGroups": ["kubernetes.dask.org"],
        "resources": ["daskclusters", "daskworkergroups", "daskautoscalers"],
        "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"],
    },
    {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
]


def driver_access_manifests() -> list[dict[str, Any]]:
    labels = {**APP_LABELS, "app.kubernetes.io/component": "backfill-driver"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata("ServiceAccount", DRIVER_ACCOUNT, labels),
            "automountServiceAccountToken": False,  # only the driver's pod mounts it
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata("Role", DRIVER_ACCOUNT, labels),
            "rules": DRIVER_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata("RoleBinding", DRIVER_ACCOUNT, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DRIVER_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": DRIVER_ACCOUNT}],
        },
    ]


def detached_backfill_manifests(
    dataset_id: str,
    backfill_args: list[str],
    image: str,
    suffix: str | None = None,
    replicas: Sequence[Replica] = (),
) -> list[dict[str, Any]]:
    """The driver's access and the Job running `reformatters <backfill_args>` in the project's image, with the
    credentials of the `replicas` it writes."""
    name = f"{dataset_id}-backfill-{suffix or uuid.uuid4().hex[:8]}"
    labels = {**APP_LABELS, "app.kubernetes.io/component": "backfill-driver", DATASET_LABEL: dataset_id}
    container = {
        "name": "backfill",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["reformatters"],
        "args": backfill_args,
        "env": [
            # The DaskCluster's scheduler and workers run the driver's own image.
            {"name": IMAGE_ENVIRON, "value": image},
            *storage_environ(dataset_id, replicas=replicas)[1:],  # the store is in the arguments
            *scratch_environ(),
        ],
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "512Mi"},
            "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "2Gi"},
        },
        "securityContext": container_security_context(),
        "volumeMounts": volume_mounts(),
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata("Job", name, labels),
        "spec": {
            "backoffLimit": 0,  # a failed driver is looked at, not rerun over a half-published store
            "ttlSecondsAfterFinished": FINISHED_JOB_TTL_SECONDS,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": DRIVER_ACCOUNT,
                    "automountServiceAccountToken": True,  # KubeCluster creates the DaskCluster through the API
                    "enableServiceLinks": False,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": pod_volumes("1Gi", WRITE_CREDENTIALS_SECRET),
                },
            },
        },
    }
    manifests = [*driver_access_manifests(), job]
    ensure_least_privilege(manifests, token_allowed=frozenset({name}))
    return manifests
