"""`ecmwf-ifs-ens-forecast-15-day-0-25-degree`: template, region job and storage brought together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from reformatters.deploy.models import (
    BackfillSizing,
    ContainerResources,
    CronJobSpec,
    OperationalResources,
)
from reformatters.dynamical_dataset import DynamicalDataset
from reformatters.validation import CurrentData, ExpectedShards, RecentNaNsPerMember, Validator

from .region_job import EcmwfIfsEnsRegionJob
from .template_config import ecmwf_ifs_ens_template_config

# ECMWF publishes the 00z ensemble to 360 h in open data within about 8-9 h of init (ECMWF's dissemination
# schedule plus the open-data delay); the daily update at 09:30 UTC appends it, and re-ingests the newest init
# while any member is shorter than 360 h (the control, from `oper` since 50r1, may arrive after `enfo`).
MAX_PUBLICATION_DELAY = pd.Timedelta(hours=11)

# Variable-regions (85 leads x 51 members x 721 x 1440 float32: 18 GB, 26.6 GB padded to whole shards) take the
# scratch path like GEFS's: a worker holds a bounded window of fields (benchmarks/ecmwf_scratch.py measures peak
# anonymous memory per worker against the member count) while the region lives on the pod's scratch volume beside
# the shards it encodes.
OPERATIONAL_RESOURCES = OperationalResources(
    update=CronJobSpec(
        schedule="30 9 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=20 * 3600,
        backoff_limit=1,
        workers=1,
        resources=ContainerResources.of("2", "8Gi", "32Gi", "48Gi"),
        scratch_size_limit="44Gi",
    ),
    validation=CronJobSpec(
        schedule="30 11 * * *",
        starting_deadline_seconds=3600,
        active_deadline_seconds=3600,
        resources=ContainerResources.of("1", "4Gi", "256Mi", "1Gi"),
        scratch_size_limit="512Mi",
    ),
    backfill=BackfillSizing(
        workers=8,
        dask_memory_limit="6GiB",
        resources=ContainerResources.of("2", "8Gi", "32Gi", "48Gi"),
        scratch_size_limit="44Gi",
    ),
)


class EcmwfIfsEnsForecast15DayDataset(DynamicalDataset[EcmwfIfsEnsRegionJob]):
    description = "ECMWF IFS ENS 51-member ensemble forecast, 0-360 h, 0.25 degree (ECMWF open data)."

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("template_config", ecmwf_ifs_ens_template_config())
        kwargs.setdefault("region_job_class", EcmwfIfsEnsRegionJob)
        super().__init__(**kwargs)

    def validators(self) -> Sequence[Validator]:
        return (
            CurrentData(max_delay=MAX_PUBLICATION_DELAY),
            RecentNaNsPerMember(threshold=0.05, positions=2, label="ingested leads have data per member"),
            ExpectedShards(positions=2),
        )

    def operational_resources(self) -> OperationalResources:
        return OPERATIONAL_RESOURCES
