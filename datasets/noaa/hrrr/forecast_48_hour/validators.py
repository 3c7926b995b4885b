"""Checks of a published noaa-hrrr-forecast-48-hour store beyond the framework's generic ones."""

from __future__ import annotations

import numpy as np
import xarray as xr
from pydantic import Field

from reformatters.validation import CheckResult, ValidationContext, Validator

from .template_config import DATA_VARS


class IngestedLeadsHaveData(Validator):
    """NaN fraction, on sampled grid points of the newest runs, over the lead times each run has ingested.

    A run is ingested up to `ingested_forecast_length`; leads beyond it are not due yet. Precipitation (a rate
    over the hour before each lead) has no value at lead 0 by construction.
    """

    threshold: float = Field(0.05, ge=0.0, le=1.0)
    positions: int = Field(2, ge=1)
    sample: int = Field(256, ge=1)
    seed: int = 0
    # Cloud ceiling is undefined (bitmap-missing at the source) wherever the sky has no ceiling: NaN is its data.
    exempt: tuple[str, ...] = ("geopotential_height_cloud_ceiling",)

    def check(self, context: ValidationContext) -> CheckResult:
        name = f"ingested leads have data (newest {self.positions}, threshold {self.threshold:.0%})"
        recent = context.ds.isel({context.append_dim: slice(-self.positions, None)})
        ingested = recent["ingested_forecast_length"].values
        if np.isnat(ingested).all():
            return CheckResult(name, False, "no run in the newest positions records an ingested forecast length")
        rng = np.random.default_rng(self.seed)
        picks = {
            dim: xr.DataArray(rng.integers(0, recent.sizes[dim], self.sample), dims="sample") for dim in ("y", "x")
        }
        lead = recent["lead_time"].values
        fractions: dict[str, float] = {}
        for var in DATA_VARS:
            if var.name not in recent or var.name in self.exempt:
                continue
            first_lead = 0 if var.internal_attrs.window == "instant" else 1
            due = (lead[None, :] <= ingested[:, None]) & (np.arange(len(lead))[None, :] >= first_lead)
            values = recent[var.name].isel(picks).values  # (init, lead, sample)
            selected = values[due]
            if selected.size:
                fractions[var.name] = float(np.isnan(selected).mean())
        over = {k: v for k, v in fractions.items() if v > self.threshold}
        if over:
            worst = ", ".join(f"{k} {v:.1%}" for k, v in sorted(over.items(), key=lambda kv: -kv[1]))
            return CheckResult(
                name,
                False,
                f"expected at most {self.threshold:.0%} NaN within the ingested lead times, found {worst}; "
                "the update's summary lists the files that failed",
            )
        return CheckResult(name, True, f"{len(fractions)} variables, worst {max(fractions.values(), default=0):.1%}")
