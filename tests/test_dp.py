"""DP-SGD on Opacus: per-sample gradients, clipping, noise, Poisson sampling, budget planning.

References: per-sample gradients against one-sample autograd (micro-batches);
clipping against ``min(1, C / ||g||)`` computed by hand; noise against
``sigma * C / B``; epsilon against a fresh Opacus accountant.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant
from scipy import stats
from torch import nn

from fedshift.client.dp import (
    PrivateTraining,
    Release,
    SecureSource,
    SeededSource,
    check_round,
    plan_round,
    reserve,
)
from fedshift.client.ledger import PrivacyLedger
from fedshift.common.config import PrivacyConfig, TrainConfig
from fedshift.common.data import to_tensor
from fedshift.common.errors import BudgetExhaustedError, PrivacyError, RoundRefusedError
from fedshift.common.model import FedshiftModel, ModelConfig, build_model
from fedshift.common.privacy import check_budget, epsilon, noise_for_budget


def _model(finetune: str = "adapters") -> FedshiftModel:
    model = build_model(ModelConfig(image_size=32, seed=3, finetune=finetune))
    with torch.no_grad():  # move LoRA-up off zero so every adapter has a non-trivial gradient
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train(True)
    return model


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32), dtype=np.uint8)
    return to_tensor(images, 32), torch.as_tensor(rng.integers(0, 2, size=n))


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _reference_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """One autograd call per sample: the micro-batch reference for per-sample gradients."""
    out = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append([g.detach() for g in torch.autograd.grad(loss, _params(model))])
    return out


def _dp_step(model: nn.Module, private: PrivateTraining, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    """Forward, backward and Opacus's pre-step (clip, noise, scale) without moving the weights."""
    optimizer = torch.optim.SGD(_params(model), lr=0.0)
    gsm, dp_optimizer = private.attach(model, optimizer, n)
    dp_optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(gsm(x), y, reduction="sum")
    loss.backward()
    assert dp_optimizer.pre_step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("finetune", ["adapters", "linear-probe", "partial", "norm-only", "full"])
def test_per_sample_gradients_match_micro_batches_and_clip_to_c(finetune: str) -> None:
    model = _model(finetune)
    reference_model = copy.deepcopy(model)
    x, y = _batch(6)
    reference = _reference_per_sample(reference_model, x, y)
    norms = torch.stack([torch.sqrt(torch.stack([(g**2).sum() for g in gs]).sum()) for gs in reference])
    clip = float(norms.sort().values[2:4].mean())  # half the samples get clipped, none sits on C
    n, q = 60, 0.1  # expected batch size 6
    private = PrivateTraining(noise_multiplier=0.0, clip_norm=clip, sample_rate=q, steps=1)
    _dp_step(model, private, x, y, n)
    params = _params(model)
    # Opacus's per-sample gradients (LoRA, head, input adapter, norm affines) == micro-batch autograd
    for j, p in enumerate(params):
        grad_sample = cast_tensor(getattr(p, "grad_sample", None))
        expected = torch.stack([reference[i][j] for i in range(len(x))])
        torch.testing.assert_close(grad_sample, expected, rtol=1e-4, atol=1e-6)
    # clipped per-sample gradients: norm <= C, and the large ones land exactly on C
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    clipped_norms = norms * factors
    assert bool((clipped_norms <= clip * (1 + 1e-6)).all())
    large = norms > clip
    assert int(large.sum()) >= 2
    torch.testing.assert_close(clipped_norms[large], torch.full((int(large.sum()),), clip), rtol=1e-5, atol=0)
    # the gradient the optimizer steps with == sum of clipped reference gradients / expected batch size
    for j, p in enumerate(params):
        expected = cast_tensor(sum(factors[i] * reference[i][j] for i in range(len(x))) / round(q * n))
        torch.testing.assert_close(cast_tensor(p.grad), expected, rtol=1e-4, atol=2e-6)
    assert private.clipped_fraction == pytest.approx(float(large.float().mean()))
    private.detach()


def cast_tensor(value: object) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_is_sigma_c_over_b(secure: bool) -> None:
    model = _model()
    sigma, clip, n, q = 1.5, 0.7, 100, 0.2
    private = PrivateTraining(sigma, clip, sample_rate=q, steps=1, secure_rng=secure, seed=11)
    x, y = _batch(1)
    _dp_step(model, private, x[:0], y[:0], n)  # empty Poisson batch: the update is pure noise
    noise = torch.cat([cast_tensor(p.grad).flatten() for p in _params(model)])
    expected = sigma * clip / round(q * n)
    assert noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())
    private.detach()


