"""Checks of a published ecmwf-ifs-ens-forecast-15-day-0-25-degree store beyond the framework's generic ones."""

from __future__ import annotations

import numpy as np
import xarray as xr
from pydantic import Field

from reformatters.validation import CheckResult, ValidationContext, Validator


class IngestedLeadsHaveDataPerMember(Validator):
    """NaN fraction, on sampled points of the newest inits, over the leads each init has ingested, judged per
    member: the control (from another file than the perturbed members since IFS cycle 50r1) cannot hide among fifty.

    Leads beyond an init's `ingested_forecast_length` are not due; accumulated variables (published as rates since
    the previous lead) have no value at lead 0 by construction.
    """

    threshold: float = Field(0.05, ge=0.0, le=1.0)
    positions: int = Field(2, ge=1)
    sample: int = Field(64, ge=1)
    seed: int = 0

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"ingested leads have data per member (newest {self.positions}, threshold {self.threshold:.0%})"
        recent = context.ds.isel({context.append_dim: slice(-self.positions, None)})
        ingested = recent["ingested_forecast_length"].values  # (init,)
        if np.isnat(ingested).all():
            return CheckResult(name, False, "no init in the newest positions records an ingested length")
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
            values = array.isel(picks).transpose("init_time", "lead_time", "ensemble_member", "sample").values
            with np.errstate(invalid="ignore"):
                due = lead[None, :] <= ingested[:, None]  # (init, lead)
            if array.attrs.get("step_type", "instant") != "instant":
                due &= lead[None, :] > np.timedelta64(0, "s")
            for m, member in enumerate(members):
                selected = values[:, :, m][due]
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
