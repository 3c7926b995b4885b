"""`reformatters`: turn GRIB2 archives into Zarr v3 datasets and keep them current."""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import pandas as pd
import typer

from reformatters.cluster import ClusterUnavailableError
from reformatters.common.time_utils import parse_utc
from reformatters.monitoring import JobKind
from reformatters.pipeline.worker_setup import LOG_FORMAT, LOG_LEVEL_ENVIRON
from reformatters.publish import DEFAULT_LEASE_WAIT_SECONDS, RunCannotStartError
from reformatters.region_job import RegionJobFilters
from reformatters.registry import DatasetRegistrationError, UnknownDatasetError, all_datasets, get_dataset
from reformatters.summary import RunSummary
from reformatters.update.lease import terminate_on_sigterm

if TYPE_CHECKING:
    from reformatters.replicas import Replica

app = typer.Typer(
    name="reformatters",
    help=(
        "Turn weather-model GRIB2 archives into analysis-ready Zarr v3 datasets.\n\n"
        "Typical flow: `reformatters list` to see datasets, `reformatters backfill ID END` to build the "
        "history on a Dask cluster, then `reformatters update ID` on a schedule to keep it current and "
        "`reformatters validate ID` to check it. `reformatters demo` runs all of it offline."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ClusterOption = Annotated[
    str,
    typer.Option(
        "--cluster",
        help="Where to run: 'local' (a LocalCluster sized to this machine), 'k8s' (a KubeCluster from "
        "cluster/dask-cluster.yaml), or a scheduler address such as tcp://127.0.0.1:8786.",
    ),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Path or URL of the dataset's Zarr store (s3://bucket/x.zarr, gs://...). "
        "Default: data/output/DATASET_ID/vVERSION.zarr.",
    ),
]
SourceUrlOption = Annotated[
    str | None,
    typer.Option("--source-url", help="Replace the dataset's source root (a mirror or a local archive)."),
]
DockerImageOption = Annotated[
    str | None,
    typer.Option(
        "--docker-image",
        help="Image the manifests run: REPOSITORY:TAG, or a bare TAG of ghcr.io/dynamical-org/reformatters. "
        "Default: $REFORMATTERS_IMAGE, else the package version's tag; never :latest.",
    ),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the YAML instead of applying it.")]
ScratchDirOption = Annotated[
    str | None,
    typer.Option(
        "--scratch-dir",
        help="Where workers keep variable-regions too large for memory (datasets that opt in); "
        "default: each worker's temporary directory.",
    ),
]
ReplicaOption = Annotated[
    list[str] | None,
    typer.Option(
        "--replica",
        help="Write (or check) only this declared replica (repeatable); default: every replica the dataset declares.",
    ),
]
NoReplicasOption = Annotated[
    bool, typer.Option("--no-replicas", help="Leave every replica out: only the primary store.")
]
NowOption = Annotated[str | None, typer.Option("--now", help="Pretend the wall clock reads this UTC time (ISO 8601).")]


def _setup_logging(verbosity: int) -> None:
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    # Local worker processes inherit the environment and log at the same level (`worker_setup`).
    os.environ[LOG_LEVEL_ENVIRON] = logging.getLevelName(level)


# Another publisher holds the store's lease: distinct from every other failure, so a scheduler can retry later.
EXIT_LEASE_HELD = 3


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


def _run_failure(error: Exception) -> typer.Exit:
    """One line for a run that could not start or was refused: the message says what to do."""
    from reformatters.update.lease import LeaseHeldError

    return _fail(" ".join(str(error).split()), EXIT_LEASE_HELD if isinstance(error, LeaseHeldError) else 2)


# What a run raises when it cannot start or must not publish; everything else is a bug and keeps its traceback.
def _run_failures() -> tuple[type[Exception], ...]:
    from reformatters.common.storage import StoreAccessError
    from reformatters.replicas import ReplicaError
    from reformatters.sources.reachability import SourceUnreachableError

    return (
        ClusterUnavailableError,
        RunCannotStartError,
        ReplicaError,
        SourceUnreachableError,
        StoreAccessError,
        ValueError,
    )


P = ParamSpec("P")
R = TypeVar("R")

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command stopped with Ctrl-C


def _stops_on_ctrl_c(command: Callable[P, R]) -> Callable[P, R]:
    """Ctrl-C ends the command with one line and exit 130 once its cluster has stopped, not with tracebacks."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.secho(
                f"interrupted: {command.__name__} stopped before it finished; run the same command again to finish it",
                fg=typer.colors.YELLOW,
                err=True,
            )
            raise typer.Exit(code=INTERRUPTED_EXIT_CODE) from None

    return run


# More source files failed than the dataset's threshold allows: what was good is published.
EXIT_TOO_MANY_FAILURES = 4


def _report(summary: RunSummary) -> None:
    """Print the run's summary; exit non-zero if its failed files pass the dataset's threshold."""
    typer.echo("\n".join(summary.render_lines()))
    if summary.too_many_failures:
        for line in summary.failures():
            typer.echo(f"  failed: {line}", err=True)
        raise _fail(
            f"{summary.files_failed} of the {summary.files_due} source files due failed "
            f"({summary.failed_fraction:.1%}, more than {summary.dataset_id}'s threshold of "
            f"{summary.max_failed_fraction:.0%}); what was good is published. Look at the failures above (all of them "
            "with --summary FILE), fix the source or the dataset's code, and run the same command again.",
            EXIT_TOO_MANY_FAILURES,
        )


def _replica_names(dataset: Any, replica: list[str] | None, no_replicas: bool) -> list[str] | None:
    """The replicas chosen on the command line (None: every declared one), checked against the dataset's."""
    if replica and no_replicas:
        raise _fail("--replica and --no-replicas exclude each other; give one of them")
    names = [] if no_replicas else replica or None
    try:
        dataset.selected_replicas(names)
    except ValueError as error:
        raise _fail(str(error)) from None
    return names


def _dataset(dataset_id: str) -> Any:
    try:
        return get_dataset(dataset_id)
    except (UnknownDatasetError, DatasetRegistrationError) as error:
        raise _fail(str(error)) from None


@app.callback()
def main(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="-v: log each step and one line per variable and region; -vv: also each source file not found.",
        ),
    ] = 0,
) -> None:
    _setup_logging(verbose)
    # `kill -USR1 PID` prints every thread's stack to stderr: where a run that seems stuck is waiting.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


