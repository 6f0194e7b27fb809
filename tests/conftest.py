"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNEUMONIA = SHARED_DATA / "pneumoniamnist.npz"


@pytest.fixture
def pneumonia_path() -> Path:
    if not PNEUMONIA.is_file():
        pytest.skip(
            f"real data not found at ../shared/data/{PNEUMONIA.name} (needs ../shared beside the repo)"
        )
    return PNEUMONIA
