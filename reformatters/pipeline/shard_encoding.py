"""Encode whole shards straight from a numpy view, in the byte layout zarr's sharding codec writes.

Writing a region through `zarr.Array.__setitem__` copies every shard that ends at the array's edge into a
fresh, padded, shard-sized buffer (GFS: 443 MB each, two per variable-region) and compresses every inner
chunk, also the all-fill ones. Here the variable-region buffer is allocated padded to the shard grid
(see `padded_shape`), so each shard is a view of it; inner chunks that hold only the fill value are left
out of the shard (readers see the fill value), and the rest go through the array's own inner codecs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from reformatters.common.arrays import holds_only_nan
from reformatters.pipeline.blosc_fill_tail import BloscFillTail


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
        fill = self.fill_value
        self._fill_is_nan = isinstance(fill, float | np.floating) and bool(np.isnan(fill))
        self._scratch: npt.NDArray[Any] | None = None
        self._direct_codecs = _synchronous_codecs(self._pipeline)
        self._fill_tail = _blosc_fill_tail(self._direct_codecs, self.chunk_shape, self.dtype, fill)
        self._fill_tail_checksum = self._fill_tail is not None and len(self._direct_codecs[1]) == 2  # type: ignore[index]
        self._slab_nbytes = int(np.prod(self.chunk_shape[-2:])) * self.dtype.itemsize

    @property
    def fill_is_nan(self) -> bool:
        return self._fill_is_nan

    def read_shard_index(self, store: Any, key: str) -> Any:
        """The index of the shard object `key` in `store` (zarr's `_ShardIndex`), read alone; None if absent."""
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.core.sync import sync

        if self._sharding is None:
            raise ValueError("an unsharded array has no shard index")
        size = self._sharding._shard_index_size(self.chunks_per_shard)
        at_start = self._sharding.index_location == ShardingCodecIndexLocation.start
        data = store.get_range(key, 0, size) if at_start else store.get_range(key, -size)
        if data is None:
            return None
        if len(data) != size:
            raise ValueError(f"{key}: {len(data)} bytes where a shard index of {size} bytes was expected")
        return sync(self._sharding._decode_shard_index(self._prototype.buffer.from_bytes(data), self.chunks_per_shard))

    def decode_chunk(self, data: bytes) -> npt.NDArray[Any]:
        """One inner chunk's values from its stored bytes (its checksum verified)."""
        from zarr.core.sync import sync

        (decoded,) = sync(self._pipeline.decode([(self._prototype.buffer.from_bytes(data), self._chunk_spec)]))
        if decoded is None:
            raise RuntimeError("zarr's codecs decoded no values from a chunk")
        return np.asarray(decoded.as_numpy_array()).reshape(self.chunk_shape)

    def _is_fill(self, values: npt.NDArray[Any]) -> bool:
        """True if `values` hold only the fill value (a whole chunk, or one 2-D slab of a shard)."""
        if self._fill_is_nan:
            return holds_only_nan(values)
        return bool((values == self.fill_value).all())

    def encode(
        self,
        shard: npt.NDArray[Any],
        slabs_with_data: npt.NDArray[np.bool_] | None = None,
        *,
        others_hold_fill: bool = False,
    ) -> bytes:
        """The shard's object bytes. A shard holding only the fill value still yields an object (its first
        chunk), so a region written whole replaces what was there before.

        `slabs_with_data` (over the shard's leading dims) marks 2-D slabs to treat as holding data without
        scanning them, such as fields a source delivered; the rest are scanned, unless `others_hold_fill`
        says the caller knows they hold only fill. Marking a slab that holds only fill is harmless: each chunk
        is checked again before it is encoded.
        """
        if shard.shape != self.shard_shape:
            raise ValueError(f"shard of shape {shard.shape} given, the array's shards are {self.shard_shape}")
        if shard.dtype != self.dtype:
            raise TypeError(f"shard of dtype {shard.dtype} given, the array holds {self.dtype}")
        if self._sharding is None:
            return bytes(self._encode_chunk(shard).to_bytes())
        # Which 2-D slabs of the shard hold anything but fill: a chunk over only fill slabs is skipped unread.
        if slabs_with_data is not None and slabs_with_data.shape != shard.shape[:-2]:
            raise ValueError(
                f"slabs_with_data has shape {slabs_with_data.shape}, the shard's leading dims are {shard.shape[:-2]}"
            )
        if others_hold_fill:
            if slabs_with_data is None:
                raise ValueError("others_hold_fill needs slabs_with_data: the map of slabs that may hold data")
            slab_has_data = slabs_with_data
        else:
            known = np.zeros(shard.shape[:-2], dtype=bool) if slabs_with_data is None else slabs_with_data
            slab_has_data = known.copy()
            for index in np.ndindex(slab_has_data.shape):
                if not slab_has_data[index]:
                    slab_has_data[index] = not self._is_fill(shard[index])
        chunk_shape = self.chunk_shape

        def chunk_at(chunk_coords: tuple[int, ...]) -> npt.NDArray[Any]:
            return shard[tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk_coords, chunk_shape, strict=True))]

        return self._encode_shard(chunk_at, slab_has_data)

    def encode_chunks(
        self,
        chunk_at: Callable[[tuple[int, ...]], npt.NDArray[Any]],
        slabs_with_data: npt.NDArray[np.bool_],
        *,
        others_unread: bool = False,
    ) -> bytes:
        """The shard's object bytes from its chunks: `chunk_at(coords within the shard)` gives one (a chunk-major
        buffer's chunk, C-contiguous, is compressed where it lies). `slabs_with_data` (over the shard's leading
        dims) marks the 2-D slabs that may hold anything but fill; every other slab must hold only fill, or, with
        `others_unread`, is never read (written as fill into a copy of the chunk: a scratch file leaves them
        holes)."""
        if slabs_with_data.shape != self.shard_shape[:-2]:
            raise ValueError(
                f"slabs_with_data has shape {slabs_with_data.shape}, the shard's leading dims are "
                f"{self.shard_shape[:-2]}"
            )
        if self._sharding is None:
            chunk = self._checked(chunk_at((0,) * len(self.chunk_shape)))
            return bytes(self._encode_chunk(self._copy_to_scratch(chunk)).to_bytes())
        return self._encode_shard(chunk_at, slabs_with_data, others_unread)

    def _checked(self, chunk: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if chunk.shape != self.chunk_shape or chunk.dtype != self.dtype:
            raise ValueError(
                f"chunk of {chunk.dtype} {chunk.shape} given, the array's chunks are {self.dtype} {self.chunk_shape}"
            )
        return chunk

    def _encode_shard(
        self,
        chunk_at: Callable[[tuple[int, ...]], npt.NDArray[Any]],
        slab_has_data: npt.NDArray[np.bool_],
        others_unread: bool = False,
    ) -> bytes:
        assert self._sharding is not None
        chunk_map: dict[tuple[int, ...], Any] = {}
        for chunk_coords in itertools.product(*(range(n) for n in self.chunks_per_shard)):
            encoded = self._shard_chunk(chunk_at, slab_has_data, others_unread, chunk_coords)
            if encoded is not None:
                chunk_map[chunk_coords] = encoded
        if not chunk_map:
            # Every chunk holds only fill here (unread where no slab has data: a scratch file leaves them holes).
            first = (0,) * len(self.chunk_shape)
            chunk_map[first] = self._encode_chunk(np.full(self.chunk_shape, self.fill_value, dtype=self.dtype))
        return self._join_shard(chunk_map)

    def write_chunks(
        self,
        out: BinaryIO,
        chunk_at: Callable[[tuple[int, ...]], npt.NDArray[Any]],
        slabs_with_data: npt.NDArray[np.bool_],
        *,
        others_unread: bool = False,
    ) -> None:
        """`encode_chunks` written to `out` (a new, seekable file) one chunk at a time: the same bytes, with
        only one encoded chunk in memory."""
        from zarr.core.indexing import morton_order_iter

        if self._sharding is None or slabs_with_data.shape != self.shard_shape[:-2]:
            out.write(self.encode_chunks(chunk_at, slabs_with_data, others_unread=others_unread))
            return
        self.write_shard(
            out,
            (
                (coords, self._shard_chunk(chunk_at, slabs_with_data, others_unread, coords))
                for coords in morton_order_iter(self.chunks_per_shard)
            ),
        )

    def write_shard(self, out: BinaryIO, chunks: Iterable[tuple[tuple[int, ...], Any]]) -> None:
        """The shard object of encoded chunks (None: absent), given in zarr's (Morton) order, written to `out` (a
        new, seekable file) as they come: `join_shard`'s bytes."""
        from zarr.codecs.sharding import ShardingCodecIndexLocation, _ShardIndex
        from zarr.core.sync import sync

        assert self._sharding is not None
        index = _ShardIndex.create_empty(self.chunks_per_shard)
        at_start = self._sharding.index_location == ShardingCodecIndexLocation.start
        index_size = self._sharding._shard_index_size(self.chunks_per_shard)
        start = index_size if at_start else 0  # offsets count from the object's start
        if at_start:
            out.write(bytes(index_size))
        position = start
        for chunk_coords, encoded in chunks:
            if encoded is None or len(encoded) == 0:
                continue
            out.write(memoryview(encoded.as_numpy_array()))
            index.set_chunk_slice(chunk_coords, slice(position, position + len(encoded)))
            position += len(encoded)
        if position == start:
            # Every chunk holds only fill: the first one stands for the shard, as `_encode_shard` writes it.
            encoded = self._encode_chunk(np.full(self.chunk_shape, self.fill_value, dtype=self.dtype))
            out.write(memoryview(encoded.as_numpy_array()))
            index.set_chunk_slice((0,) * len(self.chunk_shape), slice(start, start + len(encoded)))
        index_bytes = sync(self._sharding._encode_shard_index(index)).as_numpy_array().data
        if len(index_bytes) != index_size:
            raise RuntimeError(f"a shard index of {len(index_bytes)} bytes, {index_size} expected")
        if at_start:
            end = out.tell()
            out.seek(0)
            out.write(index_bytes)
            out.seek(end)
        else:
            out.write(index_bytes)

    def _shard_chunk(
        self,
        chunk_at: Callable[[tuple[int, ...]], npt.NDArray[Any]],
        slab_has_data: npt.NDArray[np.bool_],
        others_unread: bool,
        chunk_coords: tuple[int, ...],
    ) -> Any:
        """One inner chunk's encoded bytes, None where it holds only fill (left out of the shard)."""
        block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk_coords, self.chunk_shape, strict=True))
        chunk_has_data = slab_has_data[block[:-2]]
        if not chunk_has_data.any():
            return None
        chunk = self._checked(chunk_at(chunk_coords))
        fill_from_byte: int | None = None
        written_slabs: int | None = None  # a copy holding only its first slabs (the rest is fill by definition)
        if chunk_has_data.all():
            contiguous = self._copy_to_scratch(chunk)
        else:
            # Slabs without data hold fill (contiguous chunks as they lie, copies as written) and those after
            # the last slab with data need not be compressed.
            fill_from_byte = (int(np.flatnonzero(chunk_has_data)[-1]) + 1) * self._slab_nbytes
            if chunk.flags.c_contiguous and not others_unread:
                contiguous = chunk
            else:
                # Only the slabs the fill-tail compressor reads are copied or filled: a chunk of many slabs (51
                # members x 85 leads) with its first leads published touches a fraction of the scratch chunk.
                written_slabs = self._slabs_read_by_fill_tail(fill_from_byte)
                contiguous = self._copy_data_slabs_to_scratch(chunk, chunk_has_data, written_slabs)
        # A slab with data nearly always shows it at its first point: no scan of the chunk then.
        first_slab: tuple[int | slice, ...] = (
            tuple(int(i[0]) for i in np.nonzero(chunk_has_data)) if chunk_has_data.ndim else ()
        )
        first_point = contiguous[(*first_slab, slice(0, 1), slice(0, 1))]
        scanned = contiguous if written_slabs is None else self._leading_slabs(contiguous, written_slabs)
        if self._is_fill(first_point) and self._is_fill(scanned):
            return None
        return self._encode_chunk(contiguous, fill_from_byte, written_slabs)

    def _slabs_read_by_fill_tail(self, fill_from_byte: int) -> int | None:
        """How many leading slabs the fill-tail compressor reads for a chunk whose data ends at `fill_from_byte`;
        None (every slab) without one."""
        if self._fill_tail is None:
            return None
        blocksize = self._fill_tail.blocksize
        head_nbytes = -(-fill_from_byte // blocksize) * blocksize
        total = int(np.prod(self.chunk_shape[:-2]))
        return min(total, -(-head_nbytes // self._slab_nbytes))

    def _leading_slabs(self, chunk: npt.NDArray[Any], slabs: int) -> npt.NDArray[Any]:
        """The first `slabs` slabs of a C-contiguous chunk, as one flat view."""
        return chunk.reshape(-1)[: slabs * (self._slab_nbytes // self.dtype.itemsize)]

    def encode_chunk(self, chunk: npt.NDArray[Any]) -> Any:
        """One whole chunk's encoded bytes (a zarr Buffer), as zarr's codecs write it."""
        return self._encode_chunk(self._copy_to_scratch(self._checked(chunk)))

    def stored_chunk(self, data: bytes) -> Any:
        """Stored chunk bytes as the Buffer `join_shard` takes (kept as they are)."""
        return self._prototype.buffer.from_bytes(data)

    def join_shard(self, chunk_map: dict[tuple[int, ...], Any]) -> bytes:
        """The shard object of encoded chunks (`encode_chunk`, `stored_chunk`) by their coords within the shard."""
        return self._join_shard(chunk_map)

    def _join_shard(self, chunk_map: dict[tuple[int, ...], Any]) -> bytes:
        """The shard object: its chunks in zarr's (Morton) order and the index, copied once into one bytes
        object (zarr's own shard writer joins them into a buffer, then copies that to bytes: 0.6 ms a GFS field)."""
        from zarr.codecs.sharding import ShardingCodecIndexLocation, _ShardIndex
        from zarr.core.indexing import morton_order_iter
        from zarr.core.sync import sync

        assert self._sharding is not None
        index = _ShardIndex.create_empty(self.chunks_per_shard)
        pieces: list[memoryview] = []
        start = 0
        for chunk_coords in morton_order_iter(self.chunks_per_shard):
            encoded = chunk_map.get(chunk_coords)
            if encoded is None or len(encoded) == 0:
                continue
            pieces.append(memoryview(encoded.as_numpy_array()))  # the chunk's bytes, not a copy
            index.set_chunk_slice(chunk_coords, slice(start, start + len(encoded)))
            start += len(encoded)
        index_bytes = sync(self._sharding._encode_shard_index(index)).as_numpy_array().data
        if self._sharding.index_location == ShardingCodecIndexLocation.start:
            # Offsets count from the object's start, so they move by the index's own length.
            present = index.offsets_and_lengths[..., 0] != np.iinfo(np.uint64).max
            index.offsets_and_lengths[present, 0] += len(index_bytes)
            index_bytes = sync(self._sharding._encode_shard_index(index)).as_numpy_array().data
            return b"".join([index_bytes, *pieces])
        return b"".join([*pieces, index_bytes])

    def _copy_to_scratch(self, block: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """`block` as a C-contiguous array: a copy into this encoder's scratch chunk unless it already is one."""
        if block.flags.c_contiguous:
            return block
        scratch = self._scratch_like(block)
        np.copyto(scratch, block)
        return scratch

    def _copy_data_slabs_to_scratch(
        self, block: npt.NDArray[Any], has_data: npt.NDArray[np.bool_], up_to_slab: int | None = None
    ) -> npt.NDArray[Any]:
        """`block` as a C-contiguous array, its slabs known to hold only fill written as fill, not read: a
        forecast's last lead chunk is often mostly leads not published (yet), and filling costs half a copy.
        `up_to_slab`: only the slabs before it (in C order) are written; the others are left as they were."""
        scratch = self._scratch_like(block)
        row_length = has_data.shape[-1] if has_data.ndim else 1
        for n, outer in enumerate(np.ndindex(has_data.shape[:-1])):
            row = has_data[outer]
            first = n * row_length
            if up_to_slab is not None and first >= up_to_slab:
                break
            bounds = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), row.size]
            for start, stop in itertools.pairwise(bounds):
                if up_to_slab is not None:
                    stop = min(stop, up_to_slab - first)
                    if start >= stop:
                        break
                run = (*outer, slice(start, stop))
                if row[start]:
                    np.copyto(scratch[run], block[run])
                else:
                    scratch[run] = self.fill_value
        return scratch

    def _scratch_like(self, block: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self._scratch is None or self._scratch.shape != block.shape:
            self._scratch = np.empty(block.shape, dtype=self.dtype)
        return self._scratch

    def _encode_chunk(
        self, chunk: npt.NDArray[Any], fill_from_byte: int | None = None, written_slabs: int | None = None
    ) -> Any:
        """One chunk's encoded bytes as a zarr Buffer that owns its memory (never a view of `chunk`).
        `fill_from_byte`: every byte of the C-contiguous `chunk` from there on is the fill value. `written_slabs`:
        only the chunk's first slabs were written (a scratch chunk); the rest is written as fill here if the
        whole chunk must be compressed after all."""
        from zarr.core.sync import sync

        if fill_from_byte is not None and self._fill_tail is not None:
            frame = self._fill_tail.encode(chunk, fill_from_byte)
            if frame is not None:
                if self._fill_tail_checksum:
                    frame = with_crc32c(frame)
                return self._prototype.buffer.from_bytes(frame)
        if written_slabs is not None:
            chunk.reshape(-1)[written_slabs * (self._slab_nbytes // self.dtype.itemsize) :] = self.fill_value

        nd_buffer = self._prototype.nd_buffer.from_numpy_array(chunk)
        if self._direct_codecs is None:
            (encoded,) = sync(self._pipeline.encode([(nd_buffer, self._chunk_spec)]))
        else:
            # Each codec's synchronous encoder in this thread: zarr's async pipeline hands every chunk to a
            # thread pool and back, which under a busy worker costs more than compressing the chunk.
            array_bytes, bytes_codecs = self._direct_codecs
            encoded = array_bytes._encode_sync(nd_buffer, self._chunk_spec)
            for codec in bytes_codecs:
                encoded = codec._encode_sync(encoded, self._chunk_spec)
        if encoded is None:
            raise RuntimeError("zarr's codecs returned no bytes for a chunk")
        if not self._direct_codecs or not self._direct_codecs[1]:
            encoded = self._prototype.buffer.from_bytes(encoded.to_bytes())  # may alias the scratch chunk
        return encoded


def with_crc32c(frame: bytes) -> bytes:
    """`frame` followed by its CRC-32C, little-endian: what zarr's `crc32c` codec appends."""
    import google_crc32c

    return frame + np.uint32(google_crc32c.value(frame)).tobytes()


def _synchronous_codecs(pipeline: Any) -> tuple[Any, list[Any]] | None:
    """(array-to-bytes codec, bytes-to-bytes codecs) when every codec of `pipeline` can encode synchronously
    and none transforms the array first; None otherwise (then chunks go through zarr's async pipeline)."""
    array_codecs = getattr(pipeline, "array_array_codecs", None)
    array_bytes = getattr(pipeline, "array_bytes_codec", None)
    bytes_codecs = list(getattr(pipeline, "bytes_bytes_codecs", None) or ())
    if array_codecs or array_bytes is None:
        return None
    if not all(hasattr(codec, "_encode_sync") for codec in (array_bytes, *bytes_codecs)):
        return None
    return array_bytes, bytes_codecs


def _blosc_fill_tail(
    direct_codecs: tuple[Any, list[Any]] | None, chunk_shape: Sequence[int], dtype: np.dtype[Any], fill: Any
) -> BloscFillTail | None:
    """A fill-tail compressor when a chunk's bytes are its values as they lie in memory, then Blosc (and at most
    a CRC-32C of the compressed frame after it, which the caller appends)."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    if direct_codecs is None or fill is None:
        return None
    array_bytes, bytes_codecs = direct_codecs
    native = "little" if np.little_endian else "big"
    if not isinstance(array_bytes, BytesCodec):
        return None
    if dtype.itemsize > 1 and array_bytes.endian is not None and array_bytes.endian.value != native:
        return None
    if not bytes_codecs or not isinstance(bytes_codecs[0], BloscCodec):
        return None
    if len(bytes_codecs) > 2 or (len(bytes_codecs) == 2 and not isinstance(bytes_codecs[1], Crc32cCodec)):
        return None
    blosc = bytes_codecs[0]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value]
    config = {
        "cname": blosc.cname.value,
        "clevel": blosc.clevel,
        "shuffle": shuffle,
        "blocksize": blosc.blocksize,
        "typesize": blosc.typesize or dtype.itemsize,
    }
    chunk_nbytes = int(np.prod(chunk_shape)) * dtype.itemsize
    return BloscFillTail(config, chunk_nbytes, np.array(fill, dtype=dtype).tobytes())
