"""EWC: penalty and its gradient, Fisher diagonals, the DP Fisher release, configuration.

References: the closed-form gradient against autograd of the penalty; the Fisher
of (multinomial / binary) logistic regression against its analytic diagonal
``E_x[p_k (1 - p_k) x_j ** 2]``; a nonlinear model's Fisher against one autograd
call per image and class; the DP release against clipping by hand (noise 0) and
its noise against ``sigma * clip / n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from fedshift.client.dp import SeededSource
from fedshift.client.ewc import consolidate, ewc_gradient, ewc_penalty, unit_fisher
from fedshift.client.fisher import (
    FisherRelease,
    clip_per_sample,
    fisher_diagonal,
    per_sample_fisher,
    private_fisher_diagonal,
)
from fedshift.common.config import EWCConfig
from fedshift.common.errors import ConfigError, DataError, PrivacyError
from fedshift.common.privacy import epsilon

LAMBDA_MESSAGE = "Expected run-config 'ewc-lambda' to be a finite number >= 0, but got"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tensors here are tiny: intra-op threads only add synchronisation (seconds on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _terms(shapes: list[tuple[int, ...]], seed: int) -> tuple[dict[str, Tensor], ...]:
    gen = torch.Generator().manual_seed(seed)
    names = [f"p{i}" for i in range(len(shapes))]
    params = {
        k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in zip(names, shapes, strict=True)
    }
    anchor = {
        k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in zip(names, shapes, strict=True)
    }
    fisher = {
        k: torch.rand(s, generator=gen, dtype=torch.float64) * 3 for k, s in zip(names, shapes, strict=True)
    }
    return params, anchor, fisher


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _clone(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


# ---------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("shapes", [[(5,)], [(3, 4), (4,)], [(2, 3, 4), (), (1, 7)]])
@pytest.mark.parametrize("lam", [0.0, 0.7, 250.0])
def test_gradient_matches_autograd_of_penalty(shapes: list[tuple[int, ...]], lam: float) -> None:
    params, anchor, fisher = _terms(shapes, seed=len(shapes))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    penalty = ewc_penalty(leaves, anchor, fisher, lam)
    auto = torch.autograd.grad(penalty, list(leaves.values()))
    closed = ewc_gradient(leaves, anchor, fisher, lam)
    assert set(closed) == set(leaves)
    for key, g in zip(leaves, auto, strict=True):
        torch.testing.assert_close(closed[key], g, atol=1e-6, rtol=0)
    expected = 0.5 * lam * sum(float((fisher[k] * (params[k] - anchor[k]) ** 2).sum()) for k in params)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_penalty_refuses_mismatched_terms() -> None:
    params, anchor, fisher = _terms([(3,), (2, 2)], seed=0)
    with pytest.raises(ConfigError, match="'p1' is missing"):
        ewc_penalty(params, {"p0": anchor["p0"]}, fisher, 1.0)
    with pytest.raises(ConfigError, match=r"Fisher diagonal 'p1' to have shape \(2, 2\), but got \(4,\)"):
        ewc_gradient(params, anchor, {**fisher, "p1": torch.ones(4)}, 1.0)
    with pytest.raises(ConfigError, match="'p0' has 0 non-finite and 1 negative"):
        ewc_penalty(params, anchor, {**fisher, "p0": torch.tensor([1.0, -1.0, 0.0])}, 1.0)
    with pytest.raises(ConfigError, match="'p1' has 1 non-finite"):
        ewc_penalty(params, anchor, {**fisher, "p1": torch.tensor([[1.0, math.nan], [0.0, 0.0]])}, 1.0)
    with pytest.raises(ConfigError, match="shares memory"):
        ewc_penalty(params, {k: v.detach() for k, v in params.items()}, fisher, 1.0)
    for bad in ("abc", -1.0, math.nan, math.inf, True, None):
        with pytest.raises(ConfigError, match=LAMBDA_MESSAGE):
            ewc_penalty(params, anchor, fisher, cast(Any, bad))


# ---------------------------------------------------------------------------- Fisher
def _logistic_data(d: int, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * 1.5


def _linear(d: int, c: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def _analytic(model: nn.Linear, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Logistic regression's Fisher: ``E[p_k (1 - p_k) x_j ** 2]`` (weight) and ``E[p_k (1 - p_k)]`` (bias).

    For softmax over C classes, ``d log p_y / d W_kj = (1[y = k] - p_k) x_j``, and
    ``sum_y p_y (1[y = k] - p_k) ** 2 = p_k (1 - p_k)``. One logit with a sigmoid is
    the same with ``p = sigmoid(z)``. Also returns the per-image variance of the
    one-sample Monte Carlo term ``(1[y = k] - p_k) ** 2 * x_j ** 2``:
    ``E[(.)**4] - (p (1 - p)) ** 2 = p (1 - p) ** 4 + (1 - p) p ** 4 - (p (1 - p)) ** 2``.
    """
    with torch.no_grad():
        z = model(x)
        p = torch.sigmoid(z) if z.shape[1] == 1 else torch.softmax(z, dim=1)
    s = p * (1 - p)  # (N, K)
    var = p * (1 - p) ** 4 + (1 - p) * p**4 - s**2
    x2 = x**2
    mean = {"weight": (s.T @ x2) / len(x), "bias": s.mean(dim=0)}
    variance = {"weight": (var.T @ x2**2) / len(x) ** 2, "bias": var.sum(dim=0) / len(x) ** 2}
    return mean, variance


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_expected_fisher_matches_logistic_regression(classes: int) -> None:
    x = _logistic_data(d=4, n=300, seed=classes)
    model = _linear(4, classes, seed=classes)
    want, _ = _analytic(model, x)
    got = fisher_diagonal(model, _params(model), x, labels="expected", batch_size=128)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("classes", [1, 3])
