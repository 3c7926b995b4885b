"""The README's demo command end to end, then the exploration notebook executed against its output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import xarray as xr
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from reformatters.demo import PRESETS
from reformatters.registry import get_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "explore_gfs_forecast.ipynb"
README_NOTEBOOK_COMMAND = (
    "nbconvert --to notebook --execute notebooks/explore_gfs_forecast.ipynb --output explored.ipynb"
)


def _run_demo(preset: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "reformatters.cli", "demo", "--preset", preset, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=PROJECT_ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    store = workdir / "noaa-gfs-forecast.zarr"
    assert f"dataset: {store.absolute()}" in completed.stdout
    assert "ingested_forecast_length per init_time" in completed.stdout
    assert "backfill of noaa-gfs-forecast" in completed.stderr
    assert f"validation of noaa-gfs-forecast at {store.absolute()}: passed" in completed.stderr
    # Progress and the summaries, not a line per missing file.
    assert len(completed.stderr.splitlines()) < 200, completed.stderr[-5000:]
    return completed


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    _run_demo("small", workdir)
    return workdir / "noaa-gfs-forecast.zarr"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_demo_archive_holds_every_lead_of_the_dataset_up_to_its_last(preset: str) -> None:
    leads = get_dataset("noaa-gfs-forecast").template_config.dimension_coordinates()["lead_time"]
    dataset_hours = [int(lead.total_seconds() // 3600) for lead in leads]
    archive_hours = list(PRESETS[preset].lead_hours)
    # A gap would leave positions the validation expects filled empty, and accumulations undeaccumulable.
    assert archive_hours == [hour for hour in dataset_hours if hour <= max(archive_hours)]


@pytest.mark.slow
def test_default_demo_passes_its_own_validation(tmp_path: Path) -> None:
    completed = _run_demo("default", tmp_path)
    assert "ingested leads have data" in completed.stderr
    assert "1 days 00:00:00" in completed.stdout  # ingested_forecast_length: the archive's 24 h


def test_demo_publishes_backfill_and_update(demo_store: Path) -> None:
    ds = xr.open_zarr(demo_store, decode_timedelta=True)
    # Three runs: two backfilled, the newest appended by the update.
    assert ds.sizes["init_time"] == 3
    assert (ds["ingested_forecast_length"].values.astype("timedelta64[h]").astype(int) == 3).all()
    newest_analysis = ds["temperature_2m"].isel(init_time=-1, lead_time=0).values
    assert (newest_analysis == newest_analysis).all()  # no NaN in the newest run's analysis


def test_the_readme_gives_the_notebook_command() -> None:
    assert f"jupyter {README_NOTEBOOK_COMMAND}" in (PROJECT_ROOT / "README.md").read_text()


def test_notebook_runs_with_the_readme_command_from_a_checkout(demo_store: Path, tmp_path: Path) -> None:
    # A checkout with the demo's output where `reformatters demo` puts it; no REFORMATTERS_DEMO_STORE.
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "data" / "demo").mkdir(parents=True)
    (checkout / "data" / "demo" / "noaa-gfs-forecast.zarr").symlink_to(demo_store)
    shutil.copy(NOTEBOOK, checkout / "notebooks")
    environment = {k: v for k, v in os.environ.items() if k != "REFORMATTERS_DEMO_STORE"}
    # The README's command; nbconvert runs the kernel in the notebook's own directory, notebooks/.
    completed = subprocess.run(
        [sys.executable, "-m", "jupyter", *README_NOTEBOOK_COMMAND.split()],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=checkout,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    notebook = nbformat.read(checkout / "notebooks" / "explored.ipynb", as_version=4)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert str(checkout / "data" / "demo" / "noaa-gfs-forecast.zarr") in printed
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the map, the time series and the coverage plot"


def test_notebook_without_a_store_says_how_to_get_one(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    environment_had = os.environ.pop("REFORMATTERS_DEMO_STORE", None)
    try:
        with pytest.raises(CellExecutionError, match=r"run `reformatters demo` from the repository root first"):
            NotebookClient(
                notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
            ).execute()
    finally:
        if environment_had is not None:
            os.environ["REFORMATTERS_DEMO_STORE"] = environment_had
