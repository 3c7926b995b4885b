"""A reader in another process doing random partial reads of a store until a stop file appears.

Usage: python snapshot_reader.py STORE RESULT_JSON STOP_FILE MIN_READS SEED. Each read opens the store afresh
(an Icechunk repository: a read-only session on `main`, noting its snapshot; a plain store: its consolidated
metadata) and reads one of: a single inner chunk, a slice across shards along init_time, a whole variable. It
records a digest of the values (or the error) so that the test can read the same again at the same snapshot. It
goes on after the stop file appears until it has made MIN_READS reads.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

VARIABLES = ("temperature_2m", "precipitation_surface")


def digest(values: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes() + repr(values.shape).encode()).hexdigest()


def random_selection(array: Any, rng: random.Random) -> tuple[str, list[list[int]]]:
    """(kind, [[start, stop] per dim])."""
    shape, chunks, shards = list(array.shape), list(array.chunks), list(array.shards or array.chunks)
    kind = rng.choice(("chunk", "across_shards", "whole"))
    if kind == "whole" or shape[0] == 0:
        return "whole", [[0, n] for n in shape]
    if kind == "chunk":
        bounds = []
        for n, c in zip(shape, chunks, strict=True):
            index = rng.randrange(max(1, -(-n // c)))
            bounds.append([index * c, min(n, (index + 1) * c)])
        return kind, bounds
    # Along init_time from inside one shard into the next (or to the end), the rest partial.
    start = rng.randrange(shape[0])
    stop = min(shape[0], (start // shards[0] + 1) * shards[0] + rng.randint(1, shards[0]))
    bounds = [[start, stop]]
    for n in shape[1:]:
        a = rng.randrange(n)
        bounds.append([a, rng.randint(a + 1, n)])
    return kind, bounds


def read(group: Any, var: str, bounds: list[list[int]]) -> np.ndarray[Any, Any]:
    return np.asarray(group[var][tuple(slice(a, b) for a, b in bounds)])


def open_group(store: str, repo: Any) -> tuple[Any, str | None]:
    if repo is None:
        return zarr.open_group(store, mode="r", use_consolidated=True), None
    session = repo.readonly_session(branch="main")
    return zarr.open_group(session.store, mode="r", use_consolidated=False), str(session.snapshot_id)


def main() -> None:
    store, result_path, stop_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    min_reads, rng = int(sys.argv[4]), random.Random(int(sys.argv[5]))
    repo = None
    if store.rstrip("/").endswith(".icechunk"):
        from reformatters.common.icechunk_store import IcechunkStore

        repo = IcechunkStore(store).repo
    reads: list[dict[str, Any]] = []
    reads_before_stop = 0
    while True:
        stopped = stop_file.exists()
        if stopped and len(reads) >= min_reads:
            break
        record: dict[str, Any] = {"at": time.time()}
        try:
            group, snapshot = open_group(store, repo)
            var = rng.choice(VARIABLES)
            kind, bounds = random_selection(group[var], rng)
            record.update(snapshot=snapshot, var=var, kind=kind, bounds=bounds, shape=list(group[var].shape))
            record["digest"] = digest(read(group, var, bounds))
        except Exception as error:  # noqa: BLE001 - every failure is what this reader reports
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        reads.append(record)
        if not stopped:
            reads_before_stop += 1
    result_path.write_text(json.dumps({"reads": reads, "reads_before_stop": reads_before_stop}))


if __name__ == "__main__":
    main()