def test_sampled_fisher_is_unbiased_and_seeded(classes: int) -> None:
    x = _logistic_data(d=3, n=6000, seed=10 + classes)
    model = _linear(3, classes, seed=classes)
    want, variance = _analytic(model, x)
    got = fisher_diagonal(
        model,
        _params(model),
        x,
        labels="sampled",
        batch_size=2000,
        generator=torch.Generator().manual_seed(1),
    )
    for key in want:
        # given x, only the labels are random: 5 standard errors of the mean of n independent terms
        tolerance = 5 * variance[key].sqrt()
        assert ((got[key] - want[key]).abs() <= tolerance).all(), (key, got[key], want[key], tolerance)
    again = fisher_diagonal(
        model, _params(model), x, labels="sampled", batch_size=500, generator=torch.Generator().manual_seed(1)
    )
    for key in want:
        torch.testing.assert_close(again[key], got[key], atol=1e-12, rtol=0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _reference_terms(model: nn.Module, keys: list[str], x: Tensor) -> list[Tensor]:
    """One autograd call per image and class, in eval mode: ``sum_y p_y g_y ** 2`` flattened over ``keys``."""
    model.eval()
    named = dict(model.named_parameters())
    out = []
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]), dim=1)[0]
        term = torch.zeros(sum(named[k].numel() for k in keys), dtype=torch.float64)
        for y in range(len(logp)):
            grads = torch.autograd.grad(logp[y], [named[k] for k in keys], retain_graph=True)
            term += float(logp[y].detach().exp()) * torch.cat([g.reshape(-1) for g in grads]).double() ** 2
        out.append(term)
    return out


