"""Shards encoded straight from a padded buffer read back exactly through zarr and xarray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from reformatters.common.binary_rounding import round_float32_inplace
from reformatters.pipeline.kernels import limit_library_threads
from reformatters.pipeline.shard_encoding import ShardEncoder, padded_shape

SHAPE = (2, 9, 13, 20)
CHUNKS = (1, 5, 4, 8)
SHARDS = (1, 10, 8, 16)


def create_array(
    path: Path,
    fill_value: float = float("nan"),
    shape: tuple[int, ...] = SHAPE,
    chunks: tuple[int, ...] = CHUNKS,
    shards: tuple[int, ...] = SHARDS,
    checksum: bool = True,
) -> zarr.Array:
    """An array with the project's inner codec chain (Blosc, then a CRC-32C of each chunk), or Blosc alone."""
    return zarr.create_array(
        str(path),
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype="float32",
        fill_value=fill_value,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), *([Crc32cCodec()] if checksum else [])],
    )


def array_metadata(path: Path) -> bytes:
    return (path / "zarr.json").read_bytes()


def sample_values(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(280, 10, SHAPE).astype(np.float32)
    values[:, 5:] = np.nan  # the second chunk along axis 1 holds no data: left out of the shard
    values[1, :, :4] = np.nan
    values[0, 3] = np.nan  # a missing field inside a chunk with data: written as fill, not copied
    return values


def write_shards(path: Path, values: np.ndarray) -> int:
    encoder = ShardEncoder(array_metadata(path))
    padded = np.full(padded_shape(SHAPE, SHARDS), np.nan, dtype=np.float32)
    padded[tuple(slice(0, n) for n in SHAPE)] = values
    written = 0
    for index in np.ndindex(*(-(-n // s) for n, s in zip(SHAPE, SHARDS, strict=True))):
        block = tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, SHARDS, strict=True))
        key = path / "c" / "/".join(map(str, index))
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(encoder.encode(padded[block]))
        written += 1
    return written


def test_padded_shape_rounds_up_to_whole_shards_except_skipped_axes() -> None:
    assert padded_shape(SHAPE, SHARDS) == (2, 10, 16, 32)
    assert padded_shape((3, 209, 721, 1440), (1, 210, 726, 726), skip_axes=(0,)) == (3, 210, 726, 1452)


def test_direct_shards_read_back_exactly(tmp_path: Path) -> None:
    limit_library_threads()
    path = tmp_path / "direct.zarr"
    create_array(path)
    values = sample_values()
    assert write_shards(path, values) == 2 * 1 * 2 * 2
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], values)


@pytest.mark.parametrize("checksum", [True, False])
def test_direct_shards_match_zarrs_own_write_without_empty_chunks(tmp_path: Path, checksum: bool) -> None:
    limit_library_threads()
    values = sample_values(1)
    direct = tmp_path / "direct.zarr"
    create_array(direct, checksum=checksum)
    write_shards(direct, values)
    reference = tmp_path / "reference.zarr"
    with zarr.config.set({"array.write_empty_chunks": False}):
        create_array(reference, checksum=checksum)[...] = values
    for shard in sorted((reference / "c").rglob("*")):
        if shard.is_file():
            relative = shard.relative_to(reference)
            assert (direct / relative).read_bytes() == shard.read_bytes(), relative


def test_shards_with_the_index_first_match_zarrs_own_write(tmp_path: Path) -> None:
    """The shard's index leads the object: every chunk offset moves by the index's length."""
    from zarr.codecs import BytesCodec, ShardingCodec

    limit_library_threads()
    values = sample_values(2)
    paths = {name: tmp_path / f"{name}.zarr" for name in ("direct", "reference")}
    for path in paths.values():
        zarr.create_array(
            str(path),
            shape=SHAPE,
            chunks=SHARDS,
            dtype="float32",
            fill_value=float("nan"),
            serializer=ShardingCodec(
                chunk_shape=CHUNKS,
                codecs=[BytesCodec(), BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()],
                index_location="start",
            ),
            compressors=None,
        )
    write_shards(paths["direct"], values)
    with zarr.config.set({"array.write_empty_chunks": False}):
        zarr.open_array(str(paths["reference"]), mode="r+")[...] = values
    compared = 0
    for shard in sorted((paths["reference"] / "c").rglob("*")):
        if shard.is_file():
            relative = shard.relative_to(paths["reference"])
            assert (paths["direct"] / relative).read_bytes() == shard.read_bytes(), relative
            compared += 1
    assert compared == 2 * 1 * 2 * 2
    np.testing.assert_array_equal(zarr.open_array(str(paths["direct"]), mode="r")[...], values)


