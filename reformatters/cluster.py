"""Where region graphs run: a LocalCluster, an existing scheduler, or a KubeCluster."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import dask
import dask.system
import distributed.system
import yaml
from distributed import Client, LocalCluster, WorkerPlugin

from reformatters.common.package_data import package_directory
from reformatters.deploy.models import BackfillSizing
from reformatters.deploy.policy import ensure_least_privilege
from reformatters.deploy.render import DeployError, check_name, replica_environ, resolve_image
from reformatters.pipeline.graph import ENCODE_RESOURCE

if TYPE_CHECKING:
    from reformatters.replicas import Replica

log = logging.getLogger("reformatters.cluster")

# The repository's cluster/, mapped into the installed package by pyproject.toml.
CLUSTER_DIR = package_directory("reformatters.cluster_manifests")
DASK_CLUSTER_SPEC = CLUSTER_DIR / "dask-cluster.yaml"
WORKER_SETUP_MODULE = "reformatters.pipeline.worker_setup"


class ClusterUnavailableError(RuntimeError):
    """The requested cluster cannot be had; the message says why and what to do."""


def local_cluster_size(n_workers: int | None = None) -> tuple[int, int, int]:
    """Workers, threads per worker and memory per worker (bytes), sized to this machine or pod."""
    # In a pod, the node's CPUs and RAM are visible but the container's cgroup limits are what count:
    # dask's CPU_COUNT honours affinity and the CPU quota, distributed's MEMORY_LIMIT the memory limit.
    cores = dask.system.CPU_COUNT
    workers = n_workers or max(2, cores)
    memory = distributed.system.MEMORY_LIMIT
    # Two threads per worker: one encodes while the other downloads or reads.
    return workers, 2, int(memory * 0.8 / workers)


# glibc malloc for worker processes, fixed. Left to itself glibc serves blocks above its mmap threshold (128 KiB
# at first, raised to the size of the largest such block freed) with fresh mmaps, faulted in page by page, and
# returns freed heap memory at once; Dask's default MALLOC_TRIM_THRESHOLD_=65536 also freezes that threshold.
# A shard write's buffers (downloaded messages, chunks, compressed chunks, shards: 0.1-32 MB) then churn through
# the kernel. Measured on a warm 2-worker LocalCluster over 3 GFS inits: 225-300k page faults and 1.05-1.15 s of
# system time per worker with Dask's setting, 32-67k and 0.78-0.81 s with these; peak RSS in the benchmark
# unchanged (1.31-1.37 GB; keeping 256 MiB of free heap instead of 64 cut faults to 5-15k but added 80 MB).
# The variable-region buffer is mapped on its own (`fresh_buffer`).
WORKER_MALLOC_ENVIRON = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # blocks below 32 MiB come from the heap and are reused
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),  # up to 64 MiB of free heap is kept for the next shard write
    "MALLOC_TOP_PAD_": str(16 << 20),  # the heap grows 16 MiB at a time
}
WORKER_MALLOC_CONFIG = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENVIRON.items()}

# Dask's periodic housekeeping, slowed where its defaults cost CPU that a 2-core worker pod needs for encoding.
# Measured on 2 idle cores (LocalCluster, 2 workers): the driver's scheduler used 5.5 % of a core and each
# worker 2.3 % with Dask's defaults, 1.8 % and 0.7 % with these; under load the profiler alone costs a busy
# worker 2.5 % of a core at its default 10 ms. Only values still at Dask's default are replaced.
HOUSEKEEPING_INTERVALS: dict[str, tuple[str, str]] = {  # key: (Dask's default, this project's)
    "distributed.admin.tick.interval": ("20ms", "200ms"),  # event-loop health check; warns after 3 s blocked
    "distributed.worker.profile.interval": ("10ms", "100ms"),  # still fills the dashboard's profile page
    "distributed.worker.memory.monitor-interval": ("100ms", "500ms"),  # spill/pause checks of worker memory
    "distributed.admin.system-monitor.interval": ("500ms", "1000ms"),  # the dashboard's CPU/memory plots
}


# Every comm keeps its recent messages for debugging, and each message to a worker holds a task with its region
# job's arguments: in the driver (the client's comm, a local scheduler's comms to its workers) those logs were most
# of what grew with the length of a backfill (`benchmarks/driver_memory.py`). Kept only while at Dask's default.
DRIVER_LOG_LENGTHS: dict[str, tuple[int, int]] = {"distributed.admin.low-level-log-length": (1000, 100)}


def driver_config() -> dict[str, object]:
    """The dask config of the driver process while it holds a client."""
    return {key: ours for key, (default, ours) in DRIVER_LOG_LENGTHS.items() if dask.config.get(key) == default}


def local_worker_config() -> dict[str, object]:
    """The dask config this project's local cluster (scheduler, workers, client) starts with."""
    config: dict[str, object] = dict(WORKER_MALLOC_CONFIG)
    for key, (dask_default, ours) in HOUSEKEEPING_INTERVALS.items():
        if dask.config.get(key) == dask_default:
            config[key] = ours
    return config


