from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
FIXTURES = SHARED / "fixtures"
NOAA_IDX = FIXTURES / "noaa-idx"
ECMWF = FIXTURES / "ecmwf"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not found at {FIXTURES}; CI keeps shared/ beside the checkout"
        )
    return FIXTURES
