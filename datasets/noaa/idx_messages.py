"""What NOAA datasets read through `.idx` inventories share: which messages a group of variables wants at a lead,
a variable's message or its empty field, and NOMADS as the fallback for recent runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from reformatters.common.time_utils import utc_now
from reformatters.region_job import ForecastSourceFileCoord
from reformatters.sources.download import SourceFileNotFoundError, fetch_available_grib_messages
from reformatters.sources.grib_index import GribMessageNotFoundError

# NOMADS keeps about ten days of runs and throttles hard.
NOMADS_RETENTION = pd.Timedelta(days=9)

Wanted = dict[str, tuple[str, str, str]]


def wanted_messages(data_vars: Iterable[Any], step_of: Callable[[Any], str | None]) -> Wanted:
    """{variable name: (element, level, step)} for the variables that have a message at this lead."""
    wanted: Wanted = {}
    for var in data_vars:
        step = step_of(var)
        if step is not None:
            wanted[var.name] = (var.internal_attrs.grib_element, var.internal_attrs.grib_level, step)
    return wanted


def message_or_empty_field(
    payload: Mapping[str, bytes], data_var: Any, step: str | None, idx_url: str, out: npt.NDArray[np.float32]
) -> bytes | None:
    """The variable's message. Where it has none at this lead by definition (`step` None: no window ends at lead
    0), `out` becomes NaN and the result is None; a message the inventory should have listed raises."""
    if data_var.name in payload:
        return payload[data_var.name]
    if step is None:
        out[...] = np.nan
        return None
    attrs = data_var.internal_attrs
    raise GribMessageNotFoundError(f"{idx_url} lists no {attrs.grib_element}:{attrs.grib_level}:{step} message")


def fetch_with_nomads_fallback(
    coord: ForecastSourceFileCoord, wanted: Wanted, *, nomads_url: str, source_url_given: bool
) -> dict[str, bytes]:
    """The wanted messages from the coord's source; a recent run the default source lacks is asked of NOMADS."""
    url = coord.get_url()
    try:
        return fetch_available_grib_messages(url, f"{url}.idx", wanted)
    except SourceFileNotFoundError:
        if source_url_given or coord.init_time < utc_now() - NOMADS_RETENTION:
            raise
        nomads = coord.model_copy(update={"source_url": nomads_url}).get_url()
        return fetch_available_grib_messages(nomads, f"{nomads}.idx", wanted)
