"""What a run did: files ok/failed per variable, bytes, elapsed. Printed for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from reformatters.pipeline.kernels import VariableResult
from reformatters.region_job import SourceFileCoord, SourceFileStatus


class VariableSummary(BaseModel):
    files_ok: int = 0
    files_not_published_yet: int = 0  # not at the source and not due by `now` (`RegionJob.source_file_due`)
    files_not_found: int = 0  # due but not at the source: NaN, counted apart from failures
    files_download_failed: int = 0
    files_read_failed: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    objects_written: int = 0
    decodes: int = 0  # messages handed to the decoder: files_ok + files_read_failed when each is decoded once
    scratch_bytes: int = 0  # the largest worker-local scratch one variable-region used (scratch path only)
    peak_rss_anon_bytes: int = 0  # the highest anonymous memory a scratch task's worker held (scratch path only)
    rss_anon_growth_bytes: int = 0  # the most a scratch task's worker grew in anonymous memory while it ran
    # The highest resident mapped-file memory (RssFile + RssShmem) of a scratch task's worker: the scratch file's
    # pages, which Dask's memory monitor counts as the worker's (`pipeline.scratch.MappedPagesRelease` bounds it).
    peak_rss_mapped_bytes: int = 0
    rss_mapped_growth_bytes: int = 0  # the most a scratch task's worker grew in mapped-file memory while it ran
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
    # A run whose failed files exceed this fraction of the files due exits non-zero (after publishing).
    max_failed_fraction: float = 0.05

    MAX_FAILURES_LISTED: int = 20

    def add(self, results: Iterable[VariableResult], due: Callable[[SourceFileCoord], bool] | None = None) -> None:
        """Count `results`; `due` tells a file not found that should exist by now from one not published yet
        (without it, every file is due)."""
        for result in results:
            entry = self.variables.setdefault(result.var_name, VariableSummary())
            entry.files_ok += result.count(SourceFileStatus.Succeeded)
            not_found = sum(1 for coord in result.results if coord.not_found)
            not_yet = sum(1 for coord in result.results if coord.not_found and due is not None and not due(coord))
            entry.files_not_published_yet += not_yet
            entry.files_not_found += not_found - not_yet
            entry.files_download_failed += result.count(SourceFileStatus.DownloadFailed) - not_found
            entry.files_read_failed += result.count(SourceFileStatus.ReadFailed)
            entry.bytes_fetched += result.bytes_fetched
            entry.bytes_written += result.bytes_written
            entry.objects_written += result.objects_written
            entry.decodes += result.decodes
            for name in (
                "scratch_bytes",
                "peak_rss_anon_bytes",
                "rss_anon_growth_bytes",
                "peak_rss_mapped_bytes",
                "rss_mapped_growth_bytes",
            ):
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
    def files_not_published_yet(self) -> int:
        return sum(v.files_not_published_yet for v in self.variables.values())

    @property
    def files_due(self) -> int:
        return self.files_ok + self.files_not_found + self.files_failed

    @property
    def failed_fraction(self) -> float:
        return self.files_failed / self.files_due if self.files_due else 0.0

    @property
    def too_many_failures(self) -> bool:
        return self.failed_fraction > self.max_failed_fraction

    def failures(self, limit: int = 5) -> list[str]:
        """The first failed files (URL: reason), at most `limit`."""
        return [line for entry in self.variables.values() for line in entry.failures][:limit]

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
            "files_not_published_yet": self.files_not_published_yet,
            "files_not_found": self.files_not_found,
            "files_failed": self.files_failed,
            "files_due": self.files_due,
            "failed_fraction": self.failed_fraction,
            "too_many_failures": self.too_many_failures,
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
            f"{self.files_ok} file-variables ok, {self.files_not_published_yet} not published yet, "
            f"{self.files_not_found} due but not found at the source, "
            f"{self.files_failed} failed ({self.failed_fraction:.1%} of {self.files_due} due), "
            f"{self.bytes_fetched / 1e6:.1f} MB fetched, {self.bytes_written / 1e6:.1f} MB written, "
            f"{self.elapsed_seconds:.1f} s"
            + (f", published to {self.published_append_dim_end}" if self.published_append_dim_end else "")
        ]
        width = max((len(n) for n in self.variables), default=8)
        for name, entry in sorted(self.variables.items()):
            lines.append(
                f"  {name:<{width}}  ok {entry.files_ok:>6}  not published yet {entry.files_not_published_yet:>6}  "
                f"not found {entry.files_not_found:>6}  "
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
