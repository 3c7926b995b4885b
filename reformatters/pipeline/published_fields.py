"""The upload gate by position: a field the run has no values for keeps what the store publishes there.

A shard write replaces a whole shard object. Where its variable-region holds no field at some position (the
file was missing or unreadable this time, or a transform left it empty) but the shard already published holds
one, the published field is copied into the buffer before the shard is encoded, so no published value is ever
replaced by NaN (design invariant 5). A position is one field: a 2-D slab of the array.

It is decided from what the shard-write task knows (which slabs received values) and what the published shard
holds, read chunk by chunk: its index first (one range request), then only the inner chunks that cover a slab
without values and that the index lists, each decoded alone. A backfill into a new store pays one absent
index per shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from reformatters.common.arrays import holds_only_nan
from reformatters.common.storage import ObjectStore
from reformatters.pipeline.shard_encoding import ShardEncoder


class PublishedShard:
    """The published object of one shard, read lazily: its index, then single inner chunks."""

    def __init__(self, store: ObjectStore, key: str, encoder: ShardEncoder) -> None:
        self._store = store
        self._key = key
        self._encoder = encoder
        self._index: Any = None
        self._read = False

    def _load_index(self) -> Any:
        if not self._read:
            self._read = True
            self._index = self._encoder.read_shard_index(self._store, self._key)
        return self._index

    def chunk(self, chunk_coords: tuple[int, ...]) -> npt.NDArray[Any] | None:
        """The decoded published chunk at `chunk_coords` (within the shard); None if the shard or chunk is absent."""
        data = self.chunk_bytes(chunk_coords)
        return None if data is None else self._encoder.decode_chunk(data)

    def chunk_bytes(self, chunk_coords: tuple[int, ...]) -> bytes | None:
        """The stored bytes of the published chunk at `chunk_coords`; None if the shard or chunk is absent."""
        index = self._load_index()
        if index is None:
            return None
        byte_range = index.get_chunk_slice(chunk_coords)
        if byte_range is None:
            return None
        data = self._store.get_range(self._key, byte_range[0], byte_range[1])
        if data is None or len(data) != byte_range[1] - byte_range[0]:
            raise RuntimeError(
                f"{self._store.url}/{self._key}: the published shard changed while it was read (its index lists "
                f"bytes {byte_range[0]}..{byte_range[1]}); another writer is at work? Re-run once it is done."
            )
        return bytes(data)


def keep_published_fields(
    encoder: ShardEncoder,
    published: PublishedShard,
    chunk_at: Callable[[tuple[int, ...]], npt.NDArray[Any]],
    slabs_with_values: npt.NDArray[np.bool_],
) -> int:
    """Copy the published fields into the slabs of one shard that hold no values; returns how many held any.

    `chunk_at(coords within the shard)` gives a writable view of one chunk of the shard in the region buffer;
    `slabs_with_values` (over the shard's leading dims, a view the caller keeps) is updated where a published
    field arrives, so the encoder and the buffer pool see those slabs as holding data."""
    if slabs_with_values.all():
        return 0
    kept = 0
    chunk_shape = encoder.chunk_shape
    leading_grid = encoder.chunks_per_shard[:-2]
    field_grid = encoder.chunks_per_shard[-2:]
    for leading in itertools.product(*(range(n) for n in leading_grid)):
        block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(leading, chunk_shape[:-2], strict=True))
        has_values = slabs_with_values[block]  # a view
        missing = list(zip(*np.nonzero(~has_values), strict=True))
        if not missing:
            continue
        # A field spans the chunks along its own two dims: each of them may hold part of the published field.
        restored: set[tuple[Any, ...]] = set()
        absent: list[tuple[int, ...]] = []
        for field_chunk in itertools.product(*(range(n) for n in field_grid)):
            chunk_coords = (*leading, *field_chunk)
            published_chunk = published.chunk(chunk_coords)
            if published_chunk is None:
                absent.append(chunk_coords)
                continue
            target = chunk_at(chunk_coords)
            for slab in missing:
                source = published_chunk[slab]
                if holds_only_nan(source) if encoder.fill_is_nan else bool((source == encoder.fill_value).all()):
                    continue
                target[slab] = source
                restored.add(slab)
        for slab in restored:
            has_values[slab] = True
            # The published shard leaves out chunks holding only fill: a restored field is fill there (written, as
            # a buffer that was never filled, such as the scratch path's file, holds nothing there yet).
            for chunk_coords in absent:
                chunk_at(chunk_coords)[slab] = encoder.fill_value
        kept += len(restored)
    return kept