@app.command("list")
def list_datasets() -> None:
    """List the datasets this installation can build (entry points of the group reformatters.datasets)."""
    try:
        datasets = all_datasets()
    except DatasetRegistrationError as error:
        raise _fail(str(error)) from None
    for dataset in datasets:
        attrs = dataset.template_config.dataset_attributes
        typer.echo(f"{dataset.dataset_id:<32} v{attrs.dataset_version:<8} {attrs.name}")


@app.command("update-template")
def update_template(
    dataset_id: str,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            help="Write DATASET_ID/latest.zarr under this directory instead of the checkout's templates/ "
            "(needed where reformatters is installed from a wheel rather than an editable checkout).",
        ),
    ] = None,
) -> None:
    """Render DATASET_ID's template (Zarr metadata, coordinate values, no data) into templates/."""
    from reformatters.common.package_data import PackageDataError

    try:
        path = _dataset(dataset_id).template_config.update_template(output_dir)
    except PackageDataError as error:
        raise _fail(str(error)) from None
    typer.echo(f"wrote {path}")


@app.command()
@_stops_on_ctrl_c
def backfill(
    dataset_id: str,
    append_dim_end: Annotated[str, typer.Argument(help="Exclusive end of the append dimension, ISO 8601 UTC.")],
    cluster: ClusterOption = "local",
    filter_start: Annotated[str | None, typer.Option(help="Only regions ending at or after this time.")] = None,
    filter_end: Annotated[str | None, typer.Option(help="Only regions starting before this time (exclusive).")] = None,
    filter_contains: Annotated[
        list[str] | None, typer.Option(help="Only the regions containing this time (repeatable).")
    ] = None,
    filter_variable_names: Annotated[
        str | None, typer.Option(help="Comma-separated variable names (default: all).")
    ] = None,
    store: StoreOption = None,
    source_url: SourceUrlOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Workers for --cluster local, or the DaskCluster's worker replicas for --cluster k8s "
            "(default: the dataset's backfill sizing)."
        ),
    ] = None,
    summary: Annotated[Path | None, typer.Option(help="Also write the run summary as JSON here.")] = None,
    lease_wait: Annotated[
        float,
        typer.Option(
            help="Seconds to wait while another backfill or update publishes to the store (it holds the lease); "
            f"exit status {EXIT_LEASE_HELD} if it still does."
        ),
    ] = DEFAULT_LEASE_WAIT_SECONDS,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="With --cluster k8s: run this backfill's driver as a Kubernetes Job (kubectl apply) and return.",
        ),
    ] = False,
    docker_image: DockerImageOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --detach: print the Job's YAML instead.")] = False,
    scratch_dir: ScratchDirOption = None,
    replica: ReplicaOption = None,
    no_replicas: NoReplicasOption = False,
) -> None:
    """Build DATASET_ID's history up to APPEND_DIM_END on a Dask cluster (also into a store readers use).

    Example: reformatters backfill noaa-gfs-forecast 2025-01-01T00:00 --cluster local --filter-start 2024-12-01
    """
    dataset = _dataset(dataset_id)
    replica_names = _replica_names(dataset, replica, no_replicas)
    if detach or dry_run or docker_image:
        return _detach_backfill(
            dataset_id,
            append_dim_end,
            cluster=cluster,
            detach=detach,
            store=store,
            summary=summary,
            docker_image=docker_image,
            dry_run=dry_run,
            forwarded=[
                *(["--filter-start", filter_start] if filter_start else []),
                *(["--filter-end", filter_end] if filter_end else []),
                *[arg for time in filter_contains or () for arg in ("--filter-contains", time)],
                *(["--filter-variable-names", filter_variable_names] if filter_variable_names else []),
                *(["--source-url", source_url] if source_url else []),
                *(["--workers", str(workers)] if workers is not None else []),
                "--lease-wait",
                str(lease_wait),
                *(["--no-replicas"] if replica_names == [] else []),
                *[arg for name in replica_names or () for arg in ("--replica", name)],
            ],
            replicas=dataset.selected_replicas(replica_names),
        )
    try:
        end = parse_utc(append_dim_end)
        filters = RegionJobFilters.parse(
            start=filter_start,
            end=filter_end,
            contains=filter_contains or (),
            variable_names=(filter_variable_names or "").split(","),
        )
        if filters.variable_names:
            known = set(dataset.data_var_names())
            unknown = [n for n in filters.variable_names if n not in known]
            if unknown:
                raise ValueError(f"unknown variable(s) {unknown}; {dataset_id} has: {', '.join(sorted(known))}")
    except ValueError as error:
        raise _fail(str(error)) from None
    try:
        with terminate_on_sigterm():  # SIGTERM unwinds: the lease is released, the cluster stopped
            result = dataset.backfill(
                end,
                cluster=cluster,
                filters=filters,
                store_url=store,
                source_url=source_url,
                summary_path=summary,
                n_workers=workers,
                lease_wait_seconds=lease_wait,
                scratch_dir=scratch_dir,
                replica_names=replica_names,
            )
    except _run_failures() as error:
        raise _run_failure(error) from None
    _report(result)


