"""The one publisher: how a backfill or an update changes a store that readers may already use.

1. Take the lease (`PublisherLease`): one publisher at a time. A backfill waits for it (`--lease-wait`); an update
   stops at once. Taking it is also the run's first write, so a store that cannot be written fails there.
2. Chunk data goes first (the region graphs' upload tasks: whole shard objects, published fields kept where the
   run has none, unchanged objects left alone).
3. Regions are published in append order: coordinates are merged with what is published (`merge_with_published`),
   the append dimension never gets shorter, and only the metadata objects whose bytes change are written:
   coordinate chunks and per-array `zarr.json` first, the root `zarr.json` (consolidated metadata, what readers
   open by default) last. That last single-object write is the commit.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from reformatters.common.icechunk_store import IcechunkStore, take_forks
from reformatters.common.storage import ObjectStore
from reformatters.region_job import RegionJob, SourceFileCoord
from reformatters.replicas import REPLICAS_WRITTEN, ReplicaTarget, chunk_keys, publish_on_replica
from reformatters.template_config import with_template_encodings, write_metadata
from reformatters.update.drift import check_no_drift
from reformatters.update.lease import LeaseHeldError, UpdateLease, UpdateRefusedError
from reformatters.update.pause import pause_at

log = logging.getLogger("reformatters.publish")

ROOT_METADATA_KEY = "zarr.json"
DEFAULT_LEASE_WAIT_SECONDS = 300.0

# The lease is the publisher's, whichever kind of run holds it.
PublisherLease = UpdateLease


class RunCannotStartError(RuntimeError):
    """The run stops before writing anything: the message says what was expected, what was found, what to do."""


class StoreNotWritableError(RunCannotStartError):
    pass


class SourceOutageError(UpdateRefusedError):
    """Publishing the results would shorten the published dataset."""


# ---- metadata from a tmp store ----
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


def publish_metadata(template_ds: xr.Dataset, final_store: ObjectStore) -> list[str]:
    """Write `template_ds`'s metadata (root `zarr.json` last); returns the keys whose bytes changed."""
    with tmp_metadata_store(template_ds) as tmp_store:
        return publish_from_tmp_store(tmp_store, final_store)


def publish_from_tmp_store(tmp_store: Path, final_store: ObjectStore) -> list[str]:
    """Copy the metadata objects of `tmp_store` whose bytes differ into `final_store`, root `zarr.json` last."""
    contents = {key: (tmp_store / key).read_bytes() for key in metadata_keys(tmp_store)}
    changed = [key for key, data in contents.items() if final_store.get(key) != data]
    for key in changed:
        if key == ROOT_METADATA_KEY:
            pause_at("mid_publish")
        final_store.put(key, contents[key])
    return changed


# ---- the lease ----
@contextmanager
def hold_lease(
    store: ObjectStore, *, wait_seconds: float = 0.0, ttl_seconds: float | None = None
) -> Iterator[UpdateLease]:
    """The publisher's lease on `store` for the duration of the block; waits up to `wait_seconds` for another
    publisher to finish. A store that cannot be written fails here, before anything else is written."""
    deadline = time.monotonic() + wait_seconds
    waited = False
    while True:
        lease = PublisherLease(store.control_store(), ttl_seconds=ttl_seconds)
        try:
            lease.__enter__()
            break
        except LeaseHeldError as error:
            left = deadline - time.monotonic()
            if left <= 0:
                if waited:
                    raise LeaseHeldError(
                        f"{error} Waited {wait_seconds:.0f} s for it (--lease-wait); run again later or wait longer."
                    ) from None
                raise
            if not waited:
                log.warning("another publisher holds the lease on %s; waiting up to %.0f s", store.url, left)
            waited = True
            time.sleep(min(2.0, left))
        except OSError as error:
            raise StoreNotWritableError(
                f"cannot write to the store {store.url} ({type(error).__name__}: {error}); nothing was written. "
                "Check the path or URL, its permissions and the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."
            ) from None
    try:
        if isinstance(store, IcechunkStore):
            try:
                store.begin_writing()
            except Exception as error:  # noqa: BLE001 - icechunk raises its own error types for storage failures
                raise StoreNotWritableError(
                    f"cannot open or create the Icechunk repository {store.url} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); nothing was committed. Check the path or "
                    "URL, its permissions and the credentials (AWS_*)."
                ) from None
        yield lease
    finally:
        lease.__exit__(None, None, None)


