"""What forecast datasets (`init_time` x `lead_time`) share beyond their source layout: how far each init's
run is ingested, and where an operational update starts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.region_job import ProcessResults, SourceFileStatus


def with_ingested_forecast_length(ds: xr.Dataset, process_results: ProcessResults) -> xr.Dataset:
    """`ingested_forecast_length` of each init the results cover: its longest lead read from the source. Inits the
    results do not cover keep their value."""
    ingested: dict[pd.Timestamp, pd.Timedelta] = {}
    for coords in process_results.values():
        for coord in coords:
            if coord.status != SourceFileStatus.Succeeded:
                continue
            location = coord.out_loc()
            init, lead = location["init_time"], location["lead_time"]
            if init not in ingested or lead > ingested[init]:
                ingested[init] = lead
    values = ds["ingested_forecast_length"].values.copy()
    for i, init in enumerate(ds.get_index("init_time")):
        if init in ingested:
            values[i] = ingested[init].to_timedelta64()
    return ds.assign_coords(ingested_forecast_length=ds["ingested_forecast_length"].copy(data=values))


def first_init_to_update(final_store: Any, template_ds: xr.Dataset, append_dim: str = "init_time") -> int:
    """The template position an update starts at: the newest published init while its ingested forecast is
    shorter than expected (its late leads are still to come), else the init after it; 0 for an empty store."""
    store = final_store if isinstance(final_store, ObjectStore) else ObjectStore(final_store)
    published = store.open_dataset(chunks=None) if store.exists("zarr.json") else None
    if published is None or published.sizes[append_dim] == 0:
        return 0
    labels = published.get_index(append_dim)
    ingested = published["ingested_forecast_length"].values[-1]
    expected = published["expected_forecast_length"].values[-1]
    complete = not np.isnat(ingested) and ingested >= expected
    newest_position = int(template_ds.get_index(append_dim).searchsorted(labels[-1]))
    return newest_position + 1 if complete else newest_position
