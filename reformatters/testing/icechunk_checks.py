"""Checks that an Icechunk store holds what the plain-Zarr store of the same run holds."""

from __future__ import annotations

from reformatters.common.storage import ObjectStore


def zarr_keys(store: ObjectStore) -> list[str]:
    """The store's Zarr objects (metadata and chunks), its internal area aside."""
    return [key for key in store.list() if not key.startswith("_internal/")]


def differences_from_plain(icechunk_store: ObjectStore, plain_store: ObjectStore) -> list[str]:
    """Every difference between the objects of `main`'s tip and the plain store's: keys on one side only, and
    keys whose bytes differ (each array's `zarr.json`, coordinate chunks, shard objects). Empty when equal."""
    plain, icechunk = zarr_keys(plain_store), zarr_keys(icechunk_store)
    found = [f"only in the plain store: {key}" for key in sorted(set(plain) - set(icechunk))]
    found += [f"only in the Icechunk store: {key}" for key in sorted(set(icechunk) - set(plain))]
    found += [
        f"different bytes: {key}"
        for key in sorted(set(plain) & set(icechunk))
        if plain_store.get(key) != icechunk_store.get(key)
    ]
    return found
