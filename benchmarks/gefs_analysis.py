"""Peak memory per worker for one variable-region of `noaa-gefs-analysis`: the published shape (2880 steps x the full
0.25 degree grid, chunks (1440, 32, 32), shards (2880, 384, 384): 12 GB of float32, 13.6 GB padded to whole shards,
so it takes the scratch path), backfilled from a generated archive of c00 runs served on loopback.

    python -m benchmarks.gefs_analysis [--steps 96] [--variables temperature_2m,precipitation_surface] [--json PATH]

The archive holds the runs and leads (0 and 3 h, and 6 h for windowed variables) of the region's first `--steps` steps
(`--steps 2880`: the whole region); the region's other steps
are missing files (holes in the sparse scratch file, NaN in the store, counted as not found). One region per
variable, on a LocalCluster of `--workers` workers (2), each variable-region one scratch task. Reported per variable,
from the run summary: the highest anonymous memory of the worker while its scratch task ran (RssAnon, sampled every
10 ms), its growth over the task, the highest resident mapped-file memory (RssFile + RssShmem: the scratch file's
pages, which Dask's memory monitor counts as the worker's memory and `MappedPagesRelease` flushes and drops every
256 MiB of growth), the scratch file's bytes on disk, fields read, wall time of the backfill.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REGION_STEPS = 2880


def run(steps: int, variables: list[str], workers: int, workdir: Path) -> dict[str, Any]:
    from reformatters_datasets.noaa.gefs.analysis.dataset import GefsAnalysisDataset
    from reformatters_datasets.noaa.gefs.analysis.template_config import (
        CURRENT_ERA_START,
        FREQUENCY,
        gefs_analysis_template_config,
    )

    from reformatters.region_job import RegionJobFilters
    from reformatters.testing.archive_server import ArchiveServer
    from reformatters.testing.gefs_archive import generate_gefs_archive

    start = CURRENT_ERA_START.to_pydatetime()
    # Every run a step of the first `steps` comes from: lead 0/3 h (instantaneous), 3/6 h (windows, one run back).
    runs = [start - timedelta(hours=6) + timedelta(hours=6 * i) for i in range(steps // 2 + 1)]
    started = time.perf_counter()
    config = gefs_analysis_template_config(templates_dir=workdir / "templates")
    windows = any(config.data_var(name).internal_attrs.window != "instant" for name in variables)
    leads = [0, 3, 6] if windows else [0, 3]
    archive = generate_gefs_archive(runs, [0], leads, variables=variables, products=("s",), workers=workers)
    archive_seconds = time.perf_counter() - started
    config.update_template(templates_dir=workdir / "templates")
    dataset = GefsAnalysisDataset(template_config=config)
    end = CURRENT_ERA_START + FREQUENCY * REGION_STEPS
    with ArchiveServer(archive.root) as server:
        started = time.perf_counter()
        summary = dataset.backfill(
            end,
            cluster="local",
            n_workers=workers,
            store_url=str(workdir / "store.zarr"),
            source_url=server.url,
            filters=RegionJobFilters.parse(variable_names=variables),
            show_progress=False,
            scratch_dir=str(workdir / "scratch"),
        )
        wall = time.perf_counter() - started
    rows = []
    for name in variables:
        entry = summary.variables[name]
        if not entry.scratch_bytes:
            raise RuntimeError(f"{name}: the variable-region did not take the scratch path: {entry}")
        rows.append(
            {
                "variable": name,
                "fields_read": entry.files_ok,
                "files_not_found": entry.files_not_found + entry.files_not_published_yet,
                "peak_rss_anon_mb": entry.peak_rss_anon_bytes / 1e6,
                "rss_anon_growth_mb": entry.rss_anon_growth_bytes / 1e6,
                "peak_rss_mapped_mb": entry.peak_rss_mapped_bytes / 1e6,
                "rss_mapped_growth_mb": entry.rss_mapped_growth_bytes / 1e6,
                "scratch_mb": entry.scratch_bytes / 1e6,
            }
        )
    template = config.get_template(end)
    shards = config.data_vars[0].encoding.shards or ()
    padded = [-(-n // s) * s for n, s in zip(template[variables[0]].shape, shards, strict=True)]
    return {
        "steps_with_data": steps,
        "region_steps": REGION_STEPS,
        "region_gb_shard_padded": padded[0] * padded[1] * padded[2] * 4 / 1e9,
        "variables": rows,
        "workers": workers,
        "wall_seconds": wall,
        "archive_files": len(archive.files),
        "archive_seconds": archive_seconds,
        "published_end": summary.published_append_dim_end,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=96, help="steps of the region the archive has data for")
    parser.add_argument("--variables", default="temperature_2m,precipitation_surface")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the run writes (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    variables = args.variables.split(",")
    with tempfile.TemporaryDirectory(prefix="gefs-analysis-bench-") as tmp:
        report = run(args.steps, variables, args.workers, args.workdir or Path(tmp))
    print(
        f"noaa-gefs-analysis, one variable-region per variable: {report['region_steps']} steps x 721 x 1440 "
        f"({report['region_gb_shard_padded']:.1f} GB shard-padded float32, scratch path), data in the first "
        f"{report['steps_with_data']} steps; {report['workers']} workers; backfill {report['wall_seconds']:.1f} s"
    )
    for row in report["variables"]:
        print(
            f"  {row['variable']}: {row['fields_read']} fields, peak RssAnon per worker "
            f"{row['peak_rss_anon_mb']:.0f} MB (growth {row['rss_anon_growth_mb']:.0f} MB), peak mapped "
            f"(RssFile + RssShmem) {row['peak_rss_mapped_mb']:.0f} MB (growth {row['rss_mapped_growth_mb']:.0f} MB), "
            f"scratch on disk {row['scratch_mb']:.0f} MB"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