def test_secure_source_is_standard_normal_and_not_reproducible() -> None:
    source = SecureSource()
    draws = source.normal(1.0, torch.zeros(200_000, dtype=torch.float64)).numpy()
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    again = source.normal(1.0, torch.zeros(8)).numpy()
    assert not np.allclose(again, source.normal(1.0, torch.zeros(8)).numpy())
    seeded = [SeededSource(5).normal(1.0, torch.zeros(8)) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1])  # experiments reproduce with a seed


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_batches_have_the_expected_size(secure: bool) -> None:
    private = PrivateTraining(1.0, 1.0, sample_rate=0.2, steps=400, secure_rng=secure, seed=2)
    sizes = np.array([len(idx) for idx in private.batches(100, torch.device("cpu"))])
    assert len(sizes) == 400
    assert sizes.mean() == pytest.approx(20.0, abs=1.0)  # 4 sd of the mean is 0.8
    assert sizes.var() == pytest.approx(100 * 0.2 * 0.8, rel=0.25)  # binomial, not fixed-size


def test_bad_dp_settings_are_refused() -> None:
    with pytest.raises(PrivacyError, match="clip norm to be a finite number > 0, but got 0"):
        PrivateTraining(1.0, 0.0, sample_rate=0.1, steps=1)
    with pytest.raises(PrivacyError, match="epsilon to be a finite number > 0, but got -1"):
        check_budget(-1.0, 1e-5)
    with pytest.raises(PrivacyError, match=r"delta in \(0, 5e-06\]"):
        check_budget(8.0, 1e-5, n_train=200_000)  # delta <= 1/n binds for large sites
    with pytest.raises(PrivacyError, match="dp-accountant"):
        PrivacyConfig(accountant="moments")
    with pytest.raises(PrivacyError, match="dp-epsilon"):
        PrivacyConfig(enabled=True)  # DP without a budget


def test_noise_for_budget_is_tight_and_counts_history() -> None:
    plan = noise_for_budget(4.0, 1e-5, 0.05, 300)
    assert plan.epsilon_planned <= 4.0
    assert epsilon([(plan.noise_multiplier - 2e-3, 0.05, 300)], 1e-5) > 4.0  # the smallest sigma that fits
    with_history = noise_for_budget(4.0, 1e-5, 0.05, 300, history=[(3.0, 0.05, 100)])
    assert with_history.noise_multiplier > plan.noise_multiplier
    assert with_history.epsilon_before == pytest.approx(epsilon([(3.0, 0.05, 100)], 1e-5))


