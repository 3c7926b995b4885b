"""The scratch path against the ensemble size: `noaa-gefs-forecast-35-day` backfills of one init on the full 0.25
degree grid, a few leads, for two member counts, every variable-region through the scratch (the in-memory path would
need a 26.2 GB shard-padded buffer per variable-region).

    python -m benchmarks.gefs_scratch [--members 3,31] [--leads 0-21] [--variables temperature_2m,relative_humidity_2m]
                                      [--json PATH]

One archive is generated for the largest member count (cached under ~/.cache/reformatters/archives) and served on
loopback; each run reads members 0..n-1 of it, on a LocalCluster of 2 workers. Both runs have the same leads, grid
and shard shape (the member axis is one 31-wide chunk whatever the member count), so they differ only in the
members: what each worker holds while its variable-region is decoded, encoded and uploaded is compared on equal
terms. Reported per run, from the run summary: the highest RssAnon of a worker while its scratch task ran (sampled
inside the task every 10 ms; the page cache of the scratch file is not in it), its growth over the task, the
scratch bytes one variable-region took on disk, decodes per field read, wall time, fields per second. The
machine's bound is measured as `benchmarks/backfill.py` does (decode + rounding + compression of the archive's
fields on one core, times the cores; compression on the dataset's inner chunks as a complete forecast fills them)
before, between and after the runs; each run is judged against the two
measurements around it, and the marginal throughput (the larger run's extra fields over its extra time) against
their mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

INIT = datetime(2020, 10, 1)
MEMORY_TOLERANCE = 0.10  # the runs' peak RssAnon per worker within 10 % of each other
MEMORY_LIMIT_BYTES = 1.5e9


def parse_leads(text: str) -> list[int]:
    """`0,3,6` or `0-21` (every 3 h)."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-"))
        return list(range(first, last + 1, 3))
    return [int(part) for part in text.split(",")]


