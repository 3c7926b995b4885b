from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
FIXTURES = SHARED / "fixtures"
NOAA_IDX = FIXTURES / "noaa-idx"
ECMWF = FIXTURES / "ecmwf"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}; CI keeps shared/ beside the checkout")
    return FIXTURES


from collections.abc import Iterator  # noqa: E402
from datetime import datetime  # noqa: E402

from reformatters.testing.archive_server import ArchiveServer  # noqa: E402
from reformatters.testing.noaa_archive import COARSE_GRID, ArchiveManifest, generate_gfs_archive  # noqa: E402

INIT = datetime(2025, 8, 1, 0)


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveManifest:
    """1° GFS-layout archive, one init, leads 0 and 7, all catalogue variables, 3 fillers per wanted message."""
    return generate_gfs_archive(
        [INIT], [0, 7], grid=COARSE_GRID, filler_ratio=3.0, cache_dir=tmp_path_factory.mktemp("archives")
    )


@pytest.fixture
def server(small_archive: ArchiveManifest) -> Iterator[ArchiveServer]:
    with ArchiveServer(small_archive.root) as s:
        yield s
