"""Small array predicates shared by the pipeline's hot loops."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def holds_only_nan(values: npt.NDArray[Any]) -> bool:
    """True if every element is NaN (or there is none).

    A field or chunk with data nearly always has it at a corner, so the first and last elements settle most
    calls without reading the rest. Otherwise one fmax reduction decides: fmax skips NaN, so the result is NaN
    only when every element is (one pass, no temporary, a third of the cost of `isfinite(values).any()`).
    """
    if values.size == 0:
        return True
    if not (np.isnan(values[(0,) * values.ndim]) and np.isnan(values[(-1,) * values.ndim])):
        return False
    return bool(np.isnan(np.fmax.reduce(values, axis=None)))