def _flat(terms: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([terms[k].reshape(len(terms[k]), -1) for k in keys], dim=1)


def test_fisher_of_a_subset_of_a_nonlinear_model_matches_hand_loop() -> None:
    torch.manual_seed(0)
    model = _Net().double()
    model.body[1].running_mean.normal_()  # type: ignore[operator]
    model.train(True)  # the estimate must switch to eval mode itself, and restore this afterwards
    stats_before = model.body[1].running_mean.clone()  # type: ignore[operator]
    keys = ["body.0.weight", "head.weight", "head.bias"]
    named = _params(model)
    x = torch.randn(40, 5, dtype=torch.float64)
    got = fisher_diagonal(model, {k: named[k] for k in keys}, x, batch_size=16)
    assert model.training and model.body[3].training
    torch.testing.assert_close(model.body[1].running_mean, stats_before)  # type: ignore[arg-type]
    want = torch.stack(_reference_terms(model, keys, x)).mean(dim=0)
    torch.testing.assert_close(_flat({k: v[None] for k, v in got.items()}, keys)[0], want, atol=1e-10, rtol=0)
    with pytest.raises(ConfigError, match=r"'body\.9\.weight'"):
        fisher_diagonal(model, {"body.9.weight": named["head.weight"]}, x)
    with pytest.raises(DataError, match="at least one input"):
        fisher_diagonal(model, {k: named[k] for k in keys}, x[:0])
    with pytest.raises(ConfigError, match="'expected'"):
        fisher_diagonal(model, {k: named[k] for k in keys}, x, labels="empirical")


# ---------------------------------------------------------------------------- anchor
def _train(lam: float, *, steps: int = 25, lr: float = 0.5, proximal: bool = False) -> tuple[Tensor, Tensor]:
    """Plain full-batch SGD on a tiny classifier from a fixed start; returns (start, end) flattened.

    ``proximal``: the penalty is taken implicitly, ``theta <- argmin <g, theta> + penalty +
    |theta - theta_t|^2 / (2 lr)``, stable for any lambda; otherwise it is added to the loss.
    """
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (64,), generator=gen)
    model = _linear(4, 2, seed=3)
    params = _params(model)
    anchor = _clone(params)
    fisher = fisher_diagonal(model, params, x)
    start = torch.cat([v.reshape(-1) for v in anchor.values()])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        if not proximal:
            loss = loss + ewc_penalty(params, anchor, fisher, lam)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (key, p), g in zip(params.items(), grads, strict=True):
                if proximal:
                    p.copy_((p / lr - g + lam * fisher[key] * anchor[key]) / (1 / lr + lam * fisher[key]))
                else:
                    p.sub_(lr * g)
    return start, torch.cat([v.detach().reshape(-1) for v in params.values()])


def test_lambda_zero_changes_nothing_and_huge_lambda_holds_the_anchor() -> None:
    start, free = _train(0.0, proximal=True)
    _, free_again = _train(0.0, proximal=True)
    _, penalised = _train(0.0)  # penalty in the loss with lambda = 0
    assert torch.equal(penalised, free) and torch.equal(free_again, free)
    assert (free - start).abs().max() > 0.1  # without the penalty the parameters do move
    _, held = _train(1e6, proximal=True)
    assert (held - start).abs().max() < 1e-4
    _, pulled = _train(5.0)  # a moderate lambda in the loss: in between
    assert 1e-4 < (pulled - start).norm() < (free - start).norm()


# ---------------------------------------------------------------------------- DP Fisher
def test_private_fisher_without_noise_is_the_clipped_fisher() -> None:
    torch.manual_seed(1)
    model = _Net().double()
    keys = ["body.0.bias", "head.weight", "head.bias"]
    named = _params(model)
    params = {k: named[k] for k in keys}
    x = torch.randn(30, 5, dtype=torch.float64) * 2
    reference = _reference_terms(model, keys, x)
    norms = torch.stack([t.norm() for t in reference])
    clip = float(norms.median())
    want = torch.stack([t * min(1.0, clip / float(t.norm())) for t in reference]).mean(dim=0)
    with pytest.warns(UserWarning, match="not private"):
        release = private_fisher_diagonal(model, params, x, clip=clip, noise_multiplier=0.0, batch_size=7)
    got = torch.cat([release.fisher[k].reshape(-1) for k in keys])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
    assert (release.n, release.clip, release.sample_rate, release.steps) == (30, clip, 1.0, 1)

    bounded, before = clip_per_sample(per_sample_fisher(model, params, x), clip)
    after = _flat(bounded, keys).norm(dim=1)
    torch.testing.assert_close(before, norms, atol=1e-12, rtol=1e-9)
    assert (before > clip).any() and (before <= clip).any()
    assert (after <= clip).all()  # every contribution within the bound
    torch.testing.assert_close(after[before > clip], torch.full_like(after[before > clip], clip))
    torch.testing.assert_close(after[before <= clip], before[before <= clip])  # the others untouched


