"""A reader in another process polling a noaa-hrrr-forecast-48-hour store while an update publishes.

Usage: python noaa_hrrr_reader.py STORE RESULT_JSON STOP_FILE. Every open must parse; the init extent never
shrinks; no init's ingested forecast length goes backwards; every ingested lead of every visible init holds
data in the block of the grid read (one chunk column, all leads).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import xarray as xr


def check_once(store: str, last_ingested: dict[str, int]) -> tuple[int, dict[str, int]]:
    ds = xr.open_zarr(store, decode_timedelta=True)
    inits = [str(t) for t in ds.init_time.values]
    ingested_hours = {}
    block = ds.temperature_2m.isel(y=slice(0, 265), x=slice(0, 300)).values
    for i, init in enumerate(inits):
        ingested = ds.ingested_forecast_length.values[i]
        hours = -1 if np.isnat(ingested) else int(ingested / np.timedelta64(1, "h"))
        if hours < last_ingested.get(init, -1):
            raise AssertionError(f"{init}: ingested forecast length went back from {last_ingested[init]} to {hours}")
        if np.isnan(block[i, : hours + 1]).any():
            raise AssertionError(f"{init}: ingested to {hours} h but NaN within those leads")
        ingested_hours[init] = hours
    return len(inits), ingested_hours


def main() -> None:
    store, result_path, stop_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    opens, extents, errors, torn_reads = 0, [], [], 0
    last: dict[str, int] = {}
    seen_ingested: list[dict[str, int]] = []
    while True:
        stopping = stop_file.exists()
        try:
            try:
                n, last = check_once(store, last)
            except RuntimeError as error:  # a read torn by a shard replaced between index and chunks
                if "blosc decompression" not in str(error):
                    raise
                torn_reads += 1
                n, last = check_once(store, last)
            opens += 1
            if not extents or extents[-1] != n:
                extents.append(n)
            if not seen_ingested or seen_ingested[-1] != last:
                seen_ingested.append(dict(last))
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            errors.append(traceback.format_exc(limit=3))
        result = {
            "opens": opens,
            "extents": extents,
            "ingested": seen_ingested,
            "errors": errors[:5],
            "torn_reads": torn_reads,
        }
        result_path.write_text(json.dumps(result))
        if stopping:
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main()
