"""Compressing only the blocks with data gives the bytes Blosc gives for the whole chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from numcodecs import Blosc

from reformatters.pipeline.blosc_fill_tail import BloscFillTail, join_frames
from reformatters.pipeline.kernels import limit_library_threads
from reformatters.pipeline.shard_encoding import ShardEncoder

from .test_shard_encoding import create_array

CHUNK = (120, 64, 64)  # 1,966,080 bytes of float32: several Blosc blocks
SLAB = 64 * 64 * 4


def field_like(seed: int) -> np.ndarray:
    """Smooth values with noise, rounded to 7 mantissa bits as the pipeline stores them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    values = 280 + 10 * np.sin(y / 9.0)[None] * np.cos(x / 7.0)[None] + rng.normal(0, 0.5, CHUNK)
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF)) & ~np.uint32(0xFFFF)).view(np.float32)


@pytest.mark.parametrize(
    "config",
    [
        {"cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 0, "typesize": 4},
        {"cname": "lz4", "clevel": 5, "shuffle": 2, "blocksize": 0, "typesize": 4},
        {"cname": "zlib", "clevel": 1, "shuffle": 0, "blocksize": 0, "typesize": 4},
        {"cname": "zstd", "clevel": 5, "shuffle": 1, "blocksize": 65536, "typesize": 4},
    ],
)
@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_frames_are_byte_identical_to_compressing_the_whole_chunk(config: dict, fill: float) -> None:
    whole = Blosc.from_config(config)
    fill_tail = BloscFillTail(config, int(np.prod(CHUNK)) * 4, np.float32(fill).tobytes())
    values = field_like(0)
    joined = 0
    possible = 0
    for data_slabs in (1, 2, 7, 8, 13, 30, 47, 60, 90, 100, 105, 110, 119):
        chunk = values.copy()
        chunk[data_slabs:] = fill
        frame = fill_tail.encode(chunk, data_slabs * SLAB)
        head_nbytes = -(-data_slabs * SLAB // fill_tail.blocksize) * fill_tail.blocksize
        if head_nbytes + fill_tail.blocksize > chunk.nbytes:  # data in the last whole block: nothing to save
            assert frame is None
            continue
        possible += 1
        assert frame is not None, data_slabs
        joined += 1
        assert frame == bytes(whole.encode(chunk)), data_slabs
        np.testing.assert_array_equal(np.frombuffer(whole.decode(frame), dtype=np.float32).reshape(CHUNK), chunk)
    assert joined == possible >= 3


def test_incompressible_data_falls_back_or_matches() -> None:
    """Blosc stores incompressible input as is (no block offsets): such a frame is never joined."""
    config = {"cname": "lz4", "clevel": 1, "shuffle": 0, "blocksize": 0, "typesize": 4}
    chunk = np.random.default_rng(3).random(CHUNK, dtype=np.float32)
    chunk[20:] = np.nan
    frame = BloscFillTail(config, chunk.nbytes, np.float32(np.nan).tobytes()).encode(chunk, 20 * SLAB)
    assert frame is None or frame == bytes(Blosc.from_config(config).encode(chunk))


def test_a_chunk_of_another_size_is_refused() -> None:
    config = {"cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 0, "typesize": 4}
    fill_tail = BloscFillTail(config, int(np.prod(CHUNK)) * 4, np.float32(np.nan).tobytes())
    with pytest.raises(ValueError, match="C-contiguous chunk of 1966080 bytes"):
        fill_tail.encode(np.zeros((10, 64, 64), dtype=np.float32), SLAB)


@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("fill", [np.nan, -1.0])
def test_shards_with_part_filled_lead_chunks_match_zarrs_own_write(tmp_path: Path, fill: float, checksum: bool) -> None:
    """A forecast's first lead chunk part data, part leads not published: the shard bytes equal zarr's, with
    the project's CRC-32C after Blosc or without it."""
    limit_library_threads()
    shape, chunks, shards = (2, 120, 64, 128), (1, 60, 64, 64), (1, 120, 64, 128)
    values = np.full(shape, fill, dtype=np.float32)
    values[0, :13] = np.concatenate([field_like(1), field_like(2)], axis=2)[:13]
    values[1, :41] = np.concatenate([field_like(3), field_like(4)], axis=2)[:41]
    values[1, 5] = fill  # a missing lead inside the data
    arrays = {
        name: create_array(tmp_path / name, fill, shape, chunks, shards, checksum=checksum)
        for name in ("direct", "reference")
    }
    with zarr.config.set({"array.write_empty_chunks": False}):
        arrays["reference"][...] = values
    encoder = ShardEncoder((tmp_path / "direct" / "zarr.json").read_bytes())
    assert encoder._fill_tail is not None
    for init in range(2):
        key = tmp_path / "direct" / "c" / str(init) / "0" / "0" / "0"
        key.parent.mkdir(parents=True)
        key.write_bytes(encoder.encode(values[init : init + 1]))
        assert key.read_bytes() == (tmp_path / "reference" / "c" / str(init) / "0" / "0" / "0").read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct"), mode="r")[...], values)


def test_frames_laid_out_otherwise_are_not_joined() -> None:
    config = {"cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 65536, "typesize": 4}
    codec = Blosc.from_config(config)
    head = bytes(codec.encode(field_like(0)[:16].copy()))  # 262,144 bytes: four whole blocks
    tail = bytes(codec.encode(np.full(CHUNK, np.nan, dtype=np.float32)[:20]))
    assert join_frames(head, tail, 65536) is not None
    assert join_frames(b"\x03" + head[1:], b"\x03" + tail[1:], 65536) is None  # another format version
    assert join_frames(head, tail[:2] + bytes([tail[2] ^ 0x01]) + tail[3:], 65536) is None  # other flags
    assert join_frames(head, tail, 32768) is None  # another blocksize
    assert join_frames(head[:-1], tail, 65536) is None  # a truncated frame


@pytest.mark.parametrize(
    "config",
    [
        {"cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 0, "typesize": 4},
        {"cname": "lz4", "clevel": 5, "shuffle": 2, "blocksize": 0, "typesize": 4},
    ],
)
def test_a_chunk_larger_than_the_probe_gets_the_frames_of_the_whole_chunk(config: dict) -> None:
    """An ensemble chunk (85 leads x 51 members of 32 x 32, 17.8 MB, not a whole number of Blosc blocks): the
    blocksize probed on 4 MiB and the fill run's frame joined from one block's are those of compressing it whole."""
    from reformatters.pipeline.blosc_fill_tail import _HEADER, _fill_frame, _probe_blocksize

    shape = (85 * 51, 32, 32)
    nbytes = int(np.prod(shape)) * 4
    whole = Blosc.from_config(config)
    fill_tail = BloscFillTail(config, nbytes, np.float32(np.nan).tobytes())
    everything_nan = np.full(shape, np.nan, dtype=np.float32)
    whole_frame = bytes(whole.encode(everything_nan))
    assert fill_tail.blocksize == _HEADER.unpack_from(whole_frame)[5] and nbytes % fill_tail.blocksize
    rng = np.random.default_rng(3)
    for data_slabs in (1, 51 * 6, 51 * 40 + 7):
        chunk = everything_nan.copy()
        chunk[:data_slabs] = rng.normal(280, 5, (data_slabs, 32, 32)).astype(np.float32)
        frame = fill_tail.encode(chunk, data_slabs * 32 * 32 * 4)
        assert frame is not None and frame == bytes(whole.encode(chunk)), data_slabs
    assert _probe_blocksize.cache_info().currsize >= 1 and _fill_frame.cache_info().currsize >= 1
