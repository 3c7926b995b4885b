"""`SourceFileResults`: a task's source files and their statuses, compact, read like a list."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest

from reformatters.pipeline.source_results import BLOCK, SourceFileResults
from reformatters.region_job import ForecastSourceFileCoord, SourceFileStatus


def coords(n: int) -> list[ForecastSourceFileCoord]:
    init = pd.Timestamp("2024-01-01")
    return [
        ForecastSourceFileCoord(source_url="http://example", init_time=init, lead_time=pd.Timedelta(hours=h))
        for h in range(n)
    ]


@pytest.mark.parametrize("n", [0, 1, BLOCK, 3 * BLOCK + 5])
def test_reads_as_the_list_it_was_made_of(n: int) -> None:
    plain = coords(n)
    results = SourceFileResults(plain)
    assert len(results) == n and list(results) == plain and results == plain
    if n:
        assert results[-1] == plain[-1] and results[n // 2] == plain[n // 2]
        assert results[1:4] == plain[1:4]
    with pytest.raises(IndexError):
        results[n]


def test_records_statuses_in_any_order_and_keeps_them_through_pickling_and_copies() -> None:
    plain = coords(3 * BLOCK + 5)
    results = SourceFileResults(plain)
    fresh = results.fresh()
    expected = list(plain)
    for index in [*range(0, len(plain), 7), 2 * BLOCK + 1, 5]:  # across blocks, back and forth
        failed = plain[index].with_status(SourceFileStatus.DownloadFailed, f"gone {index}", not_found=True)
        fresh.record(index, failed)
        expected[index] = failed
    fresh.record(1, plain[1].with_status(SourceFileStatus.Succeeded))
    expected[1] = plain[1].with_status(SourceFileStatus.Succeeded)
    assert list(fresh) == expected
    assert list(results) == plain, "the copy's records changed the original"
    restored = pickle.loads(pickle.dumps(fresh))
    assert list(restored) == expected
    assert restored[7].status_reason == "gone 7" and restored[7].not_found
    kept = restored.where(lambda c: c.status == SourceFileStatus.DownloadFailed)
    assert list(kept) == [c for c in expected if c.status == SourceFileStatus.DownloadFailed]


def test_takes_a_fraction_of_the_objects_memory() -> None:
    plain = coords(31 * 181)
    results = SourceFileResults(plain)
    assert results.nbytes < 40 * len(plain), results.nbytes / len(plain)  # the objects: ~1 KB each
    assert len(pickle.dumps(results)) < len(pickle.dumps(plain)) / 2
