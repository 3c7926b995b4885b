"""The pipelined GFS backfill into a plain Zarr store against the same into an Icechunk repository, interleaved.

    python -m benchmarks.icechunk [--inits 1] [--leads 0-48] [--pairs 3] [--json PATH]

The archive is `benchmarks.backfill`'s (generated once, cached under ~/.cache/reformatters/archives, served over
loopback from another process). Runs alternate plain, Icechunk, Icechunk, plain, ... so that the machine's drift
falls on both alike; each pair gives a ratio (Icechunk wall / plain wall), and the median of those is the result.
Peak RSS per worker is sampled for every run (`ClusterProbe`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.backfill import (
    DEFAULT_VARIABLES,
    MB,
    BenchConfig,
    _parse_ints,
    _warm_page_cache,
    machine_description,
    prepare_archive,
    quiet_source_warnings,
    run_pipelined,
    serve,
)


def run(
    inits: int, leads: tuple[int, ...], variables: tuple[str, ...], pairs: int, workers: int | None
) -> dict[str, Any]:
    config = BenchConfig(sizes=(inits,), leads=leads, variables=variables, n_workers=workers)
    quiet_source_warnings()
    manifest = prepare_archive(config)
    _warm_page_cache(manifest)
    runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as directory, serve(manifest.root) as server:
        work = Path(directory)
        for index in range(pairs):
            order = ("zarr", "icechunk") if index % 2 == 0 else ("icechunk", "zarr")
            walls: dict[str, float] = {}
            for store_format in order:
                result = run_pipelined(config, inits, server, manifest, work, store_format=store_format)
                walls[store_format] = result.wall_seconds
                runs.append(
                    {
                        "pair": index,
                        "format": store_format,
                        "wall_seconds": result.wall_seconds,
                        "peak_rss_per_worker_mb": {k: v / MB for k, v in result.peak_rss_per_worker.items()},
                        "peak_rss_max_mb": result.peak_rss_max / MB,
                        "bytes_written_mb": result.bytes_written / MB,
                        "files_ok": result.files_ok,
                        "worker_cpu_seconds": result.worker_cpu_seconds,
                        "driver_cpu_seconds": result.driver_cpu_seconds,
                    }
                )
                print(
                    f"pair {index} {store_format:>8}: {result.wall_seconds:.1f} s, peak worker RSS "
                    f"{result.peak_rss_max / MB:.0f} MB",
                    flush=True,
                )
            ratios.append(walls["icechunk"] / walls["zarr"])

    def of(store_format: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["format"] == store_format]

    return {
        "machine": machine_description(),
        "config": {"inits": inits, "leads": list(leads), "variables": list(variables), "pairs": pairs},
        "runs": runs,
        "ratios_icechunk_over_zarr": ratios,
        "median_ratio": statistics.median(ratios),
        "median_wall_seconds": {f: statistics.median(of(f, "wall_seconds")) for f in ("zarr", "icechunk")},
        "peak_rss_max_mb": {f: max(of(f, "peak_rss_max_mb")) for f in ("zarr", "icechunk")},
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "| store | runs | wall s (median; all) | peak RSS per worker MB (max) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for store_format in ("zarr", "icechunk"):
        walls = [r["wall_seconds"] for r in report["runs"] if r["format"] == store_format]
        lines.append(
            f"| {store_format} | {len(walls)} | {report['median_wall_seconds'][store_format]:.1f} "
            f"({', '.join(f'{w:.1f}' for w in walls)}) | {report['peak_rss_max_mb'][store_format]:.0f} |"
        )
    ratios = ", ".join(f"{r:.2f}" for r in report["ratios_icechunk_over_zarr"])
    lines.append(f"\nIcechunk / plain wall, per interleaved pair: {ratios}; median {report['median_ratio']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", type=int, default=1, help="init times per run (default 1)")
    parser.add_argument("--leads", type=_parse_ints, default="0-48", help="lead hours, e.g. 0-48 or 0-12")
    parser.add_argument("--variables", default=",".join(DEFAULT_VARIABLES), help="GFS variables, comma-separated")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (plain, Icechunk) pairs (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="default: what open_client('local') picks")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.inits < 1:
        parser.error("--pairs and --inits must be at least 1")
    variables = tuple(v.strip() for v in args.variables.split(",") if v.strip())
    report = run(args.inits, args.leads, variables, args.pairs, args.workers)
    print()
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
