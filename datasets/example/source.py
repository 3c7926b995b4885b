"""The example dataset's source: one `.npz` file per init time and lead time, generated here.

Layout: `{root}/{init:%Y%m%d%H}/example.f{lead:03d}.npz` holding `temperature_2m` (degC, instantaneous)
and `precipitation_surface` (kg m-2 accumulated since the init time). Values are analytic, so tests know
every expected number.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

LATITUDES = np.linspace(45.0, 30.0, 16)
LONGITUDES = np.linspace(-110.0, -79.0, 32)
LEAD_HOURS = np.arange(0, 6)


def relative_path(init_time: pd.Timestamp, lead_hours: int) -> str:
    return f"{init_time:%Y%m%d%H}/example.f{lead_hours:03d}.npz"


def temperature(init_time: pd.Timestamp, lead_hours: int) -> npt.NDArray[np.float32]:
    hours = (init_time - pd.Timestamp("2024-01-01")).total_seconds() / 3600 + lead_hours
    lat = LATITUDES[:, None]
    lon = LONGITUDES[None, :]
    values = 25.0 - 0.6 * (lat - 30.0) + 4.0 * np.sin(2 * np.pi * hours / 24.0 + lon / 20.0)
    return np.asarray(values, dtype=np.float32)


def precipitation_rate(init_time: pd.Timestamp, lead_hours: int) -> npt.NDArray[np.float32]:
    """kg m-2 s-1 over the hour ending at lead_hours."""
    hours = (init_time - pd.Timestamp("2024-01-01")).total_seconds() / 3600 + lead_hours
    lat = LATITUDES[:, None]
    lon = LONGITUDES[None, :]
    rate = 1e-4 * (1.0 + np.cos(lat / 5.0 + lon / 7.0 + hours / 3.0))
    return np.asarray(rate, dtype=np.float32)


def accumulated_precipitation(init_time: pd.Timestamp, lead_hours: int) -> npt.NDArray[np.float32]:
    total = np.zeros((len(LATITUDES), len(LONGITUDES)), dtype=np.float64)
    for hour in range(1, lead_hours + 1):
        total += precipitation_rate(init_time, hour).astype(np.float64) * 3600.0
    return total.astype(np.float32)


def encode_file(init_time: pd.Timestamp, lead_hours: int) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        temperature_2m=temperature(init_time, lead_hours),
        precipitation_surface=accumulated_precipitation(init_time, lead_hours),
    )
    return buffer.getvalue()


def generate_source(
    root: Path,
    init_times: Iterable[pd.Timestamp],
    *,
    missing: Iterable[tuple[pd.Timestamp, int]] = (),
    corrupt: Iterable[tuple[pd.Timestamp, int]] = (),
) -> Path:
    """Write the source archive; `missing` files are left out, `corrupt` ones hold garbage bytes."""
    missing_set = {(pd.Timestamp(t), int(h)) for t, h in missing}
    corrupt_set = {(pd.Timestamp(t), int(h)) for t, h in corrupt}
    for init_time in init_times:
        for lead in LEAD_HOURS:
            key = (pd.Timestamp(init_time), int(lead))
            if key in missing_set:
                continue
            path = root / relative_path(*key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an npz file" if key in corrupt_set else encode_file(*key))
    return root
