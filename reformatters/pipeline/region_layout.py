"""Where a variable-region's values lie in its buffer: row-major, or chunk by chunk.

Row-major (`RegionLayout.rows`): the buffer is the shard-padded region itself, so a field is a view of it and
the transform hook gets the region as one array; every chunk is strided and is gathered into contiguous
scratch before compression. For GFS (105x121x121 chunks in a 210x726x1452 buffer) that gather reads memory at
~2 GB/s, 1.5-2 ms per field on this project's VM: each 484-byte chunk row lies on another page.

Chunk-major (`RegionLayout.chunked`): the buffer holds the region's chunks one after another, each
C-contiguous, so Blosc compresses a chunk where it lies. A decoded field is scattered into the chunks it
crosses instead: 0.4 ms per GFS field from a field still in cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class RegionLayout:
    """The buffer of a padded region of `shape`: row-major if `chunks` is None, else chunk-major, with the
    memory shape (*chunk grid, *chunks). The last two dims are a field's; the leading dims index fields."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) < 2:
            raise ValueError(f"a region buffer needs at least the two dims of a field, got shape {self.shape}")
        if self.chunks is not None:
            if len(self.chunks) != len(self.shape):
                raise ValueError(f"chunks {self.chunks} do not match the region's shape {self.shape}")
            if any(c <= 0 or n % c for n, c in zip(self.shape, self.chunks, strict=True)):
                raise ValueError(
                    f"a chunk-major buffer needs whole chunks: shape {self.shape} is not a multiple of {self.chunks}"
                )

    @classmethod
    def rows(cls, shape: Sequence[int]) -> RegionLayout:
        return cls(tuple(int(n) for n in shape))

    @classmethod
    def chunked(cls, shape: Sequence[int], chunks: Sequence[int]) -> RegionLayout:
        return cls(tuple(int(n) for n in shape), tuple(int(c) for c in chunks))

    @property
    def chunk_major(self) -> bool:
        return self.chunks is not None

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunks along each dim (chunk-major only)."""
        assert self.chunks is not None
        return tuple(n // c for n, c in zip(self.shape, self.chunks, strict=True))

    @property
    def memory_shape(self) -> tuple[int, ...]:
        return self.shape if self.chunks is None else (*self.grid, *self.chunks)

    @property
    def field_shape(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    @property
    def slab_grid(self) -> tuple[int, ...]:
        """The leading dims: one 2-D slab (a field and its padding) per index."""
        return self.shape[:-2]

    def _slab_tiles(self, buffer: npt.NDArray[Any], slab: tuple[int, ...]) -> npt.NDArray[Any]:
        """Chunk-major: the slab's values as (chunk rows, rows in a chunk, chunk columns, columns in a chunk)."""
        assert self.chunks is not None
        outer = tuple(i // c for i, c in zip(slab, self.chunks[:-2], strict=True))
        inner = tuple(i % c for i, c in zip(slab, self.chunks[:-2], strict=True))
        index: tuple[Any, ...] = (*outer, slice(None), slice(None), *inner)
        tiles = buffer[index]  # (chunk rows, chunk columns, rows, columns)
        return np.asarray(tiles).transpose(0, 2, 1, 3)

    def write_field(self, buffer: npt.NDArray[Any], slab: tuple[int, ...], values: npt.NDArray[Any]) -> None:
        """Put a field (at most the slab's size; the rest of the slab keeps its padding) into slab `slab`."""
        rows, columns = values.shape
        if rows > self.shape[-2] or columns > self.shape[-1]:
            raise ValueError(f"a field of shape {values.shape} does not fit slabs of {self.field_shape}")
        if self.chunks is None:
            index: tuple[Any, ...] = (*slab, slice(0, rows), slice(0, columns))
            buffer[index] = values
            return
        tiles = self._slab_tiles(buffer, slab)
        chunk_rows, chunk_columns = self.chunks[-2:]
        whole_rows, rest_rows = divmod(rows, chunk_rows)
        whole_columns, rest_columns = divmod(columns, chunk_columns)
        top, left = whole_rows * chunk_rows, whole_columns * chunk_columns
        # At most four copies, each a block of whole or cut chunks: few numpy calls per field.
        tiles[:whole_rows, :, :whole_columns, :] = values[:top, :left].reshape(
            whole_rows, chunk_rows, whole_columns, chunk_columns
        )
        if rest_rows:
            tiles[whole_rows, :rest_rows, :whole_columns, :] = values[top:, :left].reshape(
                rest_rows, whole_columns, chunk_columns
            )
        if rest_columns:
            tiles[:whole_rows, :, whole_columns, :rest_columns] = values[:top, left:].reshape(
                whole_rows, chunk_rows, rest_columns
            )
        if rest_rows and rest_columns:
            tiles[whole_rows, :rest_rows, whole_columns, :rest_columns] = values[top:, left:]

    def fill_slab(self, buffer: npt.NDArray[Any], slab: tuple[int, ...], fill: float) -> None:
        if self.chunks is None:
            buffer[slab] = fill
        else:
            self._slab_tiles(buffer, slab)[...] = fill

    def chunk(self, buffer: npt.NDArray[Any], chunk_index: Sequence[int]) -> npt.NDArray[Any]:
        """Chunk `chunk_index` (counted over the region): C-contiguous when chunk-major."""
        if self.chunks is not None:
            return np.asarray(buffer[tuple(chunk_index)])
        raise ValueError("a row-major buffer's chunks are views of its shards; slice the shard instead")
