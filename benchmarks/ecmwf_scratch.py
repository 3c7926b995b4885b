"""Memory of the scratch path against the ensemble size for ecmwf-ifs-ens-forecast-15-day-0-25-degree: a backfill
of one init on the full 0.25 degree grid, a few steps, for several member counts, every variable-region through the
scratch.

    python -m benchmarks.ecmwf_scratch [--members 5,51] [--leads 0,3,6,9,12,15] [--variable temperature_2m]
                                       [--json PATH]

One ECMWF-layout archive (one `enfo` file per step holding every member, CCSDS packing, JSON-lines `.index`) is
generated for the largest member count, as ECMWF's files always hold all 51 (cached under
~/.cache/reformatters/archives), and served on loopback; each run reads members 0..n-1 of it, on a LocalCluster.
The init is after IFS cycle 50r1, so member 0 is read from the `oper` files. The runs differ only in the member
count: same files and indexes, same leads, grid and shard shape (the member axis is one 51-wide chunk whatever the
member count). Reported per member count, from the run summary: the highest RssAnon a worker held while a scratch
task ran (sampled inside the task, every 10 ms; the page cache of the scratch file is not in it), its growth over
the task, the scratch bytes one variable-region took on disk, decodes per field read, the wall time and fields per
second; then the spread of the peaks against the goal (within 10 % of each other).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

INIT = datetime(2026, 5, 12)
MEMORY_TOLERANCE = 0.10  # the runs' peak RssAnon per worker within 10 % of each other
PARAMS = {
    "temperature_2m": "2t",
    "precipitation_surface": "tp",
    "wind_u_10m": "10u",
    "downward_short_wave_radiation_flux_surface": "ssrd",
}


def run(members: int, leads: list[int], variable: str, workers: int, archive: Any, workdir: Path) -> dict[str, Any]:
    from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.dataset import (
        EcmwfIfsEnsForecast15DayDataset,
    )
    from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.region_job import EcmwfIfsEnsRegionJob
    from reformatters_datasets.ecmwf.ifs_ens.forecast_15_day_0_25_degree.template_config import (
        ecmwf_ifs_ens_template_config,
    )

    from reformatters.region_job import RegionJobFilters
    from reformatters.testing.archive_server import ArchiveServer

    member_ids = tuple(range(members))
    templates = workdir / f"templates-{members}"
    config = ecmwf_ifs_ens_template_config(
        ensemble_members=member_ids, templates_dir=templates, append_dim_start=f"{INIT:%Y-%m-%dT%H:%M}"
    )
    config.update_template(templates_dir=templates)
    EcmwfIfsEnsRegionJob.scratch_region_bytes = 0  # every variable-region through the scratch
    dataset = EcmwfIfsEnsForecast15DayDataset(template_config=config)
    with ArchiveServer(archive.root) as server:
        started = time.perf_counter()
        summary = dataset.backfill(
            f"{INIT.replace(day=INIT.day + 1):%Y-%m-%dT%H:%M}",
            cluster="local",
            n_workers=workers,
            store_url=str(workdir / f"store-{members}.zarr"),
            source_url=server.url,
            filters=RegionJobFilters.parse(variable_names=[variable]),
            show_progress=False,
            scratch_dir=str(workdir / "scratch"),
        )
        wall = time.perf_counter() - started
        requests = sum(server.requests.values())
    entry = summary.variables[variable]
    fields = entry.files_ok + entry.files_read_failed
    return {
        "members": members,
        "leads": leads,
        "variable": variable,
        "fields_read": fields,
        "decodes": entry.decodes,
        "decodes_per_field": entry.decodes / fields if fields else float("nan"),
        "peak_rss_anon_mb": entry.peak_rss_anon_bytes / 1e6,
        "rss_anon_growth_mb": entry.rss_anon_growth_bytes / 1e6,
        "scratch_mb": entry.scratch_bytes / 1e6,
        # The shard-padded buffer the in-memory path would need for the published 51 members.
        "region_gb_in_memory_51_members": 1 * 85 * 51 * 960 * 1600 * 4 / 1e9,
        "requests": requests,
        "wall_seconds": wall,
        "fields_per_second": fields / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="5,51", help="member counts, comma-separated (members 0..n-1)")
    parser.add_argument("--leads", default="0,3,6,9,12,15", help="steps in the archive, comma-separated")
    parser.add_argument("--variable", default="temperature_2m", choices=sorted(PARAMS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs write (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    from reformatters.testing.ecmwf_archive import generate_ecmwf_archive

    leads = [int(h) for h in args.leads.split(",")]
    member_counts = sorted(int(n) for n in args.members.split(","))
    started = time.perf_counter()
    archive = generate_ecmwf_archive(
        [INIT], leads, members=range(max(member_counts)), params=(PARAMS[args.variable],), workers=2
    )
    archive_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="ecmwf-scratch-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [run(n, leads, args.variable, args.workers, archive, workdir) for n in member_counts]
    for row in rows:
        print(
            f"members {row['members']:>2}: {row['fields_read']} fields, decodes/field {row['decodes_per_field']:.2f}, "
            f"peak RssAnon {row['peak_rss_anon_mb']:.0f} MB (growth {row['rss_anon_growth_mb']:.0f} MB), "
            f"scratch {row['scratch_mb']:.0f} MB, {row['requests']} requests, {row['wall_seconds']:.1f} s, "
            f"{row['fields_per_second']:.2f} fields/s"
        )
    peaks = [row["peak_rss_anon_mb"] for row in rows]
    spread = (max(peaks) - min(peaks)) / max(peaks)
    print(
        f"peak RssAnon spread: {100 * spread:.1f} % of the largest (goal <= {100 * MEMORY_TOLERANCE:.0f} %), "
        f"{max(peaks) - min(peaks):.1f} MB"
    )
    report = {
        "runs": rows,
        "derived": {"peak_rss_anon_spread": spread, "memory_within_10_percent": spread <= MEMORY_TOLERANCE},
        "archive_members": max(member_counts),
        "archive_seconds": archive_seconds,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
