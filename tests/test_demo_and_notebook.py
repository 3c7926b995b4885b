"""The README's demo command end to end, then the exploration notebook executed against its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import xarray as xr
from nbclient import NotebookClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "explore_gfs_forecast.ipynb"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    completed = subprocess.run(
        [sys.executable, "-m", "reformatters.cli", "demo", "--preset", "small", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=PROJECT_ROOT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    store = workdir / "noaa-gfs-forecast.zarr"
    assert f"dataset: {store.absolute()}" in completed.stdout
    assert "ingested_forecast_length per init_time" in completed.stdout
    assert "backfill of noaa-gfs-forecast" in completed.stderr
    return store


def test_demo_publishes_backfill_and_update(demo_store: Path) -> None:
    ds = xr.open_zarr(demo_store, decode_timedelta=True)
    # Three runs: two backfilled, the newest appended by the update.
    assert ds.sizes["init_time"] == 3
    assert (ds["ingested_forecast_length"].values.astype("timedelta64[h]").astype(int) == 3).all()
    newest_analysis = ds["temperature_2m"].isel(init_time=-1, lead_time=0).values
    assert (newest_analysis == newest_analysis).all()  # no NaN in the newest run's analysis


def test_notebook_runs_against_the_demo_store(demo_store: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["REFORMATTERS_DEMO_STORE"] = str(demo_store)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(PROJECT_ROOT)}}
        ).execute()
    finally:
        os.environ.pop("REFORMATTERS_DEMO_STORE", None)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the map, the time series and the coverage plot"