@contextmanager
def open_client(
    spec: str = "local",
    *,
    n_workers: int | None = None,
    kube_sizing: BackfillSizing | None = None,
    replicas: Sequence[Replica] = (),
) -> Iterator[Client]:
    """`replicas`: those the workers write, whose credentials a Kubernetes cluster's worker pods get (a local
    cluster's workers inherit this process's environment)."""
    with (
        dask.config.set(driver_config()),
        _open_client(spec, n_workers=n_workers, kube_sizing=kube_sizing, replicas=replicas) as client,
    ):
        yield client


@contextmanager
def _open_client(
    spec: str, *, n_workers: int | None, kube_sizing: BackfillSizing | None, replicas: Sequence[Replica]
) -> Iterator[Client]:
    if spec == "local":
        workers, threads, memory = local_cluster_size(n_workers)
        with (
            dask.config.set(local_worker_config()),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                memory_limit=memory,
                resources={ENCODE_RESOURCE: 1},
                preload=[WORKER_SETUP_MODULE],
                dashboard_address="127.0.0.1:0",
                host="127.0.0.1",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    if spec.startswith("tcp://"):
        try:
            client = Client(spec, timeout="15s")
        except OSError as error:
            raise ClusterUnavailableError(
                f"no Dask scheduler answered at {spec} ({error}); start one with `dask scheduler` "
                "or use --cluster local"
            ) from error
        with client:
            prepare_remote_cluster(client)
            yield client
        return
    if spec == "k8s":
        with _kube_client(n_workers, kube_sizing, replicas) as client:
            prepare_remote_cluster(client)
            yield client
        return
    raise ClusterUnavailableError(
        f"unknown --cluster {spec!r}: use 'local', 'k8s' or a scheduler address such as tcp://127.0.0.1:8786"
    )


class ClusterSession:
    """A client for one run, whose LocalCluster starts while the driver prepares its work.

    `--cluster local` starts at once (its workers import the pipeline's modules as they start); a remote or
    Kubernetes cluster starts at the first `client()`, so a mistake found while planning never costs a
    cluster. `client()` waits for the cluster and raises what starting it raised; `close_in_background()`
    lets the driver publish while the workers shut down; leaving the session waits for the close. Opening
    and closing both run on the session's own thread: a Client must be left in the context it entered.
    """

    def __init__(
        self,
        spec: str = "local",
        *,
        n_workers: int | None = None,
        kube_sizing: BackfillSizing | None = None,
        replicas: Sequence[Replica] = (),
    ) -> None:
        self._context = open_client(spec, n_workers=n_workers, kube_sizing=kube_sizing, replicas=replicas)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-session")
        self._started: Future[Client] | None = None
        self._closing: Future[None] | None = None
        if spec == "local":
            self._start()

    def _start(self) -> Future[Client]:
        if self._started is None:
            self._started = self._executor.submit(self._context.__enter__)
        return self._started

    def client(self) -> Client:
        return self._start().result()

    def close_in_background(self) -> Future[None]:
        if self._closing is None:
            self._closing = self._executor.submit(self._close)
        return self._closing

    def _close(self) -> None:
        if self._started is None:
            return
        try:
            self._started.result()
        except BaseException:  # noqa: BLE001 - nothing started, nothing to close; client() raised it already
            return
        self._context.__exit__(None, None, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is KeyboardInterrupt:
            # Stopping on the user's Ctrl-C: Dask's shutdown chatter (workers slow to close) is no news to them.
            logging.getLogger("distributed").setLevel(logging.ERROR)
        try:
            self.close_in_background().result()
        finally:
            self._executor.shutdown(wait=True)


def import_dataset_integrations() -> int:
    """Import every registered dataset integration (`reformatters.registry`); returns how many there are.

    Task graphs carry dataset classes, among them parametrized pydantic models such as
    `DataVar[ExampleInternalAttrs]` that exist (as attributes of `reformatters.common.config_models`) only
    once the dataset's module has been imported. A scheduler or worker process that never imported it
    cannot unpickle the graph ("Error during deserialization of the task graph"). The registry reads the
    entry points and `REFORMATTERS_EXTRA_DATASETS` of the process it runs in: worker processes a LocalCluster
    or `dask worker` starts inherit the environment of the process starting them.
    """
    from reformatters.registry import all_datasets

    return len(all_datasets())


class ImportDatasetIntegrations(WorkerPlugin):
    """Runs `import_dataset_integrations` on every worker, also on workers that join later."""

    name = "reformatters-import-datasets"

    def setup(self, worker: Any) -> None:
        import_dataset_integrations()


def prepare_remote_cluster(client: Client) -> None:
    """A cluster this process did not start (tcp://, k8s) imports the dataset integrations first."""
    client.run_on_scheduler(import_dataset_integrations)
    client.register_plugin(ImportDatasetIntegrations())


def workers_have_encode_resource(client: Client) -> bool:
    info = client.scheduler_info()
    workers = info.get("workers", {})
    return bool(workers) and all(ENCODE_RESOURCE in w.get("resources", {}) for w in workers.values())


def dask_cluster_resource(
    image: str | None = None,
    n_workers: int | None = None,
    name: str | None = None,
    sizing: BackfillSizing | None = None,
    replicas: Sequence[Replica] = (),
) -> dict[str, Any]:
    """The DaskCluster custom resource that `--cluster k8s` creates, from `cluster/dask-cluster.yaml`.

    `image` follows `reformatters deploy`'s rules (`resolve_image`: $REFORMATTERS_IMAGE, else the package
    version's tag; never `:latest`). `sizing` (a dataset's `operational_resources().backfill`) sizes the
    workers; `n_workers` overrides its replicas. `name` renames the cluster and the scheduler Service's selector
    with it (they must agree). The workers' environment gets each of `replicas`' credentials (`replica_environ`):
    the workers write the replicas' shards. The result is checked for name limits and least privilege.
    """
    resource: dict[str, Any] = yaml.safe_load(DASK_CLUSTER_SPEC.read_text())
    spec = resource["spec"]
    if name:
        resource["metadata"]["name"] = name
        spec["scheduler"]["service"]["selector"]["dask.org/cluster-name"] = name
    check_name("DaskCluster", resource["metadata"]["name"])
    resolved = resolve_image(image)
    for container in (*spec["scheduler"]["spec"]["containers"], *spec["worker"]["spec"]["containers"]):
        container["image"] = resolved
    if sizing is not None:
        worker_pod = spec["worker"]["spec"]
        spec["worker"]["replicas"] = sizing.workers
        container = worker_pod["containers"][0]
        container["resources"] = sizing.resources.as_manifest()
        args = container["args"]
        args[args.index("--memory-limit") + 1] = sizing.dask_memory_limit
        args[args.index("--nthreads") + 1] = str(sizing.threads)
        for volume in worker_pod["volumes"]:
            if "emptyDir" in volume:
                volume["emptyDir"]["sizeLimit"] = sizing.scratch_size_limit
    if n_workers is not None:
        spec["worker"]["replicas"] = n_workers
    for container in spec["worker"]["spec"]["containers"]:
        container["env"] = [*container.get("env", []), *replica_environ(replicas)]
    ensure_least_privilege([resource])
    return resource


def kubernetes_credentials_available() -> tuple[bool, str]:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True, "in-cluster service account"
    # KUBECONFIG may list several files (like PATH); kubectl merges those that exist.
    listed = os.environ.get("KUBECONFIG") or "~/.kube/config"
    paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
    found = [str(p) for p in paths if p.is_file()]
    if found:
        return True, os.pathsep.join(found)
    return False, f"no in-cluster service account and no kubeconfig at {os.pathsep.join(map(str, paths))}"


@contextmanager
def _kube_client(
    n_workers: int | None = None, sizing: BackfillSizing | None = None, replicas: Sequence[Replica] = ()
) -> Iterator[Client]:
    available, detail = kubernetes_credentials_available()
    if not available:
        raise ClusterUnavailableError(
            f"--cluster k8s needs Kubernetes credentials: {detail}. Set KUBECONFIG, run inside the cluster, "
            "or use --cluster local / --cluster tcp://HOST:PORT"
        )
    from dask_kubernetes.operator import KubeCluster

    # A name of its own per run: KubeCluster connects to an existing DaskCluster of the same name, and
    # closing it (shutdown_on_close) would then delete the cluster of a backfill that is still running.
    base = yaml.safe_load(DASK_CLUSTER_SPEC.read_text())["metadata"]["name"]
    try:
        resource = dask_cluster_resource(
            name=f"{base}-{uuid.uuid4().hex[:8]}", n_workers=n_workers, sizing=sizing, replicas=replicas
        )
    except DeployError as error:
        raise ClusterUnavailableError(str(error)) from error
    existing = set(KubeCluster._instances)
    try:
        cluster = KubeCluster(custom_cluster_spec=resource, shutdown_on_close=True)
    except Exception as error:
        _abandon_half_started_clusters(KubeCluster, existing)
        raise ClusterUnavailableError(
            f"could not create the DaskCluster on Kubernetes ({detail}): {type(error).__name__}: {error}"
        ) from error
    with cluster, Client(cluster) as client:
        yield client


def _abandon_half_started_clusters(kube_cluster_class: Any, existing: set[Any]) -> None:
    """Delete what a failed KubeCluster start left behind, then forget it.

    dask-kubernetes reaps every KubeCluster it knows at interpreter exit; one whose start failed because the
    API server is unreachable would fail again there and print a traceback after our one-line error.
    """
    for cluster in set(kube_cluster_class._instances) - existing:
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)
        cluster.shutdown_on_close = False
        kube_cluster_class._instances.discard(cluster)
