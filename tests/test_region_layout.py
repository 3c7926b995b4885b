"""Chunk-major region buffers hold the same values as row-major ones, each chunk contiguous."""

from __future__ import annotations

import numpy as np
import pytest

from reformatters.pipeline.kernels import RegionBufferPool
from reformatters.pipeline.region_layout import RegionLayout

SHAPE = (2, 4, 12, 18)
CHUNKS = (1, 2, 4, 6)
FIELD = (10, 14)  # smaller than a slab: the last chunk row and column are cut by the padding


def fields(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*SHAPE[:2], *FIELD)).astype(np.float32)


def fill_both(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, RegionLayout]:
    rows = np.full(SHAPE, np.nan, dtype=np.float32)
    layout = RegionLayout.chunked(SHAPE, CHUNKS)
    chunked = np.full(layout.memory_shape, np.nan, dtype=np.float32)
    for slab in np.ndindex(SHAPE[:2]):
        RegionLayout.rows(SHAPE).write_field(rows, slab, values[slab])
        layout.write_field(chunked, slab, values[slab])
    return rows, chunked, layout


def test_every_chunk_of_a_chunk_major_buffer_is_contiguous_and_equals_the_row_major_slice() -> None:
    rows, chunked, layout = fill_both(fields())
    assert layout.memory_shape == (2, 2, 3, 3, 1, 2, 4, 6)
    for index in np.ndindex(layout.grid):
        chunk = layout.chunk(chunked, index)
        assert chunk.flags.c_contiguous and chunk.shape == CHUNKS
    assert_same_values(chunked, layout, rows)
    # The padding beyond the field stays as it was.
    assert np.isnan(rows[..., FIELD[0] :, :]).all() and np.isnan(rows[..., FIELD[1] :]).all()


def assert_same_values(chunked: np.ndarray, layout: RegionLayout, rows: np.ndarray) -> None:
    for index in np.ndindex(layout.grid):
        block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, CHUNKS, strict=True))
        np.testing.assert_array_equal(layout.chunk(chunked, index), rows[block])


def test_a_slab_refill_touches_only_that_slab() -> None:
    values = fields(1)
    rows, chunked, layout = fill_both(values)
    layout.fill_slab(chunked, (1, 3), np.nan)
    RegionLayout.rows(SHAPE).fill_slab(rows, (1, 3), np.nan)
    assert np.isnan(rows[1, 3]).all()
    np.testing.assert_array_equal(rows[1, 2, : FIELD[0], : FIELD[1]], values[1, 2])
    assert_same_values(chunked, layout, rows)


def test_layouts_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"not a multiple of \(1, 2, 4, 5\)"):
        RegionLayout.chunked(SHAPE, (1, 2, 4, 5))
    layout = RegionLayout.chunked(SHAPE, CHUNKS)
    buffer = np.zeros(layout.memory_shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"does not fit slabs of \(12, 18\)"):
        layout.write_field(buffer, (0, 0), np.zeros((13, 18), dtype=np.float32))
    with pytest.raises(ValueError, match="views of its shards"):
        RegionLayout.rows(SHAPE).chunk(buffer, (0, 0, 0, 0))


def test_a_pooled_buffer_serves_the_other_layout_refilled_where_its_last_user_wrote() -> None:
    pool = RegionBufferPool(keep=1)
    layout = RegionLayout.chunked(SHAPE, CHUNKS)
    chunked = pool.take(layout, np.float32, np.nan)
    assert chunked.shape == layout.memory_shape
    layout.write_field(chunked, (0, 1), fields()[0, 1])
    dirty = np.zeros(SHAPE[:2], dtype=bool)
    dirty[0, 1] = True
    pool.give_back(chunked, np.nan, dirty_slabs=dirty, layout=layout)
    rows = pool.take(SHAPE, np.float32, np.nan)
    assert rows.shape == SHAPE and np.shares_memory(rows, chunked)
    assert np.isnan(rows).all(), "the slab written chunk-major was refilled"
    with pytest.raises(ValueError, match="given back for a layout of"):
        pool.give_back(rows, layout=layout)
