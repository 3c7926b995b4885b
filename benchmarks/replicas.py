"""What replicas cost: the example dataset backfilled without a replica, with a local Zarr replica and with a Zarr
replica on a local S3 server (SeaweedFS, else moto), interleaved, with the shard objects the driver copied to the
replica during each (the workers write a plain replica's shards, so none); and the driver's copy to a replica (a
whole catch-up, so every shard object) into a local Zarr store, a local Icechunk repository and the S3 server.

    python -m benchmarks.replicas [--inits 200] [--repeats 2] [--json PATH]

The driver's copy (catch-up, Icechunk replicas, variable-regions resumed from an earlier run) runs `COPY_THREADS`
objects at a time (`reformatters.replicas`; the S3 catch-up is also run with one thread to compare): objects per
second and MB per second of it are what bounds that copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.backfill import MB, machine_description


def _backfill(dataset: Any, end: pd.Timestamp, store: Path, source: Path) -> tuple[float, int]:
    """Seconds, and the shard objects the driver copied to replicas during the backfill."""
    from reformatters import replicas

    copy = replicas._copy
    copied = 0

    def counted(source: Any, target: Any, keys: Sequence[str]) -> int:
        nonlocal copied
        copied += len(keys)
        return copy(source, target, keys)

    replicas._copy = counted
    try:
        started = time.perf_counter()
        dataset.backfill(end, store_url=str(store), source_url=str(source), n_workers=2, show_progress=False)
        return time.perf_counter() - started, copied
    finally:
        replicas._copy = copy


def run(inits: int, repeats: int) -> dict[str, Any]:
    from reformatters_datasets.example import source as example_source
    from reformatters_datasets.example.dataset import ExampleDataset

    from reformatters import replicas
    from reformatters.common.storage import ObjectStore
    from reformatters.replicas import Replica, catch_up, hold_replicas
    from reformatters.testing.object_store_server import s3_server

    times = pd.date_range("2024-01-01T00:00", periods=inits, freq="6h")
    end = times[-1] + pd.Timedelta("6h")
    with tempfile.TemporaryDirectory() as directory, s3_server() as server, server.environment():
        work = Path(directory)
        source = example_source.generate_source(work / "source", times)
        s3_kind = f"one s3 zarr replica ({server.kind})"
        walls: dict[str, list[float]] = {"no replica": [], "one local zarr replica": [], s3_kind: []}
        driver_copied: dict[str, list[int]] = {kind: [] for kind in walls}
        for index in range(repeats):
            order = list(walls) if index % 2 == 0 else list(reversed(walls))
            for kind in order:
                urls = {
                    "no replica": None,
                    "one local zarr replica": str(work / f"copy-{index}.zarr"),
                    s3_kind: server.url(f"copy-{index}.zarr"),
                }
                url = urls[kind]
                dataset = ExampleDataset(replicas=(Replica(name="copy", url=url),) if url else ())
                store = work / f"{kind.split(' (')[0].replace(' ', '-')}-{index}.zarr"
                seconds, copied = _backfill(dataset, end, store, source)
                walls[kind].append(seconds)
                driver_copied[kind].append(copied)
                print(f"backfill {inits} inits, {kind}: {seconds:.1f} s, driver copied {copied} objects", flush=True)
        primary = ObjectStore(work / f"no-replica-{repeats - 1}.zarr")
        keys = [key for key in primary.list() if not key.startswith("_internal")]
        total_bytes = sum(len(primary.get(key) or b"") for key in keys)
        copies: dict[str, dict[str, float]] = {}
        targets = {
            "local zarr": (str(work / "catch-up.zarr"), replicas.COPY_THREADS),
            "local icechunk": (str(work / "catch-up.icechunk"), replicas.COPY_THREADS),
            f"s3 zarr ({server.kind})": (server.url("catch-up.zarr"), replicas.COPY_THREADS),
            f"s3 zarr ({server.kind}), 1 copy thread": (server.url("catch-up-serial.zarr"), 1),
        }
        default_threads = replicas.COPY_THREADS
        for kind, (url, threads) in targets.items():
            replicas.COPY_THREADS = threads
            try:
                with hold_replicas([Replica(name="bench", url=url)]) as (target,):
                    started = time.perf_counter()
                    catch_up(target, primary, "init_time")
                    seconds = time.perf_counter() - started
            finally:
                replicas.COPY_THREADS = default_threads
            copies[kind] = {
                "copy_threads": threads,
                "seconds": seconds,
                "objects_per_second": len(keys) / seconds,
                "mb_per_second": total_bytes / MB / seconds,
            }
            print(
                f"catch-up into {kind}: {len(keys)} objects, {total_bytes / MB:.1f} MB in {seconds:.2f} s",
                flush=True,
            )
    return {
        "machine": machine_description(),
        "config": {"inits": inits, "repeats": repeats, "dataset": "example"},
        "backfill_wall_seconds": walls,
        "backfill_median_seconds": {kind: statistics.median(values) for kind, values in walls.items()},
        "backfill_shard_objects_copied_by_driver": driver_copied,
        "catch_up": {"objects": len(keys), "mb": total_bytes / MB, "by_target": copies},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args.inits, args.repeats)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
