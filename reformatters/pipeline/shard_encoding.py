"""Encode whole shards straight from a numpy view, in the byte layout zarr's sharding codec writes.

Writing a region through `zarr.Array.__setitem__` copies every shard that ends at the array's edge into a
fresh, padded, shard-sized buffer (GFS: 443 MB each, two per variable-region) and compresses every inner
chunk, also the all-fill ones. Here the variable-region buffer is allocated padded to the shard grid
(see `padded_shape`), so each shard is a view of it; inner chunks that hold only the fill value are left
out of the shard (readers see the fill value), and the rest go through the array's own inner codecs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def padded_shape(shape: Sequence[int], shards: Sequence[int], skip_axes: Sequence[int] = ()) -> tuple[int, ...]:
    """`shape` rounded up to whole shards along every axis not in `skip_axes`."""
    return tuple(
        n if axis in skip_axes else -(-n // s) * s for axis, (n, s) in enumerate(zip(shape, shards, strict=True))
    )


class ShardEncoder:
    """Encodes the objects of one zarr v3 array (its shards, or its chunks if unsharded) from its `zarr.json`."""

    def __init__(self, array_metadata: bytes) -> None:
        import zarr
        import zarr.storage
        from zarr.codecs import ShardingCodec
        from zarr.core.array_spec import ArrayConfig
        from zarr.core.buffer import default_buffer_prototype

        prototype = default_buffer_prototype()
        store = zarr.storage.MemoryStore(
            store_dict={
                "zarr.json": prototype.buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group"}'),
                "a/zarr.json": prototype.buffer.from_bytes(array_metadata),
            }
        )
        array = zarr.open_array(store, path="a", mode="r")
        codecs = array.metadata.codecs  # type: ignore[union-attr]
        self._prototype = prototype
        self.dtype = np.dtype(array.dtype)
        self.fill_value = array.metadata.fill_value
        shard_spec = array.metadata.get_chunk_spec(
            (0,) * array.ndim, ArrayConfig(order="C", write_empty_chunks=True), prototype
        )
        self._sharding: ShardingCodec | None = codecs[0] if isinstance(codecs[0], ShardingCodec) else None
        if self._sharding is None and any(isinstance(c, ShardingCodec) for c in codecs):
            raise ValueError(
                f"sharding_indexed must be the array's first codec to encode shards directly, got {codecs}; "
                "move array-to-array codecs (filters) inside the sharding codec"
            )
        if self._sharding is None:
            # Unsharded: every chunk is its own object, encoded by the array's codecs.
            self.shard_shape: tuple[int, ...] = tuple(array.chunks)
            self.chunk_shape: tuple[int, ...] = self.shard_shape
            self._pipeline = array._async_array.codec_pipeline
            self._chunk_spec = shard_spec
        else:
            self.shard_shape = tuple(array.shards or ())
            self.chunk_shape = tuple(self._sharding.chunk_shape)
            self._pipeline = self._sharding.codec_pipeline
            self._chunk_spec = self._sharding._get_chunk_spec(shard_spec)
        self.chunks_per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True))

    def _is_fill(self, chunk: npt.NDArray[Any]) -> bool:
        fill = self.fill_value
        if isinstance(fill, float | np.floating) and np.isnan(fill):
            holds_fill: Any = np.isnan
        else:
            holds_fill = lambda values: values == fill  # noqa: E731
        if chunk.ndim <= 2:
            return bool(holds_fill(chunk).all())
        # One 2-D slab at a time: a chunk with data usually shows it in its first slab, so the scan stops there.
        return all(bool(holds_fill(chunk[index]).all()) for index in np.ndindex(chunk.shape[:-2]))

    def encode(self, shard: npt.NDArray[Any]) -> bytes:
        """The shard's object bytes. A shard holding only the fill value still yields an object (its first
        chunk), so a region written whole replaces what was there before."""
        from zarr.core.sync import sync

        if shard.shape != self.shard_shape:
            raise ValueError(f"shard of shape {shard.shape} given, the array's shards are {self.shard_shape}")
        if shard.dtype != self.dtype:
            raise TypeError(f"shard of dtype {shard.dtype} given, the array holds {self.dtype}")
        if self._sharding is None:
            return bytes(self._encode_chunks([shard])[0].to_bytes())
        blocks = {
            chunk_coords: shard[
                tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk_coords, self.chunk_shape, strict=True))
            ]
            for chunk_coords in itertools.product(*(range(n) for n in self.chunks_per_shard))
        }
        kept = [coords for coords, block in blocks.items() if not self._is_fill(block)]
        if not kept:
            kept = [next(iter(blocks))]
        chunk_map = dict(zip(kept, self._encode_chunks([blocks[c] for c in kept]), strict=True))
        shard_bytes = sync(
            self._sharding._encode_shard_dict(
                chunk_map,
                chunks_per_shard=self.chunks_per_shard,
                buffer_prototype=self._prototype,
            )
        )
        assert shard_bytes is not None  # at least one chunk is always encoded
        return bytes(shard_bytes.to_bytes())

    def _encode_chunks(self, blocks: Sequence[npt.NDArray[Any]]) -> list[Any]:
        from zarr.core.sync import sync

        batch = [(self._prototype.nd_buffer.from_numpy_array(block), self._chunk_spec) for block in blocks]
        encoded = list(sync(self._pipeline.encode(batch)))
        if any(e is None for e in encoded):
            raise RuntimeError("zarr's codec pipeline returned no bytes for a chunk")
        return encoded
