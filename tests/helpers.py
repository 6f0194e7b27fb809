"""Assertions and fixtures' building blocks shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
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


def write_site(root: Path, n: int = 90, n_val: int = 15, n_test: int = 15) -> Path:
    """A small SYNTHETIC site at ``root/site-0`` (train, val, test: the rest, n_val, n_test), as simulation
    lays it out."""
    pooled = make_synthetic_cxr(n, seed=1).split("train")
    idx = np.arange(n)
    n_train = n - n_val - n_test
    splits = {
        "train": pooled.subset(idx[:n_train]),
        "val": pooled.subset(idx[n_train : n_train + n_val]),
        "test": pooled.subset(idx[n_train + n_val :]),
    }
    site_dir = root / "site-0"
    save_npz(site_dir / "data.npz", Dataset(splits, ("normal", "lesion"), "synthetic-cxr", True))
    return site_dir


def site_run_config(root: Path, num_rounds: int = 2, **values: Any) -> dict[str, Any]:
    """The run config of a small CPU federation over the sites under ``root`` (32 px, batches of 20),
    with ``values`` (run-config keys) on top."""
    from fedshift.common.config import FederationConfig
    from fedshift.common.model import ModelConfig

    fed = FederationConfig(
        num_rounds=num_rounds, sites_root=str(root), device="cpu", model=ModelConfig(image_size=32)
    )
    return {**fed.to_run_config(), "batch-size": 20, **values}


def call_client_app(app: Any, msg: Message, run_config: dict[str, Any]) -> Message:
    """Call a ClientApp in process as simulated node 0 (partition 0) of run 1."""
    context = Context(
        run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config
    )
    return app(msg, context)  # type: ignore[no-any-return]


def perturbed_model(image_size: int, seed: int, noise_seed: int) -> Any:
    """A model whose shared and site-local tensors are all moved off their initial values (seeded)."""
    import torch

    from fedshift.common.model import ModelConfig, build_model

    m = build_model(ModelConfig(image_size=image_size, seed=seed))
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for param in m.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return m


def assert_tight_and_sound(ledger: Any, delta: float = 1e-5) -> float:
    """A ledger kept with the default (PRV) accountant: what a fresh Opacus PRVAccountant gives for its
    history, never below the PLD epsilon of Google's ``dp-accounting`` (an independent implementation,
    pessimistic), and never above Opacus's RDP. Returns the PLD epsilon."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = ledger.history()
    assert ledger.accountant == "prv"
    prv = PRVAccountant()
    prv.history = list(history)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    rdp = RDPAccountant()
    rdp.history = list(history)
    tight, reported = float(pld.get_epsilon(delta)), ledger.epsilon(delta)
    assert reported == pytest.approx(prv.get_epsilon(delta), abs=1e-6)
    assert tight <= reported <= rdp.get_epsilon(delta)
    assert reported - tight < 0.05  # tight: within PRV's own error of the PLD value
    return tight
