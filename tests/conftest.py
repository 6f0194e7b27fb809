"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNEUMONIA = SHARED_DATA / "pneumoniamnist.npz"


@pytest.fixture
def pneumonia_path() -> Path:
    if not PNEUMONIA.is_file():
        pytest.skip(
            f"real data not found at ../shared/data/{PNEUMONIA.name} (needs ../shared beside the repo)"
        )
    return PNEUMONIA


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's task identity, which building a Message outside a running node needs."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
