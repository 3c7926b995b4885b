"""What a dataset declares about how it runs on Kubernetes: its update and validate CronJobs, its backfill sizing."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from dask.utils import parse_bytes
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"m": Decimal("0.001"), "": Decimal(1), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9)}
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|m|k|M|G|)")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2", "6Gi", "1.5G") as a number of cores or bytes."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity; expected a number with an optional suffix such as 500m, 2, 6Gi"
        )
    number, suffix = Decimal(match.group(1)), match.group(2)
    return number * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantities(_Frozen):
    """CPU, memory and ephemeral storage of a container, as Kubernetes quantities."""

    cpu: str
    memory: str
    ephemeral_storage: str

    @field_validator("cpu", "memory", "ephemeral_storage")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        parse_quantity(value)
        return value

    def as_manifest(self) -> dict[str, str]:
        return {"cpu": self.cpu, "memory": self.memory, "ephemeral-storage": self.ephemeral_storage}


class ContainerResources(_Frozen):
    """Requests and limits. Memory requests equal limits: a node never overcommits the memory a run needs."""

    requests: Quantities
    limits: Quantities

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> ContainerResources:
        for field in ("cpu", "memory", "ephemeral_storage"):
            request, limit = getattr(self.requests, field), getattr(self.limits, field)
            if parse_quantity(limit) < parse_quantity(request):
                raise ValueError(f"{field} limit {limit} is below its request {request}; raise the limit")
        if parse_quantity(self.requests.memory) != parse_quantity(self.limits.memory):
            raise ValueError(
                f"memory request {self.requests.memory} differs from its limit {self.limits.memory}; "
                "set both to the same value"
            )
        return self

    @classmethod
    def of(cls, cpu: str, memory: str, storage_request: str, storage_limit: str) -> ContainerResources:
        """CPU and memory requested as much as their limits; ephemeral storage may grow from its request."""
        return cls(
            requests=Quantities(cpu=cpu, memory=memory, ephemeral_storage=storage_request),
            limits=Quantities(cpu=cpu, memory=memory, ephemeral_storage=storage_limit),
        )

    def as_manifest(self) -> dict[str, dict[str, str]]:
        return {"requests": self.requests.as_manifest(), "limits": self.limits.as_manifest()}


class CronJobSpec(_Frozen):
    """One CronJob of a dataset: when it runs, how long it may take, what its pod gets."""

    schedule: str = Field(description="Five-field cron schedule in time_zone.")
    time_zone: str = "Etc/UTC"
    starting_deadline_seconds: int = Field(gt=0, description="A run that could not start this late is skipped.")
    active_deadline_seconds: int = Field(gt=0, description="A run still going this long is stopped.")
    backoff_limit: int = Field(0, ge=0)
    concurrency_policy: Literal["Forbid"] = "Forbid"
    suspend: bool = False
    successful_jobs_history_limit: int = Field(3, ge=0)
    failed_jobs_history_limit: int = Field(5, ge=0)
    resources: ContainerResources
    scratch_size_limit: str = Field(description="sizeLimit of the emptyDir holding HOME, TMPDIR and Dask's files.")
    workers: int | None = Field(None, ge=1, description="LocalCluster workers (`--workers`) of an update pod.")

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"schedule {value!r} is not a five-field cron expression such as '38 5,11,17,23 * * *'")
        return value

    @field_validator("scratch_size_limit")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        parse_quantity(value)
        return value

    @model_validator(mode="after")
    def _scratch_fits(self) -> CronJobSpec:
        if parse_quantity(self.scratch_size_limit) > parse_quantity(self.resources.limits.ephemeral_storage):
            raise ValueError(
                f"scratch size limit {self.scratch_size_limit} exceeds the ephemeral-storage limit "
                f"{self.resources.limits.ephemeral_storage}; raise the limit or shrink the scratch volume"
            )
        return self


class BackfillSizing(_Frozen):
    """The DaskCluster workers of a `--cluster k8s` backfill (the scheduler's size is the same for every dataset)."""

    workers: int = Field(ge=1, description="Default worker count; `backfill --workers N` overrides it.")
    threads: int = Field(2, ge=1)
    dask_memory_limit: str = Field(
        description="`dask worker --memory-limit` (Dask's units: 3GiB): it spills and pauses below."
    )
    resources: ContainerResources
    scratch_size_limit: str

    @model_validator(mode="after")
    def _dask_pauses_before_the_kernel_kills(self) -> BackfillSizing:
        if Decimal(parse_bytes(self.dask_memory_limit)) >= parse_quantity(self.resources.limits.memory):
            raise ValueError(
                f"Dask memory limit {self.dask_memory_limit} must stay below the container's memory limit "
                f"{self.resources.limits.memory}, or the kernel kills the worker before Dask spills"
            )
        if parse_quantity(self.scratch_size_limit) > parse_quantity(self.resources.limits.ephemeral_storage):
            raise ValueError(
                f"scratch size limit {self.scratch_size_limit} exceeds the ephemeral-storage limit "
                f"{self.resources.limits.ephemeral_storage}; raise the limit or shrink the scratch volume"
            )
        return self


class MaintenanceSpec(CronJobSpec):
    """The `reformatters maintain` CronJob of a dataset published as an Icechunk repository."""

    older_than: str = Field("7d", description="`--older-than`: snapshots older than this are expired.")
    grace: str = Field("1d", description="`--grace`: unreferenced objects younger than this are kept.")


class OperationalResources(_Frozen):
    """Everything a dataset runs on Kubernetes; `DynamicalDataset.operational_resources()` returns it."""

    update: CronJobSpec
    validation: CronJobSpec
    backfill: BackfillSizing
    # Only for a dataset whose store (the ConfigMap's DATASET_ID-store) is an `.icechunk` repository.
    maintenance: MaintenanceSpec | None = None

    @model_validator(mode="after")
    def _update_has_workers(self) -> OperationalResources:
        if self.update.workers is None:
            raise ValueError("the update CronJob needs `workers` (its LocalCluster's worker count)")
        return self
