"""Memory of the scratch path against the ensemble size: a noaa-gefs-forecast-35-day backfill of one init on the
full 0.25 degree grid, a few leads, for several member counts, every variable-region through the scratch.

    python -m benchmarks.gefs_scratch [--members 3,31] [--leads 0,3,6] [--variable temperature_2m] [--json PATH]

The archive is generated (cached under ~/.cache/reformatters/archives) and served on loopback; the backfill runs
on a LocalCluster. Reported per member count, from the run summary: the highest RssAnon a worker held while a
scratch task ran (sampled inside the task, every 10 ms; the page cache of the scratch file is not in it), its
growth over the task, the scratch bytes one variable-region took on disk, decodes per field read, the wall time
and fields per second.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

INIT = datetime(2020, 10, 1)


def run(members: int, leads: list[int], variable: str, workers: int, workdir: Path) -> dict[str, Any]:
    from reformatters_datasets.noaa.gefs.forecast_35_day.dataset import GefsForecast35DayDataset
    from reformatters_datasets.noaa.gefs.forecast_35_day.region_job import GefsForecast35DayRegionJob
    from reformatters_datasets.noaa.gefs.forecast_35_day.template_config import gefs_forecast_35_day_template_config

    from reformatters.region_job import RegionJobFilters
    from reformatters.testing.archive_server import ArchiveServer
    from reformatters.testing.gefs_archive import generate_gefs_archive

    member_ids = tuple(range(members))
    templates = workdir / f"templates-{members}"
    config = gefs_forecast_35_day_template_config(ensemble_members=member_ids, templates_dir=templates)
    config.update_template(templates_dir=templates)
    started = time.perf_counter()
    archive = generate_gefs_archive([INIT], member_ids, leads, variables=(variable,), products=("s",), workers=2)
    generated = time.perf_counter() - started
    GefsForecast35DayRegionJob.scratch_region_bytes = 0  # every variable-region through the scratch
    dataset = GefsForecast35DayDataset(template_config=config)
    with ArchiveServer(archive.root) as server:
        started = time.perf_counter()
        summary = dataset.backfill(
            "2020-10-02T00:00",
            cluster="local",
            n_workers=workers,
            store_url=str(workdir / f"store-{members}.zarr"),
            source_url=server.url,
            filters=RegionJobFilters.parse(variable_names=[variable]),
            show_progress=False,
            scratch_dir=str(workdir / "scratch"),
        )
        wall = time.perf_counter() - started
    entry = summary.variables[variable]
    fields = entry.files_ok + entry.files_read_failed
    return {
        "members": members,
        "leads": leads,
        "fields_read": fields,
        "decodes": entry.decodes,
        "decodes_per_field": entry.decodes / fields if fields else float("nan"),
        "peak_rss_anon_mb": entry.peak_rss_anon_bytes / 1e6,
        "rss_anon_growth_mb": entry.rss_anon_growth_bytes / 1e6,
        "scratch_mb": entry.scratch_bytes / 1e6,
        "region_gb_in_memory": 1 * 31 * 192 * 748 * 1472 * 4 / 1e9,  # the shard-padded buffer the in-memory path needs
        "wall_seconds": wall,
        "fields_per_second": fields / wall,
        "archive_seconds": generated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="3,31", help="member counts, comma-separated (members 0..n-1)")
    parser.add_argument("--leads", default="0,3,6", help="lead hours in the archive, comma-separated")
    parser.add_argument("--variable", default="temperature_2m", help="a variable of the `s` product")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs write (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    leads = [int(h) for h in args.leads.split(",")]
    with tempfile.TemporaryDirectory(prefix="gefs-scratch-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [run(int(n), leads, args.variable, args.workers, workdir) for n in args.members.split(",")]
    for row in rows:
        print(
            f"members {row['members']:>2}: {row['fields_read']} fields, decodes/field {row['decodes_per_field']:.2f}, "
            f"peak RssAnon {row['peak_rss_anon_mb']:.0f} MB (growth {row['rss_anon_growth_mb']:.0f} MB), "
            f"scratch {row['scratch_mb']:.0f} MB, {row['wall_seconds']:.1f} s, {row['fields_per_second']:.2f} fields/s"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