@pytest.mark.parametrize("budget", [1.0, 8.0])
def test_the_default_accountant_is_tight_and_needs_less_noise_than_rdp(budget: float) -> None:
    """The issue's history: sigma 1.01, q 0.099, 110 steps; and planning at both accountants."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    assert PrivacyConfig().accountant == "prv"
    history = [(1.01, 0.099, 110)]
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.099, dp_accounting.GaussianDpEvent(1.01)), 110)
    tight = pld.get_epsilon(1e-5)
    assert tight <= epsilon(history, 1e-5) < tight + 0.05 < epsilon(history, 1e-5, "rdp") - 0.5
    prv = noise_for_budget(budget, 1e-5, 0.099, 110)
    rdp = noise_for_budget(budget, 1e-5, 0.099, 110, accountant="rdp")
    assert prv.epsilon_planned <= budget < epsilon([(prv.noise_multiplier - 2e-3, 0.099, 110)], 1e-5)
    assert prv.noise_multiplier < 0.95 * rdp.noise_multiplier  # less noise for the same budget


def test_a_site_with_room_under_prv_but_none_under_rdp_is_planned_not_refused() -> None:
    history = [(1.01, 0.099, 110)]  # PRV 7.18, RDP 8.02: room left only under the tight accountant
    assert epsilon(history, 1e-5, "rdp") > 8.0 > epsilon(history, 1e-5)
    with pytest.raises(BudgetExhaustedError):
        noise_for_budget(8.0, 1e-5, 0.099, 10, history=history, accountant="rdp", max_sigma=10.0)
    plan = noise_for_budget(8.0, 1e-5, 0.099, 10, history=history, max_sigma=10.0)
    assert plan.epsilon_planned <= 8.0
    assert plan.epsilon_before == pytest.approx(epsilon(history, 1e-5))


def test_composition_is_accounted_whatever_the_order_of_the_releases() -> None:
    """A ledger whose rounds alternate with other releases: the same epsilon as its mechanisms grouped,
    and the same as a fresh Opacus PRV accountant fed the entries one by one."""
    rounds = [(1.2, 0.1, 10), (4.0, 1.0, 1)] * 5
    grouped = [(1.2, 0.1, 50), (4.0, 1.0, 5)]
    reference = PRVAccountant()
    reference.history = list(rounds)
    assert epsilon(rounds, 1e-5) == pytest.approx(epsilon(grouped, 1e-5), abs=1e-9)
    assert epsilon(rounds, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), abs=0.02)
    assert epsilon(rounds, 1e-5, "rdp") == pytest.approx(epsilon(grouped[::-1], 1e-5, "rdp"), abs=1e-9)


def test_plan_round_spends_the_budget_over_the_run_then_refuses(tmp_path: Path) -> None:
    privacy = PrivacyConfig(enabled=True, epsilon=3.0, delta=1e-5)
    ledger = PrivacyLedger.at(tmp_path)
    train = TrainConfig(batch_size=50)
    sigmas = []
    for rnd in range(1, 5):
        dp = plan_round(
            privacy, ledger, num_examples=500, train=train, run_id="7", server_round=rnd, num_rounds=4
        )
        assert (dp.sample_rate, dp.steps) == (0.1, 10)
        planned_after = epsilon([*ledger.history(), dp.cost], 1e-5)
        assert planned_after <= 3.0
        [entry] = reserve(
            privacy,
            ledger,
            run_id="7",
            server_round=rnd,
            charges=[Release("dp-sgd", dp.cost)],
            what=f"round {rnd}",
        )
        assert (entry.round, entry.mechanism, entry.noise_multiplier) == (rnd, "dp-sgd", dp.noise_multiplier)
        assert entry.epsilon == pytest.approx(planned_after, abs=1e-9)
        sigmas.append(dp.noise_multiplier)
    assert len(set(sigmas)) == 1  # fixed within a run
    reference = PRVAccountant()
    reference.history = [(sigmas[0], 0.1, 40)]
    assert ledger.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), abs=1e-6)
    assert ledger.epsilon(1e-5) > 3.0 - 0.05  # the planned run uses (almost) all of it
    with pytest.raises(RoundRefusedError, match="already trained"):  # checked before the data is read
        check_round(ledger, run_id="7", server_round=4, num_rounds=4)
    with pytest.raises(BudgetExhaustedError, match="epsilon"):  # a new run finds nothing left
        plan_round(privacy, ledger, num_examples=500, train=train, run_id="8", server_round=1, num_rounds=2)
    fixed = PrivacyConfig(enabled=True, epsilon=50.0, noise_multiplier=1.3)
    dp = plan_round(fixed, ledger, num_examples=500, train=train, run_id="9", server_round=1, num_rounds=2)
    assert dp.noise_multiplier == 1.3


def test_reserve_checks_the_whole_plan_then_charges_it_in_order(tmp_path: Path) -> None:
    """The one reserve step of training, the statistics stage and the Fisher release: every charge of
    a plan, or none of them with the numbers in the refusal."""
    privacy = PrivacyConfig(enabled=True, epsilon=3.0, delta=1e-5)
    ledger = PrivacyLedger.at(tmp_path)
    plan = [Release("dp-label-counts", (2.0, 1.0, 1)), Release("dp-moments", (3.0, 1.0, 1))]
    entries = reserve(privacy, ledger, run_id="1", server_round=0, charges=plan, what="the statistics")
    assert [(e.round, e.mechanism, e.steps) for e in entries] == [
        (0, "dp-label-counts", 1),
        (0, "dp-moments", 1),
    ]
    assert entries[-1].epsilon == pytest.approx(epsilon([(2.0, 1.0, 1), (3.0, 1.0, 1)], 1e-5), abs=1e-9)
    before = ledger.epsilon(1e-5)
    big = [Release("dp-sgd", (0.8, 0.1, 100)), Release("dp-fisher", (5.0, 1.0, 1))]
    with pytest.raises(BudgetExhaustedError, match=f"from {before:.4g} to ") as refused:
        reserve(privacy, ledger, run_id="1", server_round=1, charges=big, what="round 1")
    assert "round 1" in str(refused.value) and "epsilon=3" in str(refused.value)
    assert len(PrivacyLedger.at(tmp_path).entries) == 2  # nothing of the refused plan was written
    # what a round counts but others charge (the refreshed moments) refuses it too; the end-of-run
    # release it keeps room for as well
    small = [Release("dp-sgd", (5.0, 0.1, 10))]
    with pytest.raises(BudgetExhaustedError, match="end-of-run release"):
        reserve(privacy, ledger, run_id="1", server_round=1, charges=small, final=[(0.5, 1.0, 50)], what="r")
    [entry] = reserve(privacy, ledger, run_id="1", server_round=1, charges=small, what="round 1")
    assert entry.epsilon == pytest.approx(epsilon([*ledger.history()], 1e-5), abs=1e-9)
    # a site with DP off still charges the DP statistics it releases, without a budget to check
    off = PrivacyConfig(enabled=False, epsilon=0.01, delta=1e-5)
    [stat] = reserve(off, ledger, run_id="1", server_round=2, charges=[plan[1]], what="the statistics")
    assert stat.mechanism == "dp-moments" and len(ledger.entries) == 4
