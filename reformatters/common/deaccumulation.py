"""Turn window accumulations and window averages into per-step values along lead time.

Every lead h then means the interval (previous lead, h]. Windows restart every `reset_hours`
(GFS: 6) or never (None: accumulated since the start of the forecast).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from reformatters.common.arrays import holds_only_nan

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
    present: npt.NDArray[np.bool_] | None = None,
) -> int:
    """In place. Returns how many clearly negative rates became NaN. `present` (one per lead): the steps that
    hold a field; the others are missing and neither read nor written (a scratch file's holes read as zeros).

    accumulation -> rate per second: (A(h) - A(h_prev)) / seconds, or A(h) / seconds at a window's first step.
    average -> average over the last step: (A(h)(h-w) - A(h_prev)(h_prev-w)) / (h - h_prev).
    The first lead has no previous step: NaN. A missing previous step (NaN) gives NaN.
    """
    moved = np.moveaxis(values, axis, 0)
    clearly_negative = 0
    # Two fields of scratch, not a copy of the region (~0.9 GB): the previous step's original values, and the
    # current step's, kept before the step is overwritten in place.
    previous = np.empty(moved.shape[1:], dtype=np.float32)
    original = np.empty_like(previous)
    previous_missing = True
    for i, hour in enumerate(lead_hours):
        if present is not None and not present[i]:
            previous_missing = True
            continue
        current = moved[i]
        if i == 0:
            np.copyto(previous, current)
            previous_missing = holds_only_nan(previous)
            current[...] = np.nan
            continue
        # A missing field stays missing whatever the formula: every branch below propagates its NaN.
        if holds_only_nan(current):
            previous_missing = True
            continue
        previous_hour = float(lead_hours[i - 1])
        start = window_start(float(hour), reset_hours)
        step_hours = float(hour) - previous_hour
        first_step_of_window = previous_hour <= start
        np.copyto(original, current)
        if not first_step_of_window and previous_missing:
            current[...] = np.nan
        elif kind == "accumulation":
            if not first_step_of_window:
                np.subtract(current, previous, out=current)
            np.divide(current, np.float32(step_hours * SECONDS_PER_HOUR), out=current)
            with np.errstate(invalid="ignore"):
                clearly = current < NEGATIVE_RATE_TOLERANCE
            clearly_negative += int(np.count_nonzero(clearly))
            np.copyto(current, np.float32(np.nan), where=clearly)
            np.maximum(current, np.float32(0), out=current)  # packing noise below zero; NaN stays NaN
        elif not first_step_of_window:
            np.multiply(current, np.float32(float(hour) - start), out=current)
            np.multiply(previous, np.float32(previous_hour - start), out=previous)
            np.subtract(current, previous, out=current)
            np.divide(current, np.float32(step_hours), out=current)
        previous, original = original, previous
        previous_missing = False
    return clearly_negative
