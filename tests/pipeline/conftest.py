from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ct_chest_lung1.nii.gz").exists():
        pytest.skip(f"real scans not found in {SHARED_DATA} (see shared/data/SOURCES.md)")
    return SHARED_DATA