# ---- coordinates ----
def merge_with_published(
    updated: xr.Dataset,
    template_ds: xr.Dataset,
    published: xr.Dataset | None,
    append_dim: str,
    covered_by_all: np.ndarray[Any, np.dtype[np.bool_]],
) -> xr.Dataset:
    """What to publish: the append dimension as long as the longer of `updated` (the run's
    `update_template_with_results`) and `published`, no longer than `template_ds`; each non-index coordinate
    along it taken from the run where it covered every variable (or the store has no value yet) and from the
    published store everywhere else."""
    published_length = 0 if published is None else int(published.sizes[append_dim])
    run_length = int(updated.sizes[append_dim])
    length = max(run_length, published_length)
    if length > template_ds.sizes[append_dim]:
        raise ValueError(f"the template ends before the {length} {append_dim} positions to publish")
    merged = template_ds.isel({append_dim: slice(0, length)})
    positions = np.arange(length)
    covered = np.zeros(length, dtype=bool)
    covered[: min(length, len(covered_by_all))] = covered_by_all[:length]
    from_run = (positions < run_length) & (covered | (positions >= published_length))
    from_published = (positions < published_length) & ~from_run
    overrides = {}
    for name, coord in merged.coords.items():
        if name == append_dim or append_dim not in coord.dims:
            continue
        values = np.array(coord.values, copy=True)
        axis = coord.dims.index(append_dim)
        moved = np.moveaxis(values, axis, 0)  # a view: writes land in `values`
        if name in updated.coords and from_run.any():
            moved[from_run] = np.moveaxis(np.asarray(updated[name].values), axis, 0)[from_run[:run_length]]
        if published is not None and name in published.coords and from_published.any():
            source = np.moveaxis(np.asarray(published[name].values), axis, 0)
            moved[from_published] = source[from_published[:published_length]].astype(values.dtype)
        overrides[name] = (coord.dims, values)
    result = merged.assign_coords(overrides)
    for name in overrides:
        result[name].attrs = dict(template_ds[name].attrs)
    return with_template_encodings(result, template_ds)


