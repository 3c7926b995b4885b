"""The upload gate by position, checksummed chunks against torn reads, the drift guard against old versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from reformatters_datasets.example import source
from reformatters_datasets.example.dataset import ExampleDataset

from reformatters.common.storage import ObjectStore
from reformatters.pipeline.shard_encoding import ShardEncoder
from reformatters.update.drift import StructureDriftError

from .conftest import INITS, UpdateFixture, copy_store, store_objects

DATASET = ExampleDataset()


def _run(kind: str, store: Path, src: Path, end: pd.Timestamp) -> None:
    common = {"cluster": "local", "store_url": str(store), "source_url": str(src), "n_workers": 2}
    if kind == "backfill":
        DATASET.backfill(end, show_progress=False, **common)
    else:
        DATASET.update(now=end, show_progress=False, **common)


@pytest.mark.parametrize("newest", [2, 3], ids=["whole-shard", "shard-merged-with-published"])
def test_a_field_the_source_lost_keeps_its_published_values(tmp_path: Path, newest: int) -> None:
    """The newest init is published with leads 3-5 missing; then lead 0 vanishes at the source while leads 3-5
    arrive: after the update lead 0 keeps its published values and leads 3-5 hold theirs (both variables, and
    for the newest init at the start of a shard and inside a shard already published)."""
    inits = INITS[: newest + 1]
    init = inits[newest]
    src = source.generate_source(tmp_path / "source", inits, missing=[(init, 3), (init, 4), (init, 5)])
    store = tmp_path / "store.zarr"
    _run("backfill", store, src, init + pd.Timedelta("6h"))
    published = DATASET.open_published(str(store)).load()
    assert published.temperature_2m.sel(init_time=init).isel(lead_time=slice(3, 6)).isnull().all()

    (src / source.relative_path(init, 0)).unlink()
    for hour in (3, 4, 5):
        (src / source.relative_path(init, hour)).write_bytes(source.encode_file(init, hour))
    _run("update", store, src, init)

    after = DATASET.open_published(str(store)).load()
    for name in ("temperature_2m", "precipitation_surface"):
        newest_after = after[name].sel(init_time=init)
        # Lead 0 (precipitation: NaN at lead 0 by definition, lead 1 needs no earlier file) as published.
        np.testing.assert_array_equal(newest_after.isel(lead_time=slice(0, 3)), published[name].sel(init_time=init)[:3])
        assert newest_after.isel(lead_time=slice(3, 6)).notnull().all(), f"{name}: leads 3-5 must hold values"
    for hour in (0, 3, 4, 5):
        np.testing.assert_allclose(
            after.temperature_2m.sel(init_time=init).isel(lead_time=hour), source.temperature(init, hour), rtol=1e-3
        )
    # The earlier inits, which the update did not reprocess, are untouched.
    xr.testing.assert_identical(
        after.isel(init_time=slice(0, newest)).drop_encoding(),
        published.isel(init_time=slice(0, newest)).drop_encoding(),
    )


def test_a_second_update_with_nothing_new_rewrites_no_shard(update_fixture: UpdateFixture, tmp_path: Path) -> None:
    store = copy_store(update_fixture.reference_store, tmp_path / "store.zarr")
    _run("update", store, update_fixture.source, INITS[-1])
    before = {key: (store / key).stat().st_mtime_ns for key in store_objects(store)}
    _run("update", store, update_fixture.source, INITS[-1])
    after = {key: (store / key).stat().st_mtime_ns for key in store_objects(store)}
    assert after == before, [key for key in before if after.get(key) != before[key]]
    assert any("/c/" in key for key in before), "the store holds shards: the check compared them"


def test_a_torn_partial_read_raises_instead_of_returning_other_values(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """A reader takes the shard index of one version and the chunks of the next (the object was replaced between
    its two range requests): the chunk's CRC-32C fails, xarray raises, no value of either version comes back."""
    store = copy_store(update_fixture.reference_store, tmp_path / "store.zarr")
    key = "temperature_2m/c/0/0/0/0"
    old = (store / key).read_bytes()
    encoder = ShardEncoder((store / "temperature_2m" / "zarr.json").read_bytes())
    index = encoder.read_shard_index(ObjectStore(store), key)
    # The next version of the shard: other values, so every chunk changes its length and the later ones move.
    # (A chunk that keeps its byte range reads as the new version's chunk, checksum and all: a valid value.)
    values = np.asarray(xr.open_zarr(store).temperature_2m[0:2].values)
    values += np.random.default_rng(0).normal(0, 3, values.shape).astype(np.float32)
    padded = np.full(encoder.shard_shape, np.nan, dtype=np.float32)
    padded[:, :6, :16, :32] = values
    new = encoder.encode(padded)
    assert new != old
    new_index = encoder.read_shard_index(_BytesStore(new), key)
    assert not np.array_equal(new_index.offsets_and_lengths[0, 0, 0, 0], index.offsets_and_lengths[0, 0, 0, 0])
    index_nbytes = len(old) - int(index.offsets_and_lengths[..., 1][index.offsets_and_lengths[..., 1] < 2**63].sum())
    torn = new[: len(new) - index_nbytes] + old[len(old) - index_nbytes :]  # new chunks, old index
    (store / key).write_bytes(torn)
    ds = xr.open_zarr(store, decode_timedelta=True)
    with pytest.raises(ValueError, match="checksum"):
        _ = ds.temperature_2m.isel(init_time=0, lead_time=0, latitude=slice(0, 8), longitude=slice(0, 16)).values


class _BytesStore:
    """One object's bytes, read as `ObjectStore.get_range` reads them."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        return self.data[start:end]


def test_an_update_over_the_previous_dataset_version_is_refused_naming_the_codecs(
    update_fixture: UpdateFixture, tmp_path: Path
) -> None:
    """A store written before chunks carried checksums (its inner codecs end with Blosc): refused, unchanged."""
    store = copy_store(update_fixture.base_store, tmp_path / "store.zarr")
    root = json.loads((store / "zarr.json").read_bytes())
    for path in [store / "zarr.json", *store.glob("*/zarr.json")]:
        document = json.loads(path.read_bytes())
        arrays = (document.get("consolidated_metadata") or {}).get("metadata") or {"": document}
        for meta in arrays.values():
            for codec in meta.get("codecs", []):
                if codec["name"] == "sharding_indexed":
                    codec["configuration"]["codecs"] = codec["configuration"]["codecs"][:-1]
                elif codec["name"] == "crc32c":
                    meta["codecs"].remove(codec)
        path.write_text(json.dumps(document))
    assert root != json.loads((store / "zarr.json").read_bytes())
    before = store_objects(store)
    with pytest.raises(StructureDriftError) as error:
        _run("update", store, tmp_path / "no-source", INITS[4])
    message = str(error.value)
    assert "temperature_2m: codecs template bytes(endian=little), blosc(" in message
    assert "crc32c != published bytes(endian=little), blosc(" in message
    assert store_objects(store) == before
