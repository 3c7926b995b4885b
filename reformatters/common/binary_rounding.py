"""Keep fewer float32 mantissa bits: binary rounding, round half to even, in place."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FLOAT32_MANTISSA_BITS = 23


def round_float32_inplace(values: npt.NDArray[np.float32], keep_mantissa_bits: int) -> npt.NDArray[np.float32]:
    if values.dtype != np.float32:
        raise TypeError(f"binary rounding needs float32 values, got {values.dtype}")
    if not 1 <= keep_mantissa_bits <= FLOAT32_MANTISSA_BITS:
        raise ValueError(f"keep_mantissa_bits must be 1..23, got {keep_mantissa_bits}")
    if keep_mantissa_bits == FLOAT32_MANTISSA_BITS:
        return values
    drop = FLOAT32_MANTISSA_BITS - keep_mantissa_bits
    bits = values.view(np.uint32)
    # NaN and inf keep their exponent; rounding must not carry into it.
    finite = np.isfinite(values)
    half = np.uint32((1 << (drop - 1)) - 1)
    lowest_kept = (bits >> np.uint32(drop)) & np.uint32(1)
    rounded = (bits + half + lowest_kept) & ~np.uint32((1 << drop) - 1)
    np.copyto(bits, rounded, where=finite)
    return values


def max_relative_rounding_error(keep_mantissa_bits: int) -> float:
    return 2.0 ** -(keep_mantissa_bits + 1)
