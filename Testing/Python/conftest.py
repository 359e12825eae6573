"""Shared fixtures: the real data beside the repository, and small synthetic volumes."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (BTCV, CHAOS T2, TotalSegmentator examples); CI always has it."""
    if not (SHARED_DATA / "btcv" / "dataset.json").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}: clone the repository beside shared/")
    return SHARED_DATA
