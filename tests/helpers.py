"""Assertions and fixtures' building blocks shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict

from fedshift.common.data import Dataset, make_synthetic_cxr, save_npz


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, no traceback anywhere in stderr, and exactly one error line naming the problem."""
    assert code == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], err


def write_site(root: Path, n: int = 90) -> Path:
    """A small SYNTHETIC site at ``root/site-0`` (train n-30, val 15, test 15), as simulation lays it out."""
    pooled = make_synthetic_cxr(n, seed=1).split("train")
    idx = np.arange(n)
    splits = {
        "train": pooled.subset(idx[: n - 30]),
        "val": pooled.subset(idx[n - 30 : n - 15]),
        "test": pooled.subset(idx[n - 15 :]),
    }
    site_dir = root / "site-0"
    save_npz(site_dir / "data.npz", Dataset(splits, ("normal", "lesion"), "synthetic-cxr", True))
    return site_dir


def call_client_app(app: Any, msg: Message, run_config: dict[str, Any]) -> Message:
    """Call a ClientApp in process as simulated node 0 (partition 0) of run 1."""
    context = Context(
        run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config
    )
    return app(msg, context)  # type: ignore[no-any-return]