def _detach_backfill(
    dataset_id: str,
    append_dim_end: str,
    *,
    cluster: str,
    detach: bool,
    store: str | None,
    summary: Path | None,
    docker_image: str | None,
    dry_run: bool,
    forwarded: list[str],
    replicas: Sequence[Replica],
) -> None:
    from reformatters.deploy.backfill_job import detached_backfill_manifests
    from reformatters.deploy.render import DeployError, resolve_image

    if not detach:
        raise _fail("--docker-image and --dry-run belong to --detach; add --detach --cluster k8s or drop them")
    if cluster != "k8s":
        raise _fail(f"--detach runs the driver on Kubernetes and needs --cluster k8s, not --cluster {cluster}")
    if not store or not store.startswith(("s3://", "gs://")):
        raise _fail(
            f"--detach needs --store s3://... or gs://... (the Job's pod has no disk of yours), found {store!r}"
        )
    if summary is not None:
        raise _fail("--summary is written inside the Job's pod; drop it with --detach (the Job's log has the summary)")
    try:
        parse_utc(append_dim_end)
        args = ["backfill", dataset_id, append_dim_end, "--cluster", "k8s", "--store", store, *forwarded]
        manifests = detached_backfill_manifests(dataset_id, args, resolve_image(docker_image), replicas=replicas)
    except (DeployError, ValueError) as error:
        raise _fail(str(error)) from None
    if not _apply_or_print(manifests, dry_run):
        return
    job = manifests[-1]["metadata"]["name"]
    typer.echo(f"submitted Job {job}; follow it with: kubectl logs -f job/{job}")
    typer.echo(f"its DaskCluster: kubectl get daskclusters; stop it: kubectl delete job {job}")


