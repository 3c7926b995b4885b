"""What a run did: files ok/failed per variable, bytes, elapsed. Printed for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import SourceFileStatus


class VariableSummary(BaseModel):
    files_ok: int = 0
    files_not_found: int = 0  # not at the source (yet): normal for leads not published; NaN, not a failure
    files_download_failed: int = 0
    files_read_failed: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    objects_written: int = 0
    decodes: int = 0  # messages handed to the decoder: files_ok + files_read_failed when each is decoded once
    scratch_bytes: int = 0  # the largest worker-local scratch one variable-region used (scratch path only)
    peak_rss_anon_bytes: int = 0  # the highest anonymous memory a scratch task's worker held (scratch path only)
    rss_anon_growth_bytes: int = 0  # the most a scratch task's worker grew in anonymous memory while it ran
    failures: list[str] = Field(default_factory=list)

    @property
    def files_failed(self) -> int:
        return self.files_download_failed + self.files_read_failed


class RunSummary(BaseModel):
    dataset_id: str
    kind: str
    store: str
    regions_total: int = 0
    regions_done: int = 0
    elapsed_seconds: float = 0.0
    published_append_dim_end: str | None = None
    variables: dict[str, VariableSummary] = Field(default_factory=dict)

    MAX_FAILURES_LISTED: int = 20

    def add(self, results: Iterable[VariableResult]) -> None:
        for result in results:
            entry = self.variables.setdefault(result.var_name, VariableSummary())
            entry.files_ok += result.count(SourceFileStatus.Succeeded)
            not_found = sum(1 for coord in result.results if coord.not_found)
            entry.files_not_found += not_found
            entry.files_download_failed += result.count(SourceFileStatus.DownloadFailed) - not_found
            entry.files_read_failed += result.count(SourceFileStatus.ReadFailed)
            entry.bytes_fetched += result.bytes_fetched
            entry.bytes_written += result.bytes_written
            entry.objects_written += result.objects_written
            entry.decodes += result.decodes
            for name in ("scratch_bytes", "peak_rss_anon_bytes", "rss_anon_growth_bytes"):
                setattr(entry, name, max(getattr(entry, name), int(result.extra.get(name, 0))))
            for coord in result.results:
                failed = coord.status in (SourceFileStatus.DownloadFailed, SourceFileStatus.ReadFailed)
                if failed and not coord.not_found and len(entry.failures) < self.MAX_FAILURES_LISTED:
                    entry.failures.append(f"{coord.get_url()}: {coord.status_reason}")

    @property
    def files_ok(self) -> int:
        return sum(v.files_ok for v in self.variables.values())

    @property
    def files_not_found(self) -> int:
        return sum(v.files_not_found for v in self.variables.values())

    @property
    def files_failed(self) -> int:
        return sum(v.files_failed for v in self.variables.values())

    @property
    def bytes_fetched(self) -> int:
        return sum(v.bytes_fetched for v in self.variables.values())

    @property
    def bytes_written(self) -> int:
        return sum(v.bytes_written for v in self.variables.values())

    @property
    def decodes(self) -> int:
        return sum(v.decodes for v in self.variables.values())

    def to_json_dict(self) -> dict[str, object]:
        data = self.model_dump(exclude={"MAX_FAILURES_LISTED"})
        data["totals"] = {
            "files_ok": self.files_ok,
            "files_not_found": self.files_not_found,
            "files_failed": self.files_failed,
            "bytes_fetched": self.bytes_fetched,
            "bytes_written": self.bytes_written,
            "decodes": self.decodes,
        }
        return data

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json_dict(), indent=2, default=str) + "\n")

    def render_lines(self) -> list[str]:
        lines = [
            f"{self.kind} of {self.dataset_id} into {self.store}: {self.regions_done}/{self.regions_total} regions, "
            f"{self.files_ok} file-variables ok, {self.files_not_found} not found at the source, "
            f"{self.files_failed} failed, "
            f"{self.bytes_fetched / 1e6:.1f} MB fetched, {self.bytes_written / 1e6:.1f} MB written, "
            f"{self.elapsed_seconds:.1f} s"
            + (f", published to {self.published_append_dim_end}" if self.published_append_dim_end else "")
        ]
        width = max((len(n) for n in self.variables), default=8)
        for name, entry in sorted(self.variables.items()):
            lines.append(
                f"  {name:<{width}}  ok {entry.files_ok:>6}  not found {entry.files_not_found:>6}  "
                f"download failed {entry.files_download_failed:>5}  "
                f"read failed {entry.files_read_failed:>5}  fetched {entry.bytes_fetched / 1e6:>9.1f} MB  "
                f"written {entry.bytes_written / 1e6:>9.1f} MB  decodes {entry.decodes:>6}"
                + (
                    f"  scratch {entry.scratch_bytes / 1e6:.1f} MB, peak anon {entry.peak_rss_anon_bytes / 1e6:.1f} MB"
                    if entry.scratch_bytes
                    else ""
                )
            )
        return lines
