"""The backfill benchmark's machinery, run tiny in the default suite; the full run is marked `benchmark`.

No wall-clock limits here: the smoke run checks that every number the benchmark reports is there and sane.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from benchmarks.backfill import MODES, RunResult, main

TINY_ARGS = ["--sizes", "1,2", "--leads", "0,1", "--variables", "temperature_2m", "--bound-fields", "2"]
DERIVED_KEYS = {
    "marginal_seconds_per_init",
    "fixed_seconds",
    "marginal_fields_per_second",
    "marginal_var_regions_per_second",
    "marginal_output_mb_per_second",
}


def run_cli(tmp_path: Path, args: list[str]) -> dict[str, Any]:
    report_path = tmp_path / "report.json"
    assert main([*args, "--workdir", str(tmp_path / "work"), "--json", str(report_path)]) == 0
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def check_report(report: dict[str, Any], sizes: tuple[int, ...], fields_per_init: int) -> None:
    assert report["machine"]["cores"] >= 1 and report["machine"]["memory_gib"] > 0
    bound = report["bound"]
    assert 0 < bound["seconds_per_field_one_core"] < 10
    assert bound["fields_per_second"] == pytest.approx(bound["cores"] / bound["seconds_per_field_one_core"])
    samples = bound["samples_seconds_per_field"]
    assert len(samples) == len(MODES) + 1, "measured before the runs and after each mode's"
    assert bound["seconds_per_field_one_core"] == pytest.approx(sum(samples) / len(samples))
    # Each mode is judged against the measurements just before and after its runs.
    assert list(report["bound_by_mode"]) == list(MODES)
    for i, mode in enumerate(MODES):
        around = report["bound_by_mode"][mode]
        assert around["samples_seconds_per_field"] == samples[i : i + 2], mode
        assert report["derived"][mode]["bound_ms_per_field"] == pytest.approx(
            1000 * around["seconds_per_field_one_core"]
        )
    order = [r["mode"] for r in report["runs"]]
    assert order == sorted(order, key=list(MODES).index), "each mode's sizes run back to back"

    runs = report["runs"]
    assert {(r["mode"], r["size"]) for r in runs} == {(m, s) for m in MODES for s in sizes}
    expected_fields = {f.name for f in fields(RunResult)} | {"peak_rss_max"}
    for run in runs:
        assert set(run) == expected_fields, run["mode"]
        size = run["size"]
        assert run["wall_seconds"] > 0
        assert len(run["wall_seconds_all"]) == report["config"]["repeat"]
        assert run["wall_seconds"] == min(run["wall_seconds_all"])
        assert run["fields"] == size * fields_per_init
        assert run["var_regions"] == size * len(report["config"]["variables"])
        assert run["bytes_written"] > 0
        assert run["server_cpu_seconds"] >= 0
        assert run["archive_bytes"] > 0 and run["requests_served"] > 0
        assert run["peak_rss_per_worker"] and all(rss > 20e6 for rss in run["peak_rss_per_worker"].values())
        assert run["peak_rss_max"] == max(run["peak_rss_per_worker"].values())
        if run["mode"] == "naive":
            # Whole files travel.
            assert run["bytes_fetched"] == run["archive_bytes"] == run["bytes_served"]
        else:
            # Only the wanted messages (plus the inventories) travel; the rest of each file stays put.
            assert 0 < run["bytes_fetched"] <= run["bytes_served"] < run["archive_bytes"]
            assert run["files_ok"] == run["fields"]
            assert run["tasks"] > 0 and run["mean_task_seconds"] > 0
            kinds = {k.split("_")[0] for k in run["tasks_by_kind"]}
            assert {"download", "encode", "upload"} <= kinds
            # Only the read-tasks shape decodes in tasks of its own; the default decodes inside the shard write.
            assert ("read" in kinds) == (run["mode"] == "read-tasks"), run["mode"]
            assert run["worker_cpu_seconds"] > run["worker_system_seconds"] >= 0
            assert run["driver_cpu_seconds"] > 0
            assert run["worker_threads"] >= 2
            assert run["cluster_ready_seconds"] is not None and 0 < run["cluster_ready_seconds"] < run["wall_seconds"]

    derived = report["derived"]
    # Marginal throughput is (work added) / (seconds added): undefined (NaN) when the larger run was not slower,
    # which a tiny run on a busy machine may see. Every number is finite exactly when its runs allow it.
    slower = {mode: _larger_run_slower(runs, mode) for mode in MODES}
    for mode in MODES:
        assert set(derived[mode]) >= DERIVED_KEYS, mode
        assert math.isfinite(derived[mode]["fixed_seconds"]), mode
        for key in DERIVED_KEYS - {"fixed_seconds", "marginal_seconds_per_init"}:
            assert math.isfinite(derived[mode][key]) == slower[mode], (mode, key)
        cpu = derived[mode]["marginal_cpu_ms_per_field"]
        assert set(cpu) == {"workers", "driver", "server"} and all(math.isfinite(v) for v in cpu.values()), mode
        if sum(cpu.values()) > 0:
            assert derived[mode]["cpu_efficiency_vs_bound"] == pytest.approx(
                report["bound_by_mode"][mode]["seconds_per_field_one_core"] * 1000 / sum(cpu.values())
            )
        if mode != "naive":
            assert math.isfinite(derived[mode]["efficiency_vs_bound"]) == slower[mode], mode
            if slower[mode] and slower["naive"]:
                assert derived[mode]["speedup_over_naive"] > 0
    pipelined = derived["pipelined"]
    assert math.isfinite(pipelined["overlap_gain_over_staged"]) == (slower["pipelined"] and slower["staged"])
    goals = derived["goals"]
    for key in (
        "speedup_over_naive_ge_5",
        "efficiency_vs_bound_ge_0.7",
        "fixed_cost_lt_8s",
        "peak_rss_per_worker_le_1.5GB",
    ):
        assert isinstance(goals[key], bool), key
    assert set(goals["peak_rss_by_size"]) == {str(s) for s in sizes}


def _larger_run_slower(runs: list[dict[str, Any]], mode: str) -> bool:
    walls = [r["wall_seconds"] for r in sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["size"])]
    return walls[-1] > walls[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "1"], "at least two different"),
        (["--modes", "fast"], "unknown modes"),
        (["--leads", "0-x"], "give whole numbers and ranges"),
        (["--variables", "temperature_3m"], "choose GFS variables from"),
        (["--repeat", "0"], "at least once"),
        (["--dataset", "noaa-hrrr-forecast-48-hour", "--modes", "naive"], "unknown modes ['naive'] for HRRR"),
        (["--dataset", "noaa-hrrr-forecast-48-hour", "--variables", "wind_u_100m"], "choose HRRR variables from"),
    ],
)
def test_unusable_arguments_are_refused_before_any_work(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_smoke(tmp_path: Path) -> None:
    report = run_cli(tmp_path, TINY_ARGS)
    check_report(report, (1, 2), fields_per_init=2)  # temperature_2m at leads 0 and 1


@pytest.mark.benchmark
def test_backfill_benchmark_full(tmp_path: Path) -> None:
    """The full benchmark (about 10-15 minutes); prints the results table."""
    report = run_cli(tmp_path, [])
    check_report(report, (1, 3), fields_per_init=4 * 49 - 1)  # precipitation has no lead-0 field


@pytest.mark.benchmark
def test_driver_memory_benchmark(tmp_path: Path) -> None:
    """Driver peak RSS for 1,100 regions against 100 (a few minutes); prints the line and checks its parts."""
    from benchmarks.driver_memory import main as driver_memory

    report = tmp_path / "driver_memory.json"
    driver_memory(["--regions", "100,1100", "--json", str(report)])
    result = json.loads(report.read_text())
    assert [run["regions"] for run in result["runs"]] == [100, 1100]
    assert all(run["driver_peak_rss_mb"] > 50 for run in result["runs"])


@pytest.mark.benchmark
def test_gefs_scratch_benchmark(tmp_path: Path) -> None:
    """The GEFS scratch benchmark at 1 and 2 members, two leads (about 2 minutes): every number is reported, each
    field decoded once, the bound measured around each run."""
    from benchmarks.gefs_scratch import main as gefs_scratch

    report = tmp_path / "gefs_scratch.json"
    gefs_scratch(["--members", "1,2", "--leads", "0,3", "--json", str(report)])
    result = json.loads(report.read_text())
    assert [run["members"] for run in result["runs"]] == [1, 2]
    assert len(result["bounds"]) == 3
    for run in result["runs"]:
        assert run["fields_read"] == run["members"] * 2 * 2 and run["decodes_per_field"] == 1.0
        assert run["peak_rss_anon_mb"] > run["rss_anon_growth_mb"] > 0
        assert run["scratch_mb_per_worker"] > 0 and run["vs_bound"] > 0 and math.isfinite(run["vs_bound"])
    derived = result["derived"]
    assert {"marginal_fields_per_second", "marginal_vs_bound", "peak_rss_anon_spread"} <= set(derived)


@pytest.mark.benchmark
def test_gefs_analysis_benchmark(tmp_path: Path) -> None:
    """The GEFS analysis benchmark with 8 steps of data in one full-shape variable-region (about a minute): every
    number is reported, each variable-region took the scratch path."""
    from benchmarks.gefs_analysis import main as gefs_analysis

    report = tmp_path / "gefs_analysis.json"
    gefs_analysis(["--steps", "8", "--json", str(report)])
    result = json.loads(report.read_text())
    assert result["region_steps"] == 2880 and result["region_gb_shard_padded"] > 12
    assert [row["variable"] for row in result["variables"]] == ["temperature_2m", "precipitation_surface"]
    for row in result["variables"]:
        assert row["fields_read"] >= 8 and row["files_not_found"] > 2800
        assert row["peak_rss_anon_mb"] > row["rss_anon_growth_mb"] > 0
        assert row["peak_rss_mapped_mb"] > 0 and row["scratch_mb"] > 0
    assert result["wall_seconds"] > 0