# ---- the publisher ----
@dataclass
class Publisher:
    """Publishes the results of one run into `final_store`, region by region in append order.

    `template_ds` must cover the published extent (see `publication_template`); `data_var_names` are every
    variable of the dataset (a position's derived coordinates are recomputed only where all of them ran).

    Results are folded as each region completes: `RegionJob.update_template_with_results` runs on that region's
    slice of the template with that region's results, and only what it returns is kept (the coordinates along the
    append dimension, per position, and how far the results reach). The file outcomes themselves are dropped, so a
    backfill of millions of files holds a few numbers per position, not an object per file.
    """

    job_class: type[RegionJob[Any, Any]]
    template_ds: xr.Dataset
    append_dim: str
    final_store: ObjectStore
    lease: UpdateLease
    data_var_names: Sequence[str]
    published_ds: xr.Dataset | None
    refuse_shorter: bool = False  # an update fails instead of keeping the published extent
    published_length: int = 0
    replicas: Sequence[ReplicaTarget] = ()  # published before `final_store`, in this order

    def __post_init__(self) -> None:
        if self.published_ds is not None:
            self.published_length = int(self.published_ds.sizes[self.append_dim])
        self._ran = np.zeros((len(self.data_var_names), self.template_ds.sizes[self.append_dim]), dtype=bool)
        self._var_index = {name: i for i, name in enumerate(self.data_var_names)}
        # Per position along the append dimension: each derived coordinate as the run's results make it.
        self._coordinate_values = {
            str(name): np.array(coord.values, copy=True)
            for name, coord in self.template_ds.coords.items()
            if name != self.append_dim and self.append_dim in coord.dims
        }
        self._run_length = 0  # positions up to the last one the results filled
        self._pending: dict[tuple[int, int], dict[str, list[SourceFileCoord]]] = {}
        # Per replica, variable and position: shards the next publication copies there from the final store.
        self._to_copy = {target.replica.name: np.zeros_like(self._ran) for target in self.replicas}

    def add(
        self,
        region: slice,
        results: Mapping[str, Sequence[SourceFileCoord]],
        *,
        complete: bool = True,
        on_replicas: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """The results of a region job (its variables' file outcomes): all its variables are uploaded, and
        `on_replicas` names, per variable, the replicas its upload tasks wrote too (`replicas_written`); the
        publication copies it to every other replica.

        A region whose jobs finish one by one (variable groups, variables resumed from an earlier run) is added
        with `complete=False` until its last job: the hook then sees the whole region's results at once.
        """
        pending = self._pending.setdefault((region.start, region.stop), {})
        written = on_replicas or {}
        for name, coords in results.items():
            pending.setdefault(name, []).extend(coords)
            self._ran[self._var_index[name], region] = True
            for replica, to_copy in self._to_copy.items():
                if replica not in written.get(name, ()):
                    to_copy[self._var_index[name], region] = True
        if complete:
            self.complete(region)

    def pending_regions(self) -> list[tuple[int, int]]:
        """The (start, stop) of each region added but not complete yet."""
        return list(self._pending)

    def complete(self, region: slice) -> None:
        """Fold the region's results into per-position coordinates and drop them."""
        results = self._pending.pop((region.start, region.stop), None)
        if results is None:
            return
        region_template = self.template_ds.isel({self.append_dim: region})
        updated = self.job_class.update_template_with_results(region_template, self.append_dim, results)
        length = int(updated.sizes[self.append_dim])
        if length == 0:
            return
        self._run_length = max(self._run_length, region.start + length)
        filled = slice(region.start, region.start + length)
        for name, values in self._coordinate_values.items():
            if name in updated.coords:
                axis = self.template_ds[name].dims.index(self.append_dim)
                np.moveaxis(values, axis, 0)[filled] = np.moveaxis(np.asarray(updated[name].values), axis, 0)

    def merged(self) -> tuple[xr.Dataset, int]:
        """What publishing now would publish, and the length the run's own results reach."""
        for region in list(self._pending):
            self.complete(slice(*region))
        run_length = self._run_length
        trimmed = self.template_ds.isel({self.append_dim: slice(0, run_length)})
        updated = trimmed.assign_coords(
            {
                name: (
                    self.template_ds[name].dims,
                    np.take(values, np.arange(run_length), axis=self.template_ds[name].dims.index(self.append_dim)),
                )
                for name, values in self._coordinate_values.items()
            }
        )
        covered_by_all = np.asarray(self._ran.all(axis=0), dtype=bool)
        merged = merge_with_published(updated, self.template_ds, self.published_ds, self.append_dim, covered_by_all)
        return merged, run_length

    def publish(self, what: str) -> xr.Dataset:
        """Publish everything added so far; `what` names it in logs and errors."""
        merged, run_length = self.merged()
        if self.refuse_shorter and run_length < self.published_length:
            raise SourceOutageError(
                f"{what}: the results end at {self.append_dim} position {run_length} but {self.published_length} "
                "positions are published. Publishing would shorten the dataset, so nothing was published and the "
                "published data is unchanged. The source is probably missing files it had before; re-run the "
                "update once it is back."
            )
        new_length = int(merged.sizes[self.append_dim])
        with tmp_metadata_store(merged) as tmp_store:
            contents = {key: (tmp_store / key).read_bytes() for key in metadata_keys(tmp_store)}
        if self.replicas:
            self._publish_on_replicas(what, contents)
        changed = [key for key, data in contents.items() if self.final_store.get(key) != data]
        if isinstance(self.final_store, IcechunkStore):
            return self._commit_icechunk(what, merged, contents, changed)
        if not changed:
            log.info("%s: nothing new to publish (metadata unchanged)", what)
            return merged
        self.lease.verify()
        pause_at("before_publish")
        for key in changed:
            if key == ROOT_METADATA_KEY:
                pause_at("mid_publish")
                self.lease.commit(self.final_store, key, contents[key])  # fenced, recorded in _internal/
            else:
                self.lease.check_fence()
                self.final_store.put(key, contents[key])
        log.info(
            "published %s: %s %d -> %d positions (to %s), %d metadata objects changed",
            what,
            self.append_dim,
            self.published_length,
            new_length,
            _last_label(merged, self.append_dim),
            len(changed),
        )
        self.published_length = new_length
        return merged

    def _publish_on_replicas(self, what: str, contents: Mapping[str, bytes]) -> None:
        """Every replica gets the shards of the regions added since the last publication that the workers did not
        write there, copied from the final store, and `contents` published, before the final store is touched."""
        pause_at("before_replicas")
        for target in self.replicas:
            to_copy = self._to_copy[target.replica.name]
            publish_on_replica(target, self.final_store, contents, self._shard_keys(to_copy, contents), what)
            to_copy[:] = False
        pause_at("replicas_published")

    def _shard_keys(self, positions_of: np.ndarray, contents: Mapping[str, bytes]) -> list[str]:
        """The shard objects holding the (variable, position) pairs set in `positions_of`."""
        shard_keys = []
        for name, index in self._var_index.items():
            positions = np.flatnonzero(positions_of[index])
            if not len(positions):
                continue
            metadata = json.loads(contents[f"{name}/zarr.json"])
            shard = metadata["chunk_grid"]["configuration"]["chunk_shape"][
                metadata["dimension_names"].index(self.append_dim)
            ]
            for first in np.unique(positions // shard) * shard:
                shard_keys.extend(chunk_keys(name, metadata, (self.append_dim, int(first), int(first) + shard)))
        return shard_keys

    def _commit_icechunk(
        self, what: str, merged: xr.Dataset, contents: Mapping[str, bytes], changed: Sequence[str]
    ) -> xr.Dataset:
        """An Icechunk store publishes in one commit on `main`: the region's merged forks (chunk data) and its
        changed metadata, refused if another writer committed since this run read or last committed."""
        store = self.final_store
        assert isinstance(store, IcechunkStore)
        if not changed and not store.has_uncommitted_changes:
            log.info("%s: nothing new to publish (no chunk or metadata change)", what)
            return merged
        self.lease.verify()
        pause_at("before_publish")
        for key in icechunk_order(changed):
            store.put(key, contents[key])
        pause_at("mid_publish")
        self.lease.verify()
        generation = self.lease.generation
        snapshot = store.commit(
            f"publish {what}", metadata={"holder": self.lease.owner, "generation": generation, "run": what}
        )
        self.lease.record_commit(store.url, snapshot)
        new_length = int(merged.sizes[self.append_dim])
        log.info(
            "published %s: commit %s on main, %s %d -> %d positions (to %s), %d metadata objects changed",
            what,
            snapshot,
            self.append_dim,
            self.published_length,
            new_length,
            _last_label(merged, self.append_dim),
            len(changed),
        )
        self.published_length = new_length
        return merged

    def absorb_forks(self, results: Sequence[Any]) -> list[Any]:
        """Merge the Icechunk forks `results` carry into the pending commit; the results without them."""
        forks, plain = take_forks(results)
        if forks:
            assert isinstance(self.final_store, IcechunkStore)
            self.final_store.merge(forks)
        return plain


def replicas_written(results: Sequence[Any]) -> dict[str, set[str]]:
    """Per variable, the replicas every one of its `VariableResult`s was written to by this run's upload tasks; a
    result resumed from an earlier run counts for none (that run's replicas may not be this one's)."""
    written: dict[str, set[str]] = {}
    for result in results:
        names = set() if "resumed_from_run" in result.extra else set(result.extra.get(REPLICAS_WRITTEN, ()))
        written[result.var_name] = written[result.var_name] & names if result.var_name in written else names
    return written


def icechunk_order(keys: Sequence[str]) -> list[str]:
    """Metadata before chunks: Icechunk takes a chunk only for an array its session already has."""
    return sorted(keys, key=lambda key: (not key.endswith("zarr.json"), key.count("/"), key))


def commit_icechunk_structure(store: ObjectStore, template_ds: xr.Dataset, append_dim: str, lease: UpdateLease) -> None:
    """A new Icechunk repository gets the dataset's structure first, with no positions along `append_dim`, in a
    commit of its own: the arrays then exist in the snapshot the workers' forks start from, so every region's fork
    writes into the same arrays and each region is one commit on top."""
    if not isinstance(store, IcechunkStore) or store.exists(ROOT_METADATA_KEY):
        return
    lease.verify()
    with tmp_metadata_store(template_ds.isel({append_dim: slice(0, 0)})) as tmp_store:
        for key in icechunk_order(metadata_keys(tmp_store)):
            store.put(key, (tmp_store / key).read_bytes())
    snapshot = store.commit("create the dataset's structure (no positions yet)", metadata={"holder": lease.owner})
    lease.record_commit(store.url, snapshot)


def region_span(job: RegionJob[Any, Any]) -> tuple[int, int]:
    """A region job's (start, stop) along the append dimension: the key its region's jobs share."""
    return (job.region.start, job.region.stop)


def published_dataset(final_store: ObjectStore) -> xr.Dataset | None:
    """The published dataset, read lazily without dask: the run's cluster may be shutting down while the publisher
    reads it, and dask would send those reads there."""
    return final_store.open_dataset(chunks=None) if final_store.exists(ROOT_METADATA_KEY) else None


def publication_template(config: Any, append_dim_end: pd.Timestamp, published: xr.Dataset | None) -> xr.Dataset:
    """The template up to `append_dim_end`, or up to the published end if that is later (a backfill that ends
    before the published end must not cut the straddling shard or the published coordinates)."""
    append_dim = config.append_dim
    if published is not None and published.sizes[append_dim] > 0:
        published_end = pd.Timestamp(published.get_index(append_dim)[-1]) + config.append_dim_frequency
        if published_end > append_dim_end:
            return config.get_template(published_end)  # type: ignore[no-any-return]
    return config.get_template(append_dim_end)  # type: ignore[no-any-return]


def check_publishable(tmp_store: Path, final_store: ObjectStore, append_dim: str) -> None:
    """Refuse to write into a published store of another structure (the drift guard)."""
    check_no_drift(tmp_store, final_store, append_dim)


def _last_label(ds: xr.Dataset, append_dim: str) -> str | None:
    index = ds.get_index(append_dim)
    return None if len(index) == 0 else pd.Timestamp(index[-1]).isoformat()
