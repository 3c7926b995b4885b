"""A reader in another process: polls a store until a stop file appears, checking every open.

Usage: python reader.py STORE RESULT_JSON STOP_FILE. STORE is a path or an s3:// or gs:// URL (credentials and
endpoints from the environment, as the project's runs read them). Every open must parse; the extent must be one
of the published steps (never shrinking); every visible init must hold all of its data.

A read of part of a shard (the last, half-published one) takes the shard's index and then its chunks in
separate requests; when the update replaces that shard in between, the chunks no longer match the index and
their checksum (or Blosc) refuses them. Such a torn read is retried once and counted (`torn_reads`); it is a known
limit of rewriting published shards in place, not hidden: a second failure in a row is an error.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

INITS = pd.date_range("2024-01-01T00:00", periods=7, freq="6h")


def open_published(store: str) -> xr.Dataset:
    if "://" in store:
        from reformatters.common.storage import ObjectStore

        ds: xr.Dataset = ObjectStore(store).open_dataset()
        return ds
    return xr.open_zarr(store, decode_timedelta=True)


def is_torn_read(error: Exception) -> bool:
    return "blosc decompression" in str(error) or "checksum do not match" in str(error)


def check_once(store: str) -> int:
    ds = open_published(store)
    n = int(ds.sizes["init_time"])
    np.testing.assert_array_equal(ds.init_time.values, INITS[:n].values)
    temperature = ds.temperature_2m.values
    precipitation = ds.precipitation_surface.isel(lead_time=slice(1, None)).values
    for i in range(n):
        if np.isnan(temperature[i]).any() or np.isnan(precipitation[i]).any():
            raise AssertionError(f"init {INITS[i]} is visible but holds NaN (extent {n})")
    return n


def main() -> None:
    store, result_path, stop_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    opens, extents, errors, torn_reads = 0, [], [], 0
    parent = os.getppid()
    while True:
        # A test killed before it touches the stop file must not leave this process polling forever.
        stopping = stop_file.exists() or os.getppid() != parent
        try:
            try:
                n = check_once(store)
            except (RuntimeError, ValueError) as error:
                if not is_torn_read(error):
                    raise
                torn_reads += 1
                n = check_once(store)
            opens += 1
            if not extents or extents[-1] != n:
                extents.append(n)
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            errors.append(traceback.format_exc(limit=3))
        result = {"opens": opens, "extents": extents, "errors": errors[:5], "torn_reads": torn_reads}
        result_path.write_text(json.dumps(result))
        if stopping:
            return
        time.sleep(0.01)


if __name__ == "__main__":
    main()
