"""`reformatters`: turn GRIB2 archives into Zarr v3 datasets and keep them current."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from reformatters.cluster import ClusterUnavailableError
from reformatters.common.time_utils import parse_utc
from reformatters.pipeline.worker_setup import LOG_FORMAT, LOG_LEVEL_ENVIRON
from reformatters.publish import DEFAULT_LEASE_WAIT_SECONDS, RunCannotStartError
from reformatters.region_job import RegionJobFilters
from reformatters.registry import DatasetRegistrationError, UnknownDatasetError, all_datasets, get_dataset
from reformatters.update.lease import terminate_on_sigterm

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
ScratchDirOption = Annotated[
    str | None,
    typer.Option(
        "--scratch-dir",
        help="Where workers keep variable-regions too large for memory (datasets that opt in); "
        "default: each worker's temporary directory.",
    ),
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
    from reformatters.sources.reachability import SourceUnreachableError

    return (ClusterUnavailableError, RunCannotStartError, SourceUnreachableError, ValueError)


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
    workers: Annotated[int | None, typer.Option(help="Workers for --cluster local.")] = None,
    summary: Annotated[Path | None, typer.Option(help="Also write the run summary as JSON here.")] = None,
    lease_wait: Annotated[
        float,
        typer.Option(
            help="Seconds to wait while another backfill or update publishes to the store (it holds the lease); "
            f"exit status {EXIT_LEASE_HELD} if it still does."
        ),
    ] = DEFAULT_LEASE_WAIT_SECONDS,
    scratch_dir: ScratchDirOption = None,
) -> None:
    """Build DATASET_ID's history up to APPEND_DIM_END on a Dask cluster (also into a store readers use).

    Example: reformatters backfill noaa-gfs-forecast 2025-01-01T00:00 --cluster local --filter-start 2024-12-01
    """
    dataset = _dataset(dataset_id)
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
            )
    except _run_failures() as error:
        raise _run_failure(error) from None
    typer.echo("\n".join(result.render_lines()))


@app.command()
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
) -> None:
    """Append the newest runs to DATASET_ID and publish each region as it completes (the operational CronJob).

    Stops at once, exit status 3, while another backfill or update publishes to the store."""
    dataset = _dataset(dataset_id)
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
            )
    except _run_failures() as error:
        raise _run_failure(error) from None
    typer.echo("\n".join(result.render_lines()))


@app.command()
@_stops_on_ctrl_c
def validate(dataset_id: str, store: StoreOption = None, now: NowOption = None) -> None:
    """Check DATASET_ID's published store: current data, recent NaNs, expected shards. Non-zero exit on failure."""
    dataset = _dataset(dataset_id)
    report = dataset.run_validators(store_url=store, now=parse_utc(now) if now else None)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(code=1)


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
