"""Driver memory against backfill length (issue 16): the driver's peak RSS for a backfill of many regions of the
example dataset against one of a tenth as many, from the same generated source, in the same run.

    python3 -m benchmarks.driver_memory [--regions 100,1100] [--workers 2] [--json PATH]

Each backfill runs in its own driver process (`python -m benchmarks.driver_memory --child ...`), so each peak is
that process's own `ru_maxrss` (the LocalCluster's scheduler runs in the driver; its workers are separate
processes and are not counted). The driver's memory is flat in the length of the backfill when the two peaks are
within a few percent: what it keeps per region (results folded per position, region jobs) is small against the
fixed cost of the imports, the scheduler and the template.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

EXAMPLE_DATASET = "reformatters_datasets.example.dataset:ExampleDataset"
INITS_PER_REGION = 2  # the example dataset's shard along init_time
INIT_STEP = pd.Timedelta("6h")
START = pd.Timestamp("2024-01-01T00:00")


def _end_for(regions: int) -> pd.Timestamp:
    return START + regions * INITS_PER_REGION * INIT_STEP


def _child(regions: int, source: str, store: str, workers: int) -> None:
    from reformatters.registry import get_dataset

    dataset = get_dataset("example")
    started = time.perf_counter()
    summary = dataset.backfill(
        _end_for(regions),
        store_url=store,
        source_url=source,
        n_workers=workers,
        show_progress=False,
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "regions": summary.regions_done,
        "regions_total": summary.regions_total,
        "files_ok": summary.files_ok,
        "seconds": round(time.perf_counter() - started, 1),
        "driver_peak_rss_mb": round(peak_kib * 1024 / 1e6, 1),
    }
    print("RESULT " + json.dumps(record), flush=True)


def _run_child(regions: int, source: Path, workdir: Path, workers: int) -> dict[str, object]:
    store = workdir / f"store-{regions}.zarr"
    env = {**os.environ, "REFORMATTERS_EXTRA_DATASETS": EXAMPLE_DATASET}
    command = [sys.executable, "-m", "benchmarks.driver_memory", "--child", str(regions), str(source), str(store)]
    completed = subprocess.run(
        [*command, "--workers", str(workers)], env=env, capture_output=True, text=True, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"backfill of {regions} regions failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    result: dict[str, object] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", default="100,1100", help="the two backfill lengths in regions (default 100,1100)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("REGIONS", "SOURCE", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(int(args.child[0]), args.child[1], args.child[2], args.workers)
        return

    from reformatters_datasets.example import source

    small, large = (int(n) for n in args.regions.split(","))
    with tempfile.TemporaryDirectory(prefix="reformatters-driver-memory-") as tmp:
        workdir = Path(tmp)
        inits = pd.date_range(START, _end_for(max(small, large)) - INIT_STEP, freq=INIT_STEP)
        generated = time.perf_counter()
        source.generate_source(workdir / "source", inits)
        print(
            f"source: {len(inits)} inits x {len(source.LEAD_HOURS)} leads generated in "
            f"{time.perf_counter() - generated:.1f} s",
            file=sys.stderr,
        )
        results = []
        for regions in (small, large):
            result = _run_child(regions, workdir / "source", workdir, args.workers)
            print(f"  {regions:>5} regions: {json.dumps(result)}", file=sys.stderr)
            results.append(result)
    small_peak = float(str(results[0]["driver_peak_rss_mb"]))
    large_peak = float(str(results[1]["driver_peak_rss_mb"]))
    ratio = large_peak / small_peak
    print(
        f"driver peak RSS: {small_peak:.1f} MB for {small} regions, {large_peak:.1f} MB for {large} regions: "
        f"ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": round(ratio, 4)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