def measure_bound(archive: Any, variables: list[str], members: int, leads: list[int], cores: int) -> dict[str, Any]:
    """Per-field seconds of decode + rounding + compression of the archive's fields on one core. Compression is
    measured on inner chunks of the dataset's shape holding the archive's leads (all members x the leads x 17 x 16;
    the dataset's are 64 leads deep, but repeating leads would flatter the compressor), with the array's Blosc
    settings on one thread: a sample of chunk positions, scaled to the chunks a field spans."""
    import numcodecs
    import numpy as np
    from reformatters_datasets.noaa.gefs.forecast_35_day.region_job import fine_grid, step_text
    from reformatters_datasets.noaa.gefs.forecast_35_day.template_config import gefs_forecast_35_day_template_config

    from reformatters.common.binary_rounding import round_float32_inplace
    from reformatters.pipeline.kernels import limit_library_threads
    from reformatters.sources.grib_decode import decode_message
    from reformatters.sources.grib_index import find_message, parse_ncep_idx

    limit_library_threads()
    numcodecs.blosc.set_nthreads(1)
    by_name = {v.name: v for v in gefs_forecast_35_day_template_config().data_vars}
    grid = fine_grid(0.25)
    depth = len(leads)
    rng = np.random.default_rng(0)
    per_variable: dict[str, dict[str, float]] = {}
    for name in variables:
        var = by_name[name]
        cube = np.empty((members, depth, grid.nj, grid.ni), dtype=np.float32)
        decode_seconds: list[float] = []
        round_seconds: list[float] = []
        for member in range(members):
            for i, lead in enumerate(leads[:depth]):
                step = step_text(var, lead)
                assert step is not None, (name, lead)
                path = archive.path(INIT, member, "s", lead)
                entry = find_message(
                    parse_ncep_idx(Path(f"{path}.idx").read_text()),
                    var.internal_attrs.grib_element,
                    var.internal_attrs.grib_level,
                    step,
                )
                with open(path, "rb") as file:
                    file.seek(entry.start)
                    message = file.read() if entry.end is None else file.read(entry.end - entry.start)
                t0 = time.perf_counter()
                decode_message(message, grid, out=cube[member, i])
                t1 = time.perf_counter()
                keep = var.internal_attrs.keep_mantissa_bits
                if isinstance(keep, int):
                    round_float32_inplace(cube[member, i], keep)
                round_seconds.append(time.perf_counter() - t1)
                decode_seconds.append(t1 - t0)
        _, chunk_members, chunk_leads, chunk_rows, chunk_columns = var.encoding.chunks
        (compressor,) = var.encoding.compressors
        blosc = numcodecs.Blosc(
            cname=compressor.cname,
            clevel=compressor.clevel,
            shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[compressor.shuffle],
        )
        chunk_leads = min(chunk_leads, depth)
        chunk = np.empty((chunk_members, chunk_leads, chunk_rows, chunk_columns), dtype=np.float32)
        samples = 200
        compress = 0.0
        for _ in range(samples):
            row = int(rng.integers(0, grid.nj // chunk_rows)) * chunk_rows
            column = int(rng.integers(0, grid.ni // chunk_columns)) * chunk_columns
            rows, columns = slice(row, row + chunk_rows), slice(column, column + chunk_columns)
            chunk[:members] = cube[:chunk_members, :chunk_leads, rows, columns]
            chunk[members:] = np.nan
            t0 = time.perf_counter()
            blosc.encode(chunk)
            compress += time.perf_counter() - t0
        chunks_per_field = -(-grid.nj // chunk_rows) * -(-grid.ni // chunk_columns)
        per_variable[name] = {
            "decode_seconds": statistics.median(decode_seconds),
            "round_seconds": statistics.median(round_seconds),
            "compress_seconds": compress / samples * chunks_per_field / (chunk_members * chunk_leads),
        }
        del cube
    per_field = statistics.fmean(sum(p.values()) for p in per_variable.values())
    return {
        "per_variable": per_variable,
        "seconds_per_field_one_core": per_field,
        "cores": cores,
        "fields_per_second": cores / per_field,
    }


def run(
    members: int, leads: list[int], variables: list[str], workers: int, archive: Any, workdir: Path
) -> dict[str, Any]:
    from reformatters_datasets.noaa.gefs.forecast_35_day.dataset import GefsForecast35DayDataset
    from reformatters_datasets.noaa.gefs.forecast_35_day.template_config import gefs_forecast_35_day_template_config

    from reformatters.region_job import RegionJobFilters
    from reformatters.testing.archive_server import ArchiveServer

    member_ids = tuple(range(members))
    templates = workdir / f"templates-{members}"
    config = gefs_forecast_35_day_template_config(ensemble_members=member_ids, templates_dir=templates)
    config.update_template(templates_dir=templates)
    dataset = GefsForecast35DayDataset(template_config=config)
    with ArchiveServer(archive.root) as server:
        started = time.perf_counter()
        summary = dataset.backfill(
            "2020-10-02T00:00",
            cluster="local",
            n_workers=workers,
            store_url=str(workdir / f"store-{members}.zarr"),
            source_url=server.url,
            filters=RegionJobFilters.parse(variable_names=variables),
            show_progress=False,
            scratch_dir=str(workdir / "scratch"),
        )
        wall = time.perf_counter() - started
    entries = [summary.variables[name] for name in variables]
    if not all(entry.scratch_bytes > 0 for entry in entries):
        raise RuntimeError(f"a variable-region did not take the scratch path: {entries}")
    fields = sum(entry.files_ok + entry.files_read_failed for entry in entries)
    decodes = sum(entry.decodes for entry in entries)
    return {
        "members": members,
        "leads": leads,
        "variables": variables,
        "fields_read": fields,
        "source_files_requested": sum(
            entry.files_ok
            + entry.files_not_published_yet
            + entry.files_not_found
            + entry.files_download_failed
            + entry.files_read_failed
            for entry in entries
        ),
        "decodes": decodes,
        "decodes_per_field": decodes / fields if fields else float("nan"),
        "peak_rss_anon_mb": max(entry.peak_rss_anon_bytes for entry in entries) / 1e6,
        "rss_anon_growth_mb": max(entry.rss_anon_growth_bytes for entry in entries) / 1e6,
        "scratch_mb_per_worker": max(entry.scratch_bytes for entry in entries) / 1e6,
        "region_gb_in_memory": 1 * 31 * 192 * 748 * 1472 * 4 / 1e9,  # the shard-padded buffer of the in-memory path
        "wall_seconds": wall,
        "fields_per_second": fields / wall,
    }


def main(argv: list[str] | None = None) -> None:
    import os

    from reformatters.testing.gefs_archive import generate_gefs_archive

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="3,31", help="two member counts, comma-separated (members 0..n-1)")
    parser.add_argument("--leads", default="0-21", help="lead hours in the archive: `0,3,6` or `0-21` (every 3 h)")
    parser.add_argument(
        "--variables", default="temperature_2m,relative_humidity_2m", help="variables of the `s` product"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs write (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    leads = parse_leads(args.leads)
    variables = args.variables.split(",")
    member_counts = sorted(int(n) for n in args.members.split(","))
    cores = len(os.sched_getaffinity(0))
    started = time.perf_counter()
    archive = generate_gefs_archive(
        [INIT], range(max(member_counts)), leads, variables=variables, products=("s",), workers=args.workers
    )
    archive_seconds = time.perf_counter() - started
    bounds = [measure_bound(archive, variables, max(member_counts), leads, cores)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gefs-scratch-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        for members in member_counts:
            rows.append(run(members, leads, variables, args.workers, archive, workdir))
            bounds.append(measure_bound(archive, variables, max(member_counts), leads, cores))
    for i, row in enumerate(rows):
        around = [bounds[i]["seconds_per_field_one_core"], bounds[i + 1]["seconds_per_field_one_core"]]
        row["bound_ms_per_field_one_core"] = 1000 * statistics.fmean(around)
        row["bound_fields_per_second"] = cores / statistics.fmean(around)
        row["vs_bound"] = row["fields_per_second"] / row["bound_fields_per_second"]
    small, large = rows[0], rows[-1]
    marginal = (large["fields_read"] - small["fields_read"]) / (large["wall_seconds"] - small["wall_seconds"])
    bound_all = statistics.fmean(b["seconds_per_field_one_core"] for b in bounds)
    peaks = [row["peak_rss_anon_mb"] for row in rows]
    spread = (max(peaks) - min(peaks)) / max(peaks)
    derived = {
        "marginal_fields_per_second": marginal,
        "fixed_seconds": small["wall_seconds"] - small["fields_read"] / marginal,
        "bound_ms_per_field_one_core": 1000 * bound_all,
        "bound_fields_per_second": cores / bound_all,
        "marginal_vs_bound": marginal / (cores / bound_all),
        "peak_rss_anon_spread": spread,
        "memory_within_10_percent": spread <= MEMORY_TOLERANCE,
        "memory_at_most_1_5_gb": max(peaks) * 1e6 <= MEMORY_LIMIT_BYTES,
    }
    why = (
        f"Both runs read leads {leads} of the same archive on the full grid with the same shard shape (the member "
        "axis one 31-wide chunk): they differ only in the member count, and the smaller one reaches the worker's "
        "steady state (each worker decodes, encodes and uploads at least one whole variable-region of "
        f"{small['fields_read'] // len(variables)} fields)."
    )
    print(why)
    for row in rows:
        print(
            f"members {row['members']:>2}: {row['fields_read']} fields ({row['source_files_requested']} files asked "
            f"for), decodes/field {row['decodes_per_field']:.2f}, peak RssAnon per worker {row['peak_rss_anon_mb']:.0f}"
            f" MB (growth {row['rss_anon_growth_mb']:.0f} MB), scratch per worker {row['scratch_mb_per_worker']:.0f} "
            f"MB, {row['wall_seconds']:.1f} s, {row['fields_per_second']:.2f} fields/s = {100 * row['vs_bound']:.0f} %"
            f" of the bound {row['bound_fields_per_second']:.1f} fields/s ({row['bound_ms_per_field_one_core']:.1f} "
            f"ms per field on one core x {cores})"
        )
    print(
        f"marginal {marginal:.2f} fields/s = {100 * derived['marginal_vs_bound']:.0f} % of the bound "
        f"{derived['bound_fields_per_second']:.1f} fields/s; fixed {derived['fixed_seconds']:.1f} s; peak RssAnon "
        f"spread {100 * spread:.1f} % (goal <= {100 * MEMORY_TOLERANCE:.0f} %), highest {max(peaks):.0f} MB "
        f"(goal <= {MEMORY_LIMIT_BYTES / 1e6:.0f} MB)"
    )
    report = {
        "runs": rows,
        "bounds": bounds,
        "derived": derived,
        "why_comparable": why,
        "archive_seconds": archive_seconds,
        "cores": cores,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
