"""The experiment runner's own helpers: the sites' ledgers and the model each site holds after a run.

References: epsilon from the accountant directly (``fedshift.common.privacy.epsilon``) for
the charges written, and a model built and loaded by hand from the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import load_local_state, save_local_state
from fedshift.common.checkpoint import save_checkpoint
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.privacy import epsilon
from fedshift.common.protocol import MECHANISM_DP_SGD
from fedshift.simulations.experiment import ledger_epsilons, site_models


def test_ledger_epsilons_reads_every_site_in_the_given_order(tmp_path: Path) -> None:
    costs = {"site-0": (1.1, 0.01, 50), "site-2": (0.9, 0.02, 20)}
    for name, (sigma, q, steps) in costs.items():
        ledger = PrivacyLedger.at(tmp_path / name)
        ledger.charge(
            run_id="r",
            round=1,
            mechanism=MECHANISM_DP_SGD,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            delta=1e-5,
        )
    (tmp_path / "site-1").mkdir()  # a site without a ledger is left out
    expected = {name: epsilon([cost], 1e-5) for name, cost in costs.items()}
    assert ledger_epsilons(tmp_path, 1e-5) == pytest.approx(expected)
    in_order = ledger_epsilons(tmp_path, 1e-5, ["site-2", "site-1", "site-0"])
    assert list(in_order) == ["site-2", "site-0"]
    assert in_order == pytest.approx(expected)


def test_site_models_load_the_shared_tensors_and_each_sites_local_ones(tmp_path: Path) -> None:
    config = ModelConfig(image_size=32)
    trained = build_model(config)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    arrays = {k: v.detach().numpy() for k, v in trained.shared_state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", arrays, config, 2)
    local = {k: v + 1.0 for k, v in trained.local_state_dict().items()}
    save_local_state(tmp_path / "sites" / "site-0", local)
    (tmp_path / "sites" / "site-1").mkdir(parents=True)
    with_local, without = site_models(tmp_path / "ckpt", ["site-0", "site-1"], tmp_path / "sites")
    fresh = build_model(config)
    for model, own in ((with_local, load_local_state(tmp_path / "sites" / "site-0")), (without, None)):
        for k, v in model.shared_state_dict().items():
            np.testing.assert_array_equal(v.numpy(), arrays[k])
        reference = own if own is not None else fresh.local_state_dict()
        for k, v in model.local_state_dict().items():
            np.testing.assert_array_equal(v.numpy(), reference[k].numpy())