def _monitored(job: JobKind) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Check the run in and out of its Sentry cron monitor when `SENTRY_DSN` is set (`reformatters.monitoring`)."""

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            from reformatters.monitoring import cron_monitor

            # SIGTERM (an evicted pod) unwinds through the monitor, which reports it.
            with cron_monitor(str(kwargs["dataset_id"]), job), terminate_on_sigterm():
                return command(*args, **kwargs)

        return run

    return decorate


@app.command()
@_monitored("update")
@_stops_on_ctrl_c
def update(
    dataset_id: str,
    cluster: ClusterOption = "local",
    store: StoreOption = None,
    source_url: SourceUrlOption = None,
    now: NowOption = None,
    workers: Annotated[int | None, typer.Option(help="Workers for --cluster local.")] = None,
    summary: Annotated[Path | None, typer.Option(help="Also write the run summary as JSON here.")] = None,
    scratch_dir: ScratchDirOption = None,
    replica: ReplicaOption = None,
    no_replicas: NoReplicasOption = False,
) -> None:
    """Append the newest runs to DATASET_ID and publish each region as it completes (the operational CronJob).

    Stops at once, exit status 3, while another backfill or update publishes to the store."""
    dataset = _dataset(dataset_id)
    replica_names = _replica_names(dataset, replica, no_replicas)
    operational_update = getattr(dataset, "update", None)
    if operational_update is None:
        raise _fail(f"{dataset_id} has no operational update")
    try:
        with terminate_on_sigterm():  # SIGTERM unwinds: the lease is released, the cluster stopped
            result = operational_update(
                cluster=cluster,
                store_url=store,
                source_url=source_url,
                now=parse_utc(now) if now else None,
                n_workers=workers,
                summary_path=summary,
                scratch_dir=scratch_dir,
                replica_names=replica_names,
            )
    except _run_failures() as error:
        raise _run_failure(error) from None
    _report(result)


@app.command()
@_monitored("validate")
@_stops_on_ctrl_c
def validate(
    dataset_id: str,
    store: StoreOption = None,
    now: NowOption = None,
    replica: ReplicaOption = None,
    no_replicas: NoReplicasOption = False,
) -> None:
    """Check DATASET_ID's published store: current data, recent NaNs, expected shards, and that each replica
    matches it. Non-zero exit on failure."""
    dataset = _dataset(dataset_id)
    replica_names = _replica_names(dataset, replica, no_replicas)
    try:
        report = dataset.run_validators(
            store_url=store, now=parse_utc(now) if now else None, replica_names=replica_names
        )
    except _run_failures() as error:
        raise _run_failure(error) from None
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("dataset-urls")
def dataset_urls(
    dataset_id: str,
    store: Annotated[
        list[str] | None,
        typer.Option("--store", help="A store to print instead of the defaults (repeat for several)."),
    ] = None,
    store_base: Annotated[
        str | None, typer.Option("--store-base", help="The base of the default stores (default: data/output).")
    ] = None,
) -> None:
    """Print, for each of DATASET_ID's stores (the plain Zarr store and the Icechunk repository of its version,
    then every declared replica), the Python that opens it with xarray."""
    from reformatters.common.icechunk_store import reader_code

    dataset = _dataset(dataset_id)
    if store_base:
        dataset = dataset.model_copy(update={"store_base": store_base})
    urls = [(url, "") for url in store or [dataset.default_store_url("zarr"), dataset.default_store_url("icechunk")]]
    if not store:
        urls += [
            (r.url, f" (replica {r.name}" + (f"; credentials {r.env_prefix}AWS_*)" if "://" in r.url else ")"))
            for r in dataset.selected_replicas()
        ]
    for index, (url, note) in enumerate(urls):
        if index:
            typer.echo("")
        typer.echo(f"# {url}{note}")
        typer.echo(reader_code(url), nl=False)


@app.command()
def maintain(
    dataset_id: str,
    store: StoreOption = None,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Expire snapshots older than this (e.g. 7d, 36h); main's tip stays.")
    ] = "7d",
    grace: Annotated[
        str,
        typer.Option("--grace", help="Delete unreferenced objects only once older than this (runs writing now)."),
    ] = "1d",
) -> None:
    """Expire old snapshots of DATASET_ID's Icechunk repository and delete the chunks no snapshot reaches any more,
    so a repository whose newest init is rewritten at every update does not grow without bound."""
    from reformatters.common.icechunk_store import is_icechunk_url
    from reformatters.common.icechunk_store import maintain as maintain_repository

    dataset = _dataset(dataset_id)
    url = store or dataset.default_store_url("icechunk")
    if not is_icechunk_url(url):
        raise _fail(f"maintain works on Icechunk repositories (a path ending in .icechunk), found {url}; pass one")
    ages = {}
    for name, text in (("--older-than", older_than), ("--grace", grace)):
        try:
            number = text.strip().removesuffix("d")
            days = number != text.strip() and number.replace(".", "", 1).isdigit()
            ages[name] = (pd.Timedelta(days=float(number)) if days else pd.Timedelta(text)).to_pytimedelta()
        except ValueError:
            raise _fail(f"{name} {text!r} is not a duration; expected e.g. 7d, 36h or 90min") from None
        if ages[name].total_seconds() <= 0:
            raise _fail(f"{name} {text!r} must be a positive duration")
    try:
        report = maintain_repository(url, older_than=ages["--older-than"], grace=ages["--grace"])
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(report.render())


@app.command()
def deploy(
    docker_image: DockerImageOption = None,
    dataset_id: Annotated[
        str | None, typer.Option("--dataset-id", help="Only this dataset's CronJobs (and the namespace's policy).")
    ] = None,
    dry_run: DryRunOption = False,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", help="Write one file per dataset (and namespace.yaml) here instead of applying them."
        ),
    ] = None,
) -> None:
    """Render every dataset's update and validate CronJobs and the NetworkPolicy; `kubectl apply -f -` them.

    Example: reformatters deploy --docker-image ghcr.io/me/reformatters:$(git rev-parse HEAD)
    """
    from reformatters.deploy.render import DeployError, render, resolve_image, write_rendered

    try:
        datasets = [_dataset(dataset_id)] if dataset_id else all_datasets()
    except DatasetRegistrationError as error:
        raise _fail(str(error)) from None
    try:
        rendered = render(datasets, resolve_image(docker_image))
    except DeployError as error:
        raise _fail(str(error)) from None
    if dataset_id and dataset_id not in rendered:
        raise _fail(
            f"{dataset_id} declares no operational resources; give its DynamicalDataset an "
            "operational_resources() (see noaa-gfs-forecast) to deploy it"
        )
    if output_dir is not None:
        for path in write_rendered(rendered, output_dir):
            typer.echo(f"wrote {path}")
        return
    _apply_or_print([manifest for manifests in rendered.values() for manifest in manifests], dry_run)


RepoOption = Annotated[
    Path,
    typer.Option("--repo", help="The project's git checkout (default: the current directory's repository)."),
]
VersionOption = Annotated[
    str, typer.Option("--version", help="The staged dataset_version, without its 'v' (such as 0.3.0).")
]


def _staged(dataset_id: str, version: str) -> Any:
    from reformatters.deploy.staging import StagedVersion

    try:
        return StagedVersion(dataset_id=dataset_id, version=version)
    except ValueError as error:
        message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
        raise _fail(message.removeprefix("Value error, ")) from None


@app.command("deploy-staging")
def deploy_staging(
    dataset_id: Annotated[str, typer.Option("--dataset-id", help="The dataset whose new version is staged.")],
    version: VersionOption,
    docker_image: Annotated[
        str,
        typer.Option(
            "--docker-image",
            help="Image built from the stage branch: REPOSITORY:GIT_SHA, or a bare GIT_SHA of "
            "ghcr.io/dynamical-org/reformatters.",
        ),
    ],
    repo: RepoOption = Path("."),
    dry_run: DryRunOption = False,
) -> None:
    """Run DATASET_ID's new VERSION beside the primary: its update and validate CronJobs, staging names, offset
    schedules, its own store; `kubectl apply -f -` them.

    Checks first, applying nothing if one fails: the dataset exists, the checkout's template says VERSION, and
    main's template says another version. Example (the deploy-staging workflow, on a push of
    stage/noaa-gfs-forecast/v0.3.0): reformatters deploy-staging --dataset-id noaa-gfs-forecast --version 0.3.0
    --docker-image ghcr.io/me/reformatters:$(git rev-parse HEAD)
    """
    from reformatters.deploy.render import DeployError, dataset_manifests, resolve_image
    from reformatters.deploy.staging import StagingError, check_versions, repo_root, template_in_repo

    staged = _staged(dataset_id, version)
    dataset = _dataset(dataset_id)
    resources = dataset.operational_resources()
    if resources is None:
        raise _fail(
            f"{dataset_id} declares no operational resources; give its DynamicalDataset an "
            "operational_resources() (see noaa-gfs-forecast) to stage it"
        )
    try:
        root = repo_root(repo)
        check_versions(staged, root, template_in_repo(dataset.template_config.template_path, root))
        manifests = dataset_manifests(
            dataset_id, resources, resolve_image(docker_image), staged, replicas=dataset.replicas
        )
    except (StagingError, DeployError) as error:
        raise _fail(str(error)) from None
    if not _apply_or_print(manifests, dry_run):
        return
    for manifest in manifests:
        typer.echo(f"staged CronJob {manifest['metadata']['name']} (schedule {manifest['spec']['schedule']})")
    typer.echo(
        f"store: {staged.store('$STORE_BASE')} (STORE_BASE: the ConfigMap's key store-base); remove the staging "
        f"with: reformatters cleanup-staging --dataset-id {dataset_id} --version {version}"
    )


@app.command("cleanup-staging")
def cleanup_staging(
    dataset_id: Annotated[str, typer.Option("--dataset-id", help="The dataset of the staged version.")],
    version: VersionOption,
    repo: RepoOption = Path("."),
    store_base: Annotated[
        str | None,
        typer.Option(
            "--store-base",
            envvar="REFORMATTERS_STORE_BASE",
            help="The stores' base (the ConfigMap's store-base), to name the store left in place.",
        ),
    ] = None,
) -> None:
    """Remove a staged version: its CronJobs (kubectl delete), their Sentry cron monitors (with SENTRY_AUTH_TOKEN
    and SENTRY_ORG set; SENTRY_API_URL for a self-hosted Sentry) and the branch stage/DATASET_ID/vVERSION on
    origin. The store stays: the primary uses it once the version is promoted to main.
    """
    from reformatters.common.names import shorten
    from reformatters.deploy.render import CRON_JOB_NAME_LIMIT, DATASET_LABEL
    from reformatters.deploy.staging import COMPONENTS, StagingError, delete_branch, repo_root, sentry_api
    from reformatters.monitoring import MAX_SLUG_LENGTH

    staged = _staged(dataset_id, version)
    try:
        root = repo_root(repo)
    except StagingError as error:
        raise _fail(str(error)) from None
    names = [staged.name(component, CRON_JOB_NAME_LIMIT) for component in COMPONENTS]
    problems: list[str] = []
    _kubectl("delete", "cronjob", "-l", staged.selector(DATASET_LABEL))
    typer.echo(f"deleted the staged CronJobs ({', '.join(names)})")
    slugs = [shorten(name, MAX_SLUG_LENGTH) for name in names]  # the CronJobs' CRON_JOB_NAME, as monitoring does
    api = sentry_api(os.environ)
    if api is None:
        typer.echo(
            f"Sentry monitors remain: {', '.join(slugs)} (set SENTRY_AUTH_TOKEN and SENTRY_ORG to delete them, "
            "or delete them in Sentry's Crons page)"
        )
    else:
        for slug in slugs:
            try:
                typer.echo(api.delete_monitor(slug))
            except StagingError as error:
                problems.append(str(error))
    try:
        typer.echo(delete_branch(root, staged.branch))
    except StagingError as error:
        problems.append(str(error))
    store = staged.store(store_base or "$STORE_BASE")
    typer.echo(
        f"left in place: the store {store}"
        + ("" if store_base else " (STORE_BASE: the ConfigMap's key store-base)")
        + "; the primary uses it once this version is on main, else delete it"
    )
    for problem in problems:
        typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(code=1)


def _kubectl(*args: str, stdin: str | None = None) -> None:
    """Run kubectl with these arguments (and `stdin`); a failure ends the command with one line."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise _fail(
            "kubectl not found on PATH; install kubectl and point it at the cluster"
            + (", or use --dry-run" if args[0] == "apply" else "")
        )
    completed = subprocess.run([kubectl, *args], input=stdin, text=True, check=False)
    if completed.returncode != 0:
        raise _fail(f"kubectl {args[0]} exited with status {completed.returncode} (its output is above)", 1)


def _apply_or_print(manifests: list[dict[str, Any]], dry_run: bool) -> bool:
    """`kubectl apply -f -` with the manifests' YAML on its standard input; with `dry_run`, print the YAML instead.
    Whether they were applied."""
    from reformatters.deploy.render import to_yaml

    text = to_yaml(manifests)
    if dry_run:
        typer.echo(text, nl=False)
        return False
    _kubectl("apply", "-f", "-", stdin=text)
    return True


@app.command()
@_stops_on_ctrl_c
def demo(
    preset: Annotated[str, typer.Option(help="'default' or 'small' (fast, for CI).")] = "default",
    workdir: Annotated[Path, typer.Option(help="Where the archive and the dataset go.")] = Path("data/demo"),
) -> None:
    """Run the whole product offline: generate an archive, serve it on loopback, backfill, update, validate."""
    from reformatters.demo import run_demo

    run_demo(preset=preset, workdir=workdir)


if __name__ == "__main__":
    app()
