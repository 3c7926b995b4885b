"""Keep fewer float32 mantissa bits: binary rounding, round half to even, in place."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from reformatters.common.arrays import holds_only_nan

FLOAT32_MANTISSA_BITS = 23


def round_float32_inplace(values: npt.NDArray[np.float32], keep_mantissa_bits: int) -> npt.NDArray[np.float32]:
    if values.dtype != np.float32:
        raise TypeError(f"binary rounding needs float32 values, got {values.dtype}")
    if not 1 <= keep_mantissa_bits <= FLOAT32_MANTISSA_BITS:
        raise ValueError(f"keep_mantissa_bits must be 1..23, got {keep_mantissa_bits}")
    if keep_mantissa_bits == FLOAT32_MANTISSA_BITS:
        return values
    drop = FLOAT32_MANTISSA_BITS - keep_mantissa_bits
    # A variable-region is ~0.9 GB: whole-array temporaries would triple a worker's memory and leave the
    # cache for every pass. Blocks of a few MB keep the passes in cache; the arithmetic is the same.
    if values.flags.c_contiguous or values.flags.f_contiguous:
        flat = values.reshape(-1, order="A")  # a view: the array is contiguous
        for start in range(0, flat.size, _BLOCK_ELEMENTS):
            _round_block(flat[start : start + _BLOCK_ELEMENTS], drop)
    elif values.ndim > 2:
        # A view into a larger buffer (a region inside its shard-padded buffer): one 2-D slice at a time.
        for index in np.ndindex(values.shape[:-2]):
            _round_block(values[index], drop)
    else:
        _round_block(values, drop)
    return values


_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32


def _round_block(values: npt.NDArray[np.float32], drop: int) -> None:
    if holds_only_nan(values):  # a missing field: nothing to round
        return
    bits = values.view(np.uint32)
    # NaN and inf keep their exponent; rounding must not carry into it.
    finite = np.isfinite(values)
    half = np.uint32((1 << (drop - 1)) - 1)
    # rounded = (bits + half + lowest kept bit) with the dropped bits cleared, in one scratch array.
    rounded = np.right_shift(bits, np.uint32(drop))
    np.bitwise_and(rounded, np.uint32(1), out=rounded)
    np.add(rounded, half, out=rounded)
    np.add(rounded, bits, out=rounded)
    np.bitwise_and(rounded, ~np.uint32((1 << drop) - 1), out=rounded)
    np.copyto(bits, rounded, where=finite)


def max_relative_rounding_error(keep_mantissa_bits: int) -> float:
    return 2.0 ** -(keep_mantissa_bits + 1)
