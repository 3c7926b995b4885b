"""`reformatters demo`: the whole product offline, on a generated NOAA-layout GFS archive.

1. generate (or reuse from cache) real GRIB2 files with `.idx` inventories in NOAA's bucket layout;
2. serve them on 127.0.0.1 with HTTP range support, the newest run not yet published;
3. backfill `noaa-gfs-forecast` on a LocalCluster from that server;
4. let the newest run arrive and run the operational update;
5. validate, and print the dataset and where it lives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import typer

from reformatters.common.time_utils import utc_now
from reformatters.region_job import RegionJobFilters

DATASET_ID = "noaa-gfs-forecast"


@dataclass(frozen=True)
class DemoPreset:
    init_times: int
    lead_hours: tuple[int, ...]
    workers: int
    description: str


PRESETS = {
    "small": DemoPreset(
        init_times=3,
        lead_hours=tuple(range(0, 4)),
        workers=2,
        description="3 runs, leads 0-3 h (later leads are absent from the archive and stay NaN)",
    ),
    "default": DemoPreset(
        init_times=3,
        lead_hours=tuple(range(0, 25)),
        workers=2,
        description="3 runs, leads 0-24 h hourly (later leads are absent from the archive and stay NaN)",
    ),
}


def _say(message: str) -> None:
    typer.secho(f"[demo] {message}", fg=typer.colors.CYAN, err=True)


def demo_init_times(count: int, now: pd.Timestamp | None = None) -> list[pd.Timestamp]:
    """The `count` newest 6-hourly runs that would be complete by now."""
    newest = ((now or utc_now()) - pd.Timedelta(hours=6)).floor("6h")
    return [newest - pd.Timedelta(hours=6) * i for i in reversed(range(count))]


def run_demo(preset: str = "default", workdir: Path = Path("data/demo")) -> Path:
    from reformatters.registry import get_dataset
    from reformatters.testing.archive_server import ArchiveServer
    from reformatters.testing.noaa_archive import GFS_LAYOUT, default_cache_dir, generate_gfs_archive

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    started = time.perf_counter()
    inits = demo_init_times(settings.init_times)
    # The demo's store starts at its first run, not at the dataset's 2021 start: three runs, not thousands.
    dataset = get_dataset(DATASET_ID).starting_at(inits[0])
    newest = inits[-1]
    store_path = (workdir / f"{DATASET_ID}.zarr").absolute()
    if store_path.exists():
        import shutil

        shutil.rmtree(store_path)

    _say(f"preset {preset}: {settings.description}; runs {inits[0]:%Y-%m-%dT%H} .. {newest:%Y-%m-%dT%H} UTC")
    _say(f"generating the NOAA-layout GRIB2 archive (cached under {default_cache_dir()}) ...")
    t0 = time.perf_counter()
    manifest = generate_gfs_archive([t.to_pydatetime() for t in inits], settings.lead_hours, workers=settings.workers)
    total_bytes = sum(f.size for f in manifest.files)
    _say(f"archive ready: {len(manifest.files)} files, {total_bytes / 1e9:.2f} GB, in {time.perf_counter() - t0:.1f} s")

    with ArchiveServer(manifest.root) as server:
        newest_dir = GFS_LAYOUT.file_path(newest.to_pydatetime(), 0).rsplit("/", 1)[0]
        server.unpublish(f"{newest_dir}/*")
        _say(f"serving it at {server.url} (the {newest:%H}z run of {newest:%Y-%m-%d} not yet published)")

        _say(f"backfill {DATASET_ID} up to {newest:%Y-%m-%dT%H} (exclusive) on a LocalCluster ...")
        backfill_summary = dataset.backfill(
            newest,
            cluster="local",
            n_workers=settings.workers,
            store_url=str(store_path),
            source_url=server.url,
            filters=RegionJobFilters(start=inits[0]),
        )
        for line in backfill_summary.render_lines():
            _say(line)

        server.publish(f"{newest_dir}/*")
        update_now = newest + pd.Timedelta(hours=6)
        _say(f"the {newest:%H}z run arrives; operational update as of {update_now:%Y-%m-%dT%H:%M} ...")
        update_summary = dataset.update(
            cluster="local",
            store_url=str(store_path),
            source_url=server.url,
            now=update_now,
            n_workers=settings.workers,
        )
        for line in update_summary.render_lines():
            _say(line)
        requested = sum(server.bytes_sent.values())
        _say(
            f"fetched {requested / 1e6:.1f} MB over HTTP in total, "
            f"{100 * requested / max(total_bytes, 1):.1f} % of the archive's {total_bytes / 1e6:.0f} MB"
        )

    _say("validating ...")
    report = dataset.run_validators(store_url=str(store_path), now=update_now)
    for line in report.lines():
        _say(line)

    published = dataset.open_published(str(store_path))
    typer.echo(published)
    ingested = published["ingested_forecast_length"].to_series()
    typer.echo("\ningested_forecast_length per init_time:")
    for init, length in ingested.items():
        typer.echo(f"  {pd.Timestamp(init):%Y-%m-%dT%H}  {length}")
    typer.echo(f"\ndataset: {store_path}")
    typer.echo(f'open it: xarray.open_zarr("{store_path}")')
    _say(f"done in {time.perf_counter() - started:.1f} s")
    if not report.ok:
        raise typer.Exit(code=1)
    return store_path
