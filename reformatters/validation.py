"""`reformatters validate DATASET_ID`: checks of a published store, declared per dataset.

Each validator looks at the store as readers see it (consolidated metadata) and returns one result.
Datasets declare theirs in `DynamicalDataset.validators()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import Field, field_validator

from reformatters.common.config_models import FrozenModel
from reformatters.common.storage import ObjectStore
from reformatters.common.time_utils import utc_now
from reformatters.replicas import Replica, chunk_keys
from reformatters.update.drift import consolidated_arrays


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str


@dataclass
class ValidationReport:
    dataset_id: str
    store: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def lines(self) -> list[str]:
        """One line per check, failures first; the last line says the overall outcome."""
        ordered = sorted(self.results, key=lambda r: r.ok)
        lines = [f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.message}" for r in ordered]
        failed = sum(1 for r in self.results if not r.ok)
        verdict = "passed" if self.ok else f"FAILED ({failed} of {len(self.results)} checks)"
        lines.append(f"validation of {self.dataset_id} at {self.store}: {verdict}")
        return lines


@dataclass(frozen=True)
class ValidationContext:
    ds: xr.Dataset
    store: ObjectStore
    now: pd.Timestamp
    append_dim: str
    append_dim_start: pd.Timestamp
    append_dim_frequency: pd.Timedelta


class Validator(FrozenModel):
    def check(self, context: ValidationContext) -> CheckResult:
        raise NotImplementedError(f"{type(self).__name__} must implement check()")


class CurrentData(Validator):
    """The newest position due `max_delay` after its label is published and holds some data."""

    max_delay: pd.Timedelta

    @field_validator("max_delay", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> pd.Timedelta:
        return pd.Timedelta(value)

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"current data (max delay {self.max_delay})"
        steps = (context.now - self.max_delay - context.append_dim_start) // context.append_dim_frequency
        due = context.append_dim_start + context.append_dim_frequency * max(int(steps), 0)
        index = context.ds.get_index(context.append_dim)
        if len(index) == 0:
            return CheckResult(name, False, f"expected {context.append_dim} up to {due}, found an empty dataset")
        newest = index[-1]
        if newest < due:
            return CheckResult(
                name,
                False,
                f"expected {context.append_dim} {due} to be published by {context.now}, newest is {newest}; "
                "check the update CronJob's logs and the source",
            )
        empty = [
            str(var)
            for var in context.ds.data_vars
            if context.append_dim in context.ds[var].dims
            and bool(context.ds[var].sel({context.append_dim: due}).isnull().all())
        ]
        if empty:
            return CheckResult(name, False, f"{context.append_dim} {due} is published but all NaN in {empty}")
        return CheckResult(name, True, f"{context.append_dim} {due} is published (newest {newest})")


class RecentNaNs(Validator):
    """The NaN fraction over the newest `positions` positions, on `sample` points, stays under `threshold`."""

    threshold: float = Field(ge=0.0, le=1.0)
    positions: int = Field(1, ge=1)
    sample: int = Field(512, ge=1)
    seed: int = 0

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"recent NaNs (newest {self.positions}, threshold {self.threshold:.0%})"
        recent = context.ds.isel({context.append_dim: slice(-self.positions, None)})
        rng = np.random.default_rng(self.seed)
        fractions: dict[str, float] = {}
        for var in recent.data_vars:
            array = recent[var]
            if context.append_dim not in array.dims:
                continue
            other = [d for d in array.dims if d != context.append_dim]
            picks = {d: xr.DataArray(rng.integers(0, array.sizes[d], self.sample), dims="sample") for d in other}
            values = array.isel(picks).values
            fractions[str(var)] = float(np.isnan(values).mean()) if values.size else 1.0
        over = {k: v for k, v in fractions.items() if v > self.threshold}
        listed = ", ".join(f"{k} {v:.1%}" for k, v in sorted(fractions.items()))
        if over:
            worst = ", ".join(f"{k} {v:.1%}" for k, v in sorted(over.items()))
            return CheckResult(
                name, False, f"expected at most {self.threshold:.0%} NaN, found {worst}; look for failed files"
            )
        return CheckResult(name, True, listed or "no variables")


class ExpectedShards(Validator):
    """Every shard object of the newest `positions` positions exists (region writes persist all-NaN shards)."""

    positions: int = Field(1, ge=1)

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"expected shards (newest {self.positions})"
        arrays = consolidated_arrays(context.store.get("zarr.json") or b"{}")
        missing: list[str] = []
        checked = 0
        for var in context.ds.data_vars:
            meta = arrays.get(str(var), {})
            dims = meta.get("dimension_names") or []
            if context.append_dim not in dims:
                continue
            length = meta["shape"][dims.index(context.append_dim)]
            span = (context.append_dim, max(length - self.positions, 0), length)
            present = set(context.store.list(f"{var}/c/"))
            for key in chunk_keys(str(var), meta, span):
                checked += 1
                if key not in present:
                    missing.append(key)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            return CheckResult(
                name, False, f"expected {checked} shard objects, {len(missing)} missing: {shown}; re-run the update"
            )
        return CheckResult(name, True, f"all {checked} shard objects present")


class ReplicaMatchesPrimary(Validator):
    """A replica publishes what the primary does: the same extent and coordinates, and equal values in `sample`
    chunks (Zarr inner chunks) per variable, seeded, one of them in the newest position along the append dimension.
    `run_validation` adds one for each replica of the run."""

    replica: Replica
    sample: int = Field(20, ge=1)
    seed: int = 0

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"replica {self.replica.name} matches primary"
        store = self.replica.store()
        store.check_access()
        if not store.exists("zarr.json"):
            return CheckResult(
                name,
                False,
                f"expected a published dataset at {store.url}, found no zarr.json; the next backfill or update "
                "with this replica catches it up",
            )
        primary, replica = context.ds, store.open_dataset(chunks=None)
        sizes, replica_sizes = dict(primary.sizes), dict(replica.sizes)
        if sizes != replica_sizes:
            return CheckResult(
                name, False, f"expected the primary's extent {sizes} at {store.url}, found {replica_sizes}"
            )
        for coord in primary.coords:
            if coord not in replica.coords:
                return CheckResult(name, False, f"coordinate {coord} is missing at {store.url}")
            where = _first_difference(primary[coord], replica[coord])
            if where is not None:
                return CheckResult(name, False, f"coordinate {coord} differs at {where}")
        rng = np.random.default_rng(self.seed)
        checked = 0
        for var in primary.data_vars:
            if var not in replica.data_vars:
                return CheckResult(name, False, f"variable {var} is missing at {store.url}")
            array = primary[var]
            for region in _sampled_chunks(array, context.append_dim, self.sample, rng):
                where = _first_difference(array.isel(region), replica[var].isel(region))
                checked += 1
                if where is not None:
                    return CheckResult(
                        name,
                        False,
                        f"variable {var} differs at {where}: the replica at {store.url} drifted from the primary; "
                        "re-run the backfill of that region with this replica (or rebuild the replica)",
                    )
        return CheckResult(name, True, f"same extent and coordinates, {checked} sampled chunks equal at {store.url}")


def _sampled_chunks(
    array: xr.DataArray, append_dim: str, sample: int, rng: np.random.Generator
) -> list[dict[Any, slice]]:
    """`sample` distinct chunks of `array` (the first one in the newest position along `append_dim`)."""
    chunks = array.encoding.get("chunks") or array.shape
    grid = [-(-n // c) for n, c in zip(array.shape, chunks, strict=True)]
    if not all(grid):
        return []
    picks: list[tuple[int, ...]] = []
    newest = tuple(
        g - 1 if dim == append_dim else int(rng.integers(g)) for dim, g in zip(array.dims, grid, strict=True)
    )
    picks.append(newest)
    total = int(np.prod(grid))
    while len(picks) < min(sample, total):
        pick = tuple(int(rng.integers(g)) for g in grid)
        if pick not in picks:
            picks.append(pick)
    return [
        {dim: slice(i * c, (i + 1) * c) for dim, i, c in zip(array.dims, pick, chunks, strict=True)} for pick in picks
    ]


def _first_difference(expected: xr.DataArray, found: xr.DataArray) -> str | None:
    """Where two arrays first differ (NaN equal to NaN), by coordinate labels, or None when equal."""
    a, b = np.asarray(expected.values), np.asarray(found.values)
    if a.shape != b.shape:
        return f"shape {b.shape} instead of {a.shape}"
    same = a == b
    if a.dtype.kind in "fcmM":
        same |= pd.isna(a) & pd.isna(b)
    if bool(np.all(same)):
        return None
    position = np.unravel_index(int(np.argmin(same)), a.shape) if a.ndim else ()
    labels = []
    for dim, i in zip(expected.dims, position, strict=True):
        label = expected[dim].values[i] if dim in expected.coords else i
        if isinstance(label, np.datetime64):
            label = pd.Timestamp(label).isoformat()
        elif isinstance(label, np.timedelta64):
            label = str(pd.Timedelta(label))
        labels.append(f"{dim}={label}")
    return f"{', '.join(labels) or 'the scalar'} (primary {a[position].item()}, replica {b[position].item()})"


def run_validation(
    dataset: Any,
    *,
    store_url: str | None = None,
    now: pd.Timestamp | None = None,
    replica_names: Sequence[str] | None = None,
) -> ValidationReport:
    store: ObjectStore = dataset.store(store_url)
    store.check_access()
    config = dataset.template_config
    report = ValidationReport(dataset_id=dataset.dataset_id, store=store.url)
    if not store.exists("zarr.json"):
        report.results.append(
            CheckResult("store", False, f"expected a published dataset at {store.url}, found no zarr.json")
        )
        return report
    context = ValidationContext(
        ds=store.open_dataset(),
        store=store,
        now=now if now is not None else utc_now(),
        append_dim=config.append_dim,
        append_dim_start=config.append_dim_start,
        append_dim_frequency=config.append_dim_frequency,
    )
    replicas = dataset.selected_replicas(replica_names)
    validators: Sequence[Validator] = [
        *dataset.validators(),
        *(ReplicaMatchesPrimary(replica=replica) for replica in replicas),
    ]
    for validator in validators:
        try:
            report.results.append(validator.check(context))
        except Exception as error:  # noqa: BLE001 - a broken check is a failed check, not a crash
            report.results.append(CheckResult(type(validator).__name__, False, f"{type(error).__name__}: {error}"))
    return report


class RecentNaNsPerMember(Validator):
    """NaN fraction, on sampled points of the newest inits, over the leads each init (or each init and member) has
    ingested, judged per member of an ensemble: one member's missing files cannot hide among the others (ECMWF's
    control, read from another file since IFS cycle 50r1, among fifty; a GEFS member among thirty).

    `ingested_forecast_length` may be per init or per (init, member). Leads beyond it are not due yet; windowed
    variables (`step_type` other than instant: accumulations, averages) have no value at lead 0 by construction.
    """

    threshold: float = Field(0.05, ge=0.0, le=1.0)
    positions: int = Field(2, ge=1)
    sample: int = Field(64, ge=1)
    seed: int = 0
    label: str = "recent NaNs per member"

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"{self.label} (newest {self.positions}, threshold {self.threshold:.0%})"
        recent = context.ds.isel({context.append_dim: slice(-self.positions, None)})
        ingested_coord = recent["ingested_forecast_length"]
        if "ensemble_member" not in ingested_coord.dims:
            ingested_coord = ingested_coord.expand_dims(ensemble_member=recent["ensemble_member"].values, axis=1)
        ingested = ingested_coord.transpose(context.append_dim, "ensemble_member").values  # (init, member)
        if np.isnat(ingested).all():
            return CheckResult(name, False, "no init (or member) in the newest positions records an ingested length")
        rng = np.random.default_rng(self.seed)
        picks = {
            dim: xr.DataArray(rng.integers(0, recent.sizes[dim], self.sample), dims="sample")
            for dim in ("latitude", "longitude")
        }
        lead = recent["lead_time"].values
        members = recent["ensemble_member"].values
        worst: dict[str, tuple[float, int]] = {}
        for var_name in recent.data_vars:
            array = recent[var_name]
            if "ensemble_member" not in array.dims:
                continue
            values = array.isel(picks).transpose(context.append_dim, "ensemble_member", "lead_time", "sample").values
            with np.errstate(invalid="ignore"):
                due = lead[None, None, :] <= ingested[:, :, None]  # (init, member, lead)
            if array.attrs.get("step_type", "instant") != "instant":
                due &= lead[None, None, :] > np.timedelta64(0, "s")
            for m, member in enumerate(members):
                selected = values[:, m][due[:, m]]
                if selected.size:
                    fraction = float(np.isnan(selected).mean())
                    if fraction > worst.get(str(var_name), (-1.0, 0))[0]:
                        worst[str(var_name)] = (fraction, int(member))
        over = {k: v for k, v in worst.items() if v[0] > self.threshold}
        if over:
            listed = ", ".join(
                f"{k} {f:.1%} (member {m})" for k, (f, m) in sorted(over.items(), key=lambda kv: -kv[1][0])
            )
            return CheckResult(
                name,
                False,
                f"expected at most {self.threshold:.0%} NaN per member within the ingested leads, found {listed}; "
                "the update's summary lists the files that failed",
            )
        top = max(worst.values(), default=(0.0, 0))
        return CheckResult(name, True, f"{len(worst)} variables, worst {top[0]:.1%} (member {top[1]})")
