"""The publication protocol: how metadata reaches the final store so readers always see a valid dataset.

Chunk data is uploaded first (by the region graphs). Then metadata is copied from a tmp store:
coordinate chunks and per-array `zarr.json` first, the root `zarr.json` (which carries the
consolidated metadata readers open by default) last. That last single-object write is the commit.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from reformatters.common.storage import ObjectStore
from reformatters.template_config import write_metadata

ROOT_METADATA_KEY = "zarr.json"


@contextmanager
def tmp_metadata_store(template_ds: xr.Dataset) -> Iterator[Path]:
    """A local store holding the full expanded metadata; removed afterwards, also on failure."""
    directory = Path(tempfile.mkdtemp(prefix="reformatters-tmp-store-"))
    try:
        write_metadata(template_ds, directory / "store.zarr")
        yield directory / "store.zarr"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def variable_metadata(tmp_store: Path, var_names: Sequence[str]) -> dict[str, bytes]:
    return {name: (tmp_store / name / "zarr.json").read_bytes() for name in var_names}


def metadata_keys(tmp_store: Path) -> list[str]:
    """Every object of a metadata-only store, in publication order: root `zarr.json` last."""
    keys = sorted(str(p.relative_to(tmp_store)) for p in tmp_store.rglob("*") if p.is_file())
    keys.remove(ROOT_METADATA_KEY)
    coordinate_chunks = [k for k in keys if not k.endswith("zarr.json")]
    array_metadata = [k for k in keys if k.endswith("zarr.json")]
    return [*coordinate_chunks, *array_metadata, ROOT_METADATA_KEY]


def publish_metadata(template_ds: xr.Dataset, final_store: ObjectStore) -> None:
    with tmp_metadata_store(template_ds) as tmp_store:
        publish_from_tmp_store(tmp_store, final_store)


def publish_from_tmp_store(tmp_store: Path, final_store: ObjectStore) -> None:
    for key in metadata_keys(tmp_store):
        final_store.put(key, (tmp_store / key).read_bytes())
