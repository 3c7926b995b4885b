"""Checks of a published noaa-gefs-forecast-35-day store beyond the framework's generic ones."""

from __future__ import annotations

import numpy as np
import xarray as xr
from pydantic import Field

from reformatters.validation import CheckResult, ValidationContext, Validator


class RecentNaNsPerMember(Validator):
    """NaN fraction, on sampled points of the newest inits, over the leads each (init, member) has ingested,
    judged per member: one member's missing files cannot hide among thirty good ones.

    Leads beyond a member's `ingested_forecast_length` are not due yet; windowed variables (precipitation,
    radiation, cloud cover, categorical types) have no value at lead 0 by construction.
    """

    threshold: float = Field(0.05, ge=0.0, le=1.0)
    positions: int = Field(2, ge=1)
    sample: int = Field(64, ge=1)
    seed: int = 0

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"recent NaNs per member (newest {self.positions}, threshold {self.threshold:.0%})"
        recent = context.ds.isel({context.append_dim: slice(-self.positions, None)})
        ingested = recent["ingested_forecast_length"].values  # (init, member)
        if np.isnat(ingested).all():
            return CheckResult(name, False, "no init and member in the newest positions records an ingested length")
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
            windowed = array.attrs.get("step_type", "instant") != "instant"
            values = array.isel(picks).values  # (init, member, lead, sample)
            with np.errstate(invalid="ignore"):
                due = lead[None, None, :] <= ingested[:, :, None]
            if windowed:
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