def test_private_fisher_noise_has_the_gaussian_mechanism_scale() -> None:
    # x_j = +-1 spreads each image's clipped term evenly over ~1000 coordinates, so the Fisher sits
    # ~30 noise standard deviations above 0 and the clamp at 0 never bites
    gen = torch.Generator().manual_seed(2)
    n, d, classes, sigma, clip = 2000, 200, 5, 2.0, 0.05
    x = torch.randint(0, 2, (n, d), generator=gen).double() * 2 - 1
    model = _linear(d, classes, seed=4)
    with torch.no_grad():
        model.weight.mul_(0.1)
    params = _params(model)
    with pytest.warns(UserWarning):
        clean = private_fisher_diagonal(model, params, x, clip=clip, noise_multiplier=0.0, batch_size=1000)
    noisy = private_fisher_diagonal(
        model, params, x, clip=clip, noise_multiplier=sigma, batch_size=1000, noise_source=SeededSource(5)
    )
    noise = torch.cat([(noisy.fisher[k] - clean.fisher[k]).reshape(-1) for k in params])
    assert float(torch.cat([v.reshape(-1) for v in clean.fisher.values()]).min()) > 20 * sigma * clip / n
    expected_std = sigma * clip / n
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.1)
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(len(noise))
    assert stats.kstest((noise / expected_std).numpy(), "norm").pvalue > 1e-3
    # the release is what the ledger charges: one Gaussian mechanism, q = 1, 1 step
    assert isinstance(noisy, FisherRelease) and noisy.mechanism == (sigma, 1.0, 1)
    assert 0 < epsilon([noisy.mechanism], 1e-5) < math.inf
    # a huge noise multiplier is clamped to a non-negative Fisher, seeded runs repeat
    loud = private_fisher_diagonal(
        model, params, x[:50], clip=clip, noise_multiplier=1e4, generator=torch.Generator().manual_seed(3)
    )
    again = private_fisher_diagonal(
        model, params, x[:50], clip=clip, noise_multiplier=1e4, generator=torch.Generator().manual_seed(3)
    )
    assert all((v >= 0).all() for v in loud.fisher.values())
    assert all(torch.equal(loud.fisher[k], again.fisher[k]) for k in params)
    with pytest.raises(PrivacyError, match="clip"):
        private_fisher_diagonal(model, params, x[:5], clip=0.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="noise multiplier"):
        private_fisher_diagonal(model, params, x[:5], clip=1.0, noise_multiplier=-1.0)


# ---------------------------------------------------------------------------- consolidation
def test_consolidate_is_the_weighted_combination() -> None:
    _, _, fa = _terms([(3,), (2, 2)], seed=1)
    _, _, fb = _terms([(3,), (2, 2)], seed=2)
    out = consolidate(fa, fb, 0.3, 1.0)
    for key in fa:
        torch.testing.assert_close(out[key], 0.3 * fa[key] + fb[key])
    assert all(torch.equal(v, torch.ones_like(v)) for v in unit_fisher(fa).values())
    with pytest.raises(ConfigError, match="weight_a"):
        consolidate(fa, fb, -1.0, 1.0)
    with pytest.raises(ConfigError, match="both are 0"):
        consolidate(fa, fb, 0.0, 0.0)
    with pytest.raises(ConfigError, match="'p1'"):
        consolidate(fa, {"p0": fb["p0"]}, 0.5, 0.5)


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("bad", ["abc", -1, -0.5, math.nan, math.inf, True, None])
def test_config_refuses_a_lambda_that_is_not_a_number_at_least_zero(bad: object) -> None:
    with pytest.raises(ConfigError, match=LAMBDA_MESSAGE) as info:
        EWCConfig(lam=cast(Any, bad))
    assert "ewc-lambda" in str(info.value) and "to turn EWC off" in str(info.value)