def test_an_all_fill_shard_still_yields_an_object_that_reads_as_fill(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    create_array(path)
    encoder = ShardEncoder(array_metadata(path))
    data = encoder.encode(np.full(SHARDS, np.nan, dtype=np.float32))
    assert 0 < len(data) < 4096
    (path / "c" / "0" / "0" / "0").mkdir(parents=True)
    (path / "c" / "0" / "0" / "0" / "0").write_bytes(data)
    assert np.isnan(zarr.open_array(str(path), mode="r")[0, :, :8, :16]).all()


def test_non_nan_fill_value_chunks_are_recognised(tmp_path: Path) -> None:
    path = tmp_path / "zero.zarr"
    create_array(path, fill_value=0.0)
    values = np.zeros(SHAPE, dtype=np.float32)
    values[0, 0, 0, 0] = 1.5
    write_shards(path, values)
    np.testing.assert_array_equal(zarr.open_array(str(path), mode="r")[...], values)
    # Only one inner chunk holds anything but the fill value; its shard is the only one with a chunk of data.
    sizes = sorted(p.stat().st_size for p in (path / "c").rglob("*") if p.is_file())
    assert sizes[-1] > sizes[0]


def test_wrong_shard_shape_or_dtype_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    create_array(path)
    encoder = ShardEncoder(array_metadata(path))
    with pytest.raises(ValueError, match=r"shards are \(1, 10, 8, 16\)"):
        encoder.encode(np.zeros((1, 10, 8, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="float32"):
        encoder.encode(np.zeros(SHARDS, dtype=np.float64))


def test_unsharded_arrays_get_one_object_per_chunk(tmp_path: Path) -> None:
    path = tmp_path / "plain.zarr"
    zarr.create_array(str(path), shape=(4, 3), chunks=(2, 3), dtype="float32", fill_value=float("nan"))
    encoder = ShardEncoder(array_metadata(path))
    assert encoder.shard_shape == (2, 3)
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    (path / "c" / "1").mkdir(parents=True)
    (path / "c" / "1" / "0").write_bytes(encoder.encode(values[2:]))
    read = zarr.open_array(str(path), mode="r")[...]
    np.testing.assert_array_equal(read[2:], values[2:])
    assert np.isnan(read[:2]).all()
    assert json.loads(array_metadata(path))["shape"] == [4, 3]


def test_rounding_a_view_into_a_padded_buffer_leaves_the_padding_alone() -> None:
    padded = np.full((2, 6, 8, 12), 7.123456789, dtype=np.float32)
    view = padded[:, :5, :7, :10]
    assert not view.flags.c_contiguous
    expected = round_float32_inplace(np.ascontiguousarray(view), 7)
    round_float32_inplace(view, 7)
    np.testing.assert_array_equal(view, expected)
    assert (padded[:, 5:] == np.float32(7.123456789)).all()
    assert (padded[:, :, 7:] == np.float32(7.123456789)).all()
    assert (padded[..., 10:] == np.float32(7.123456789)).all()


def test_slabs_marked_as_data_cost_no_scan_and_change_no_byte(tmp_path: Path) -> None:
    """Marking slabs (delivered fields) skips their scan; a marked slab that holds only fill is still left out,
    and an unmarked slab with data is still found."""
    limit_library_threads()
    path = tmp_path / "marked.zarr"
    create_array(path)
    encoder = ShardEncoder(array_metadata(path))
    shard = np.full(SHARDS, np.nan, dtype=np.float32)
    shard[0, 2] = 1.25  # data in a slab left unmarked
    reference = encoder.encode(shard)
    marked = np.zeros(SHARDS[:-2], dtype=bool)
    marked[0, 7] = True  # only fill there: the chunk check leaves it out all the same
    assert encoder.encode(shard, marked) == reference
    marked[0, 2] = True
    assert encoder.encode(shard, marked) == reference
    with pytest.raises(ValueError, match="leading dims"):
        encoder.encode(shard, np.zeros((1, 9), dtype=bool))
    # A caller that has scanned already vouches for the unmarked slabs: they are not read at all (so values
    # put in one, in another chunk, behind the caller's back are not written).
    marked[0, 7] = False
    assert encoder.encode(shard, marked, others_hold_fill=True) == reference
    shard[0, 7] = 2.5
    assert encoder.encode(shard, marked, others_hold_fill=True) == reference
    assert encoder.encode(shard, marked) != reference
    with pytest.raises(ValueError, match="needs slabs_with_data"):
        encoder.encode(shard, others_hold_fill=True)


@pytest.mark.parametrize("checksum", [True, False])
def test_unread_slabs_of_many_slab_chunks_are_fill_whatever_the_scratch_held(tmp_path: Path, checksum: bool) -> None:
    """Chunks of 120 slabs (40 leads x 3 members, as an ensemble's chunk spans every member) with their slabs
    marked unread holding garbage: chunks with data in their first leads (only the slabs the fill-tail compressor
    reads are copied), to a lead past what the fill tail can skip (the whole chunk compressed: the rest filled
    then), after a chunk whose copy filled the scratch with values, and a chunk with no data: the bytes zarr writes
    for the same values."""
    limit_library_threads()
    shape = chunks = (1, 40, 3, 32, 32)
    shards = (1, 40, 3, 32, 64)
    full_shape = (4, 40, 3, 32, 64)
    rng = np.random.default_rng(7)
    values = np.full(full_shape, np.nan, dtype=np.float32)
    marked = np.zeros(full_shape[:3], dtype=bool)
    values[0, :3] = rng.normal(280, 5, (3, 3, 32, 64))  # first leads
    marked[0, :3] = True
    values[1] = rng.normal(280, 5, (40, 3, 32, 64))  # every slab: the scratch copy fills with values
    marked[1] = True
    # Data to slab 70 of 120 (lead 23, member 1): the fill-tail compressor would read 3 of the 3.75 Blosc blocks
    # and gives up (its fill frame needs a whole block), so the whole chunk is compressed.
    values[2, 23, 1] = rng.normal(280, 5, (32, 64))
    marked[2, 23, 1] = True
    values[2, 0, 0, :, :32] = rng.normal(280, 5, (32, 32))  # and the first slab of the first chunk
    marked[2, 0, 0] = True
    assert shape == chunks
    direct = tmp_path / "direct.zarr"
    zarr.create_array(
        str(direct),
        shape=full_shape,
        chunks=chunks,
        shards=shards,
        dtype="float32",
        fill_value=float("nan"),
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), *([Crc32cCodec()] if checksum else [])],
    )
    encoder = ShardEncoder(array_metadata(direct))
    garbage = np.where(marked[..., None, None], values, np.float32(7.0))  # what unread slabs hold in a scratch file
    for init in range(full_shape[0]):

        def chunk_at(within: tuple[int, ...], init: int = init) -> np.ndarray:
            column = slice(within[-1] * 32, (within[-1] + 1) * 32)
            return np.ascontiguousarray(garbage[init : init + 1, :, :, :, column])

        key = direct / "c" / f"{init}" / "0" / "0" / "0" / "0"
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(encoder.encode_chunks(chunk_at, marked[init : init + 1], others_unread=True))
    reference = tmp_path / "reference.zarr"
    with zarr.config.set({"array.write_empty_chunks": False}):
        zarr.create_array(
            str(reference),
            shape=full_shape,
            chunks=chunks,
            shards=shards,
            dtype="float32",
            fill_value=float("nan"),
            compressors=[
                BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                *([Crc32cCodec()] if checksum else []),
            ],
        )[...] = values
    for init in range(3):
        relative = Path("c") / f"{init}" / "0" / "0" / "0" / "0"
        assert (direct / relative).read_bytes() == (reference / relative).read_bytes(), relative
    np.testing.assert_array_equal(zarr.open_array(str(direct), mode="r")[...], values)
