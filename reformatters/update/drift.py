"""Refuse to update a store whose structure differs from the template (design invariant 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reformatters.common.storage import ObjectStore
from reformatters.update.lease import UpdateRefusedError


class StructureDriftError(UpdateRefusedError):
    pass


def consolidated_arrays(root_metadata: bytes) -> dict[str, dict[str, Any]]:
    root = json.loads(root_metadata)
    metadata: dict[str, dict[str, Any]] = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    return {name: meta for name, meta in metadata.items() if meta.get("node_type") == "array"}


def _structure(meta: dict[str, Any], append_dim: str) -> dict[str, Any]:
    dims = list(meta.get("dimension_names") or [])
    shape = [None if d == append_dim else n for d, n in zip(dims, meta.get("shape", []), strict=False)]
    outer = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    sharding = next((c for c in meta.get("codecs", []) if c.get("name") == "sharding_indexed"), None)
    if sharding is not None:
        chunks, shards = sharding["configuration"]["chunk_shape"], outer
    else:
        chunks, shards = outer, None
    return {"dims": dims, "shape": shape, "dtype": meta.get("data_type"), "chunks": chunks, "shards": shards}


def structure_differences(template_root: bytes, published_root: bytes, append_dim: str) -> list[str]:
    """Each difference in variables, dims, dtypes, chunks and shards (the append dim's length aside)."""
    template = consolidated_arrays(template_root)
    published = consolidated_arrays(published_root)
    differences = []
    for name in sorted(set(template) - set(published)):
        differences.append(f"{name}: in the template, not in the published store")
    for name in sorted(set(published) - set(template)):
        differences.append(f"{name}: in the published store, not in the template")
    for name in sorted(set(template) & set(published)):
        expected, found = _structure(template[name], append_dim), _structure(published[name], append_dim)
        for field in ("dims", "dtype", "shape", "chunks", "shards"):
            if expected[field] != found[field]:
                differences.append(f"{name}: {field} template {expected[field]} != published {found[field]}")
    return differences


def check_no_drift(tmp_store: Path, final_store: ObjectStore, append_dim: str) -> None:
    published_root = final_store.get("zarr.json")
    if published_root is None:
        return
    differences = structure_differences((tmp_store / "zarr.json").read_bytes(), published_root, append_dim)
    if differences:
        listed = "\n  ".join(differences)
        raise StructureDriftError(
            f"the template's structure differs from the store published at {final_store.url}:\n  {listed}\n"
            "An update only appends to the published structure. A structure change needs a backfill into a "
            "new dataset version (bump dataset_version, backfill the new store, then switch readers)."
        )
