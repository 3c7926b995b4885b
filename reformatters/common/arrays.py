"""Small array predicates shared by the pipeline's hot loops."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# A strided view is scanned through the contiguous span it lies in when the span is at most this much larger.
_SPAN_SLACK = 1.25


def holds_only_nan(values: npt.NDArray[Any]) -> bool:
    """True if every element is NaN (or there is none).

    A field or chunk with data nearly always has it at a corner, so the first and last elements settle most
    calls without reading the rest. Otherwise one fmax reduction decides: fmax skips NaN, so the result is NaN
    only when every element is (one pass, no temporary, a third of the cost of `isfinite(values).any()`).
    A view with short row gaps (a field inside its shard-padded buffer) is first checked through the contiguous
    memory it spans: all NaN there means all NaN in the view, at a third of the cost of the strided reduction.
    """
    if values.size == 0:
        return True
    if not (np.isnan(values[(0,) * values.ndim]) and np.isnan(values[(-1,) * values.ndim])):
        return False
    span = _contiguous_span(values)
    if span is not None and np.isnan(np.fmax.reduce(span)):
        return True
    return bool(np.isnan(np.fmax.reduce(values, axis=None)))


def _contiguous_span(values: npt.NDArray[Any]) -> npt.NDArray[Any] | None:
    """The 1-D run of memory from `values`' first element to its last, if `values` is a strided view with
    positive strides that fills most of that run; else None."""
    if values.flags.c_contiguous or values.base is None or any(s <= 0 for s in values.strides):
        return None
    itemsize = values.itemsize
    if any(s % itemsize for s in values.strides):
        return None
    length = sum((n - 1) * s for n, s in zip(values.shape, values.strides, strict=True)) // itemsize + 1
    if length > _SPAN_SLACK * values.size:
        return None
    return np.lib.stride_tricks.as_strided(values, shape=(length,), strides=(itemsize,), writeable=False)
