"""Least privilege, checked on every manifest this project renders (and by the tests on hand-broken ones).

Every container runs as a numeric non-root user with a read-only root filesystem, no privilege escalation, no
capabilities and the runtime's default seccomp profile; HOME, TMPDIR and Dask's temporary directory lie on a
size-limited emptyDir; credentials come as files from Secrets, never as environment variables; pods get no
service-account token unless listed as needing one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SCRATCH_ENVIRON = ("HOME", "TMPDIR", "DASK_TEMPORARY_DIRECTORY")


class PolicyViolationError(ValueError):
    """A rendered manifest breaks the least-privilege policy; the message names each setting and its fix."""


def pod_specs(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod a manifest creates."""
    kind, spec = manifest.get("kind"), manifest.get("spec", {})
    if kind == "CronJob":
        yield "jobTemplate", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield "template", spec["template"]["spec"]
    elif kind == "Pod":
        yield "pod", spec
    elif kind == "DaskCluster":
        yield "scheduler", spec["scheduler"]["spec"]
        yield "worker", spec["worker"]["spec"]


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's value, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def violations(manifest: dict[str, Any], *, token_allowed: bool = False) -> list[str]:
    """Every least-privilege setting a manifest's pods and containers lack, one message each."""
    name = f"{manifest.get('kind')} {manifest.get('metadata', {}).get('name')}"
    found: list[str] = []
    for where, pod in pod_specs(manifest):
        if not token_allowed and pod.get("automountServiceAccountToken") is not False:
            found.append(f"{name} ({where}): set automountServiceAccountToken: false (no job here needs the API)")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "emptyDir" in volume and not volume["emptyDir"].get("sizeLimit"):
                found.append(f"{name} ({where}): emptyDir {volume['name']} needs a sizeLimit")
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            found += _container_violations(f"{name} ({where}) container {container.get('name')}", pod, container)
            found += _scratch_violations(f"{name} ({where}) container {container.get('name')}", container, volumes)
    return found


def _container_violations(label: str, pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    found: list[str] = []
    own = container.get("securityContext", {})
    if _effective(pod, container, "runAsNonRoot") is not True:
        found.append(f"{label}: set securityContext.runAsNonRoot: true")
    user = _effective(pod, container, "runAsUser")
    if not isinstance(user, int) or isinstance(user, bool) or user <= 0:
        found.append(f"{label}: set securityContext.runAsUser to a numeric non-root uid (found {user!r})")
    if own.get("readOnlyRootFilesystem") is not True:
        found.append(f"{label}: set securityContext.readOnlyRootFilesystem: true")
    if own.get("allowPrivilegeEscalation") is not False:
        found.append(f"{label}: set securityContext.allowPrivilegeEscalation: false")
    capabilities = own.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
        found.append(f"{label}: set securityContext.capabilities.drop: [ALL] and add none")
    seccomp = _effective(pod, container, "seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        found.append(f"{label}: set securityContext.seccompProfile.type: RuntimeDefault")
    if own.get("privileged"):
        found.append(f"{label}: remove securityContext.privileged")
    for env in container.get("env", []):
        if "secretKeyRef" in env.get("valueFrom", {}):
            found.append(f"{label}: env {env['name']} comes from a Secret; mount the Secret as files instead")
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            found.append(f"{label}: envFrom a Secret puts credentials in the environment; mount it as files instead")
    return found


def _scratch_violations(label: str, container: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> list[str]:
    """HOME, TMPDIR and Dask's temporary directory must lie on a writable emptyDir: the root filesystem is not."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    writable = [
        m["mountPath"].rstrip("/")
        for m in container.get("volumeMounts", [])
        if "emptyDir" in volumes.get(m["name"], {}) and not m.get("readOnly")
    ]
    found: list[str] = []
    for variable in SCRATCH_ENVIRON:
        path = env.get(variable)
        if not path:
            found.append(f"{label}: set env {variable} to a directory on the scratch emptyDir")
        elif not any(path == root or path.startswith(root + "/") for root in writable):
            found.append(f"{label}: env {variable}={path} is not on a writable emptyDir mount ({writable or 'none'})")
    return found


def ensure_least_privilege(manifests: list[dict[str, Any]], *, token_allowed: frozenset[str] = frozenset()) -> None:
    found = [
        problem
        for manifest in manifests
        for problem in violations(manifest, token_allowed=manifest.get("metadata", {}).get("name") in token_allowed)
    ]
    if found:
        raise PolicyViolationError("; ".join(found))
