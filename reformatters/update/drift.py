"""Refuse to publish into a store whose structure differs from the template (design invariant 5).

Structure is everything a reader's decoding depends on: variables, dims, dtypes, chunks, shards, fill values,
the codecs of the chunks and of the shard index, and each array's attributes.
"""

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


def describe_codecs(codecs: list[dict[str, Any]] | None) -> str:
    """`bytes(endian=little), blosc(cname=zstd, ...), crc32c`: a codec chain as a reader of a message wants it."""
    parts = []
    for codec in codecs or []:
        config = codec.get("configuration") or {}
        settings = ", ".join(f"{key}={value}" for key, value in sorted(config.items()))
        parts.append(f"{codec.get('name')}({settings})" if settings else str(codec.get("name")))
    return ", ".join(parts) or "none"


def _structure(meta: dict[str, Any], append_dim: str) -> dict[str, Any]:
    dims = list(meta.get("dimension_names") or [])
    shape = [None if d == append_dim else n for d, n in zip(dims, meta.get("shape", []), strict=False)]
    outer = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    codecs = list(meta.get("codecs", []))
    sharding = next((c for c in codecs if c.get("name") == "sharding_indexed"), None)
    if sharding is not None:
        config = sharding["configuration"]
        chunks, shards = config["chunk_shape"], outer
        inner = [c for c in codecs if c is not sharding] + list(config.get("codecs", []))
        index = f"{describe_codecs(config.get('index_codecs'))} at the {config.get('index_location', 'end')}"
    else:
        chunks, shards, inner, index = outer, None, codecs, "none (unsharded)"
    return {
        "dims": dims,
        "dtype": meta.get("data_type"),
        "shape": shape,
        "chunks": chunks,
        "shards": shards,
        "fill_value": meta.get("fill_value"),
        "codecs": describe_codecs(inner),
        "index codecs": index,
        "attributes": meta.get("attributes") or {},
    }


def _attribute_differences(name: str, expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    return [
        f"{name}: attribute {key!r} template {expected.get(key, '(absent)')!r} != published "
        f"{found.get(key, '(absent)')!r}"
        for key in sorted(set(expected) | set(found))
        if expected.get(key) != found.get(key)
    ]


def structure_differences(template_root: bytes, published_root: bytes, append_dim: str) -> list[str]:
    """Each difference in variables, dims, dtypes, shapes (the append dim's length aside), chunks, shards, fill
    values, codecs (inner and index) and attributes of every array."""
    template = consolidated_arrays(template_root)
    published = consolidated_arrays(published_root)
    differences = []
    for name in sorted(set(template) - set(published)):
        differences.append(f"{name}: in the template, not in the published store")
    for name in sorted(set(published) - set(template)):
        differences.append(f"{name}: in the published store, not in the template")
    for name in sorted(set(template) & set(published)):
        expected, found = _structure(template[name], append_dim), _structure(published[name], append_dim)
        for field in ("dims", "dtype", "shape", "chunks", "shards", "fill_value", "codecs", "index codecs"):
            if expected[field] != found[field]:
                differences.append(f"{name}: {field} template {expected[field]} != published {found[field]}")
        differences.extend(_attribute_differences(name, expected["attributes"], found["attributes"]))
    return differences


def check_no_drift(tmp_store: Path, final_store: ObjectStore, append_dim: str) -> None:
    published_root = final_store.get("zarr.json")
    if published_root is None:
        return
    differences = structure_differences((tmp_store / "zarr.json").read_bytes(), published_root, append_dim)
    if differences:
        listed = "; ".join(differences)
        raise StructureDriftError(
            f"the template's structure differs from the store published at {final_store.url}: {listed}. "
            "An update or a backfill into a published store only writes the published structure. A structure change "
            "needs a backfill into a new dataset version (bump dataset_version, backfill the new store, then switch "
            "readers)."
        )
