"""Shared stores for the update tests: one generated source, a backfill of its first three inits, and an
uninterrupted update of that backfill up to the newest init (the reference every interrupted run must equal)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

INITS = pd.date_range("2024-01-01T00:00", periods=7, freq="6h")
BASE_END = INITS[3]  # backfill [INITS[0], INITS[3]): three inits, the last shard half full
NOW = INITS[-1]  # the update appends INITS[3..6]
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class UpdateFixture:
    source: Path
    base_store: Path
    reference_store: Path


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def store_objects(store: Path) -> dict[str, bytes]:
    """Every object of a store, the internal area and temporary files aside."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and not str(p.relative_to(store)).startswith("_internal") and ".tmp-" not in p.name
    }


def assert_same_store(actual: Path, expected: Path) -> None:
    got, want = store_objects(actual), store_objects(expected)
    assert sorted(got) == sorted(want), f"objects differ: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    different = [key for key in want if got[key] != want[key]]
    assert not different, f"objects with different bytes: {different}"


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFORMATTERS_TEST_")}
    env.update(extra or {})
    return env


def update_command(store: Path | str, source: Path, now: pd.Timestamp = NOW) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reformatters.cli",
        "-v",
        "update",
        "example",
        "--store",
        str(store),
        "--source-url",
        str(source),
        "--now",
        now.isoformat(),
        "--workers",
        "2",
    ]


def run_cli(
    args: list[str], env: Mapping[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def update_fixture(tmp_path_factory: pytest.TempPathFactory) -> UpdateFixture:
    from reformatters_datasets.example import source
    from reformatters_datasets.example.dataset import ExampleDataset

    root = tmp_path_factory.mktemp("update")
    src = source.generate_source(root / "source", INITS)
    dataset = ExampleDataset()
    base = root / "base.zarr"
    dataset.backfill(
        BASE_END, cluster="local", store_url=str(base), source_url=str(src), n_workers=2, show_progress=False
    )
    reference = copy_store(base, root / "reference.zarr")
    dataset.update(
        cluster="local", store_url=str(reference), source_url=str(src), now=NOW, n_workers=2, show_progress=False
    )
    return UpdateFixture(source=src, base_store=base, reference_store=reference)
