"""Live progress for long runs: regions and files done, failures so far, the Dask dashboard."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from distributed import Client
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from reformatters.region_job import SourceFileStatus


class RunProgress:
    def __init__(self, title: str, regions_total: int, client: Client | None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.files_ok = 0
        self.files_not_found = 0
        self.files_failed = 0
        self.console = Console(stderr=True)
        self.title = title
        self.started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("regions · {task.fields[files]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not enabled,
        )
        self._task = self._progress.add_task(title, total=regions_total, files=self._files())
        if enabled and client is not None:
            link = client.dashboard_link
            self.console.print(f"{title}: {regions_total} regions; Dask dashboard {link}", markup=False)

    def __enter__(self) -> RunProgress:
        if self.enabled and sys.stderr.isatty():
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress.live.is_started:  # stopping a display never started still prints an empty line
            self._progress.stop()

    def _files(self) -> str:
        return f"{self.files_ok} files ok, {self.files_not_found} not found, {self.files_failed} failed"

    def region_done(self, outcome: Any) -> None:
        for result in outcome.results:
            not_found = sum(1 for coord in result.results if coord.not_found)
            self.files_ok += result.count(SourceFileStatus.Succeeded)
            self.files_not_found += not_found
            self.files_failed += (
                result.count(SourceFileStatus.DownloadFailed) + result.count(SourceFileStatus.ReadFailed) - not_found
            )
        files = self._files()
        self._progress.update(self._task, advance=1, files=files)
        if self.enabled and not sys.stderr.isatty():
            done = int(self._progress.tasks[0].completed)
            total = int(self._progress.tasks[0].total or 0)
            elapsed = time.perf_counter() - self.started
            self.console.print(
                f"{self.title}: region {done}/{total} done ({outcome.job.describe()}), {files}, {elapsed:.1f} s",
                soft_wrap=True,
                markup=False,  # region descriptions hold [variable, ...] lists
            )
