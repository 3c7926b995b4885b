"""Turn window accumulations and window averages into per-step values along lead time.

Every lead h then means the interval (previous lead, h]. Windows restart every `reset_hours`
(GFS: 6) or never (None: accumulated since the start of the forecast).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

SECONDS_PER_HOUR = 3600.0
# Packing noise makes tiny negative differences; below this a rate is clamped to 0, beyond it NaN.
NEGATIVE_RATE_TOLERANCE = -1e-5


def window_start(lead_hours: float, reset_hours: float | None) -> float:
    if reset_hours is None or lead_hours <= 0:
        return 0.0
    return float(((lead_hours - 1e-9) // reset_hours) * reset_hours)


def deaccumulate_along_axis(
    values: npt.NDArray[np.float32],
    lead_hours: npt.NDArray[np.floating],
    axis: int,
    kind: Literal["accumulation", "average"],
    reset_hours: float | None,
) -> int:
    """In place. Returns how many clearly negative rates became NaN.

    accumulation -> rate per second: (A(h) - A(h_prev)) / seconds, or A(h) / seconds at a window's first step.
    average -> average over the last step: (A(h)(h-w) - A(h_prev)(h_prev-w)) / (h - h_prev).
    The first lead has no previous step: NaN. A missing previous step (NaN) gives NaN.
    """
    moved = np.moveaxis(values, axis, 0)
    clearly_negative = 0
    # Only one step of original values is kept: a variable-region is too big to copy whole.
    previous = moved[0].copy()
    for i, hour in enumerate(lead_hours):
        if i == 0:
            moved[0] = np.nan
            continue
        current = moved[i].copy()
        previous_hour = float(lead_hours[i - 1])
        start = window_start(float(hour), reset_hours)
        step_hours = float(hour) - previous_hour
        first_step_of_window = previous_hour <= start
        if kind == "accumulation":
            if first_step_of_window:
                result = current / np.float32(step_hours * SECONDS_PER_HOUR)
            else:
                result = (current - previous) / np.float32(step_hours * SECONDS_PER_HOUR)
            with np.errstate(invalid="ignore"):
                negative = result < 0
                clearly = result < NEGATIVE_RATE_TOLERANCE
            clearly_negative += int(np.count_nonzero(clearly))
            result = np.where(clearly, np.float32(np.nan), np.where(negative, np.float32(0), result))
        else:
            if first_step_of_window:
                result = current
            else:
                result = (
                    current * np.float32(float(hour) - start) - previous * np.float32(previous_hour - start)
                ) / np.float32(step_hours)
        moved[i] = result
        previous = current
    return clearly_negative