def test_config_choices_and_keys() -> None:
    with pytest.raises(ConfigError, match=r"'ewc-fisher-source' to be one of 'dp' .*'public' .*'none'"):
        EWCConfig(fisher_source="private")
    with pytest.raises(ConfigError, match=r"'ewc-anchor' to be one of 'global' .*'consolidated'"):
        EWCConfig(anchor="previous")
    with pytest.raises(ConfigError, match="ewc-fisher-samples"):
        EWCConfig(fisher_samples=0)
    with pytest.raises(ConfigError, match="ewc-fisher-clip"):
        EWCConfig(fisher_clip=math.nan)
    with pytest.raises(PrivacyError, match="ewc-fisher-noise-multiplier > 0"):
        EWCConfig(lam=10.0, fisher_noise_multiplier=0.0)
    assert not EWCConfig().enabled and not EWCConfig().spends_privacy  # off by default
    assert EWCConfig(lam=10.0, fisher_source="public", fisher_noise_multiplier=0.0).enabled
    config = EWCConfig().with_values({"ewc-lambda": 100, "ewc-fisher-samples": 256.0, "num-server-rounds": 3})
    assert (config.lam, config.fisher_samples, config.spends_privacy) == (100.0, 256, True)
    assert EWCConfig().with_values(config.to_run_config()) == config
    with pytest.raises(ConfigError, match="ewc-lamda"):
        EWCConfig().with_values({"ewc-lamda": 1.0})


@pytest.mark.parametrize("private", [False, True])
def test_ewc_term_in_the_real_training_loop(private: bool) -> None:
    """The site's loop (with and without DP-SGD): lambda 0 changes nothing; a huge lambda pins the
    shared adapters to the anchor, since the term is added after DP's clipping and noise."""
    from fedshift.client.dp import PrivateTraining
    from fedshift.client.ewc import EWCTerm
    from fedshift.client.training import train_local
    from fedshift.common.config import TrainConfig
    from fedshift.common.data import make_synthetic_cxr
    from fedshift.common.model import ModelConfig, build_model

    data = make_synthetic_cxr(48, seed=3).split("train")
    config = TrainConfig(batch_size=16, local_epochs=2, learning_rate=1e-2)

    def train(lam: float | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = build_model(ModelConfig(image_size=32, seed=1))
        anchor = {k: v.clone() for k, v in model.shared_state_dict().items()}
        term = None
        if lam is not None:
            term = EWCTerm(model, anchor, {k: torch.ones_like(v) for k, v in anchor.items()}, lam)
        dp = PrivateTraining(1.0, 1.0, sample_rate=1 / 3, steps=6, seed=5) if private else None
        train_local(model, data, config, torch.device("cpu"), seed=2, private=dp, gradient_term=term)
        return anchor, {k: v.clone() for k, v in model.shared_state_dict().items()}

    _, plain = train(None)
    _, zero = train(0.0)
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=0, atol=0)
    anchor, pinned = train(1e8)
    moved = max(float((plain[k] - anchor[k]).abs().max()) for k in anchor)
    stayed = max(float((pinned[k] - anchor[k]).abs().max()) for k in anchor)
    assert moved > 0.05  # lr 1e-2 for 6 steps: the adapters move without EWC
    # AdamW with a dominant EWC gradient oscillates around the anchor within about one step (lr)
    assert stayed <= 2 * config.learning_rate
