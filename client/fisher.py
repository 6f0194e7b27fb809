"""Diagonal Fisher information of the shared adapters: estimated on images, or released under DP.

:func:`fisher_diagonal` is the plain estimate (per-sample squared gradients of the
log-likelihood, averaged); :func:`private_fisher_diagonal` clips each sample's
contribution and adds Gaussian noise, a release whose cost :class:`FisherRelease`
gives the ledger. Used by EWC (:mod:`fedshift.client.ewc`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from fedshift.client.dp import RandomSource
from fedshift.common.config import LABEL_MODES, check_choice, is_number
from fedshift.common.errors import ConfigError, DataError, PrivacyError
from fedshift.common.privacy import Mechanism

logger = logging.getLogger(__name__)


def _log_probs(logits: Tensor) -> Tensor:
    """Log class probabilities; one logit is read as a Bernoulli (sigmoid) model with classes (0, 1)."""
    if logits.shape[-1] == 1:
        return torch.cat([nn.functional.logsigmoid(-logits), nn.functional.logsigmoid(logits)], dim=-1)
    return torch.log_softmax(logits, dim=-1)


def _checked_params(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not params:
        raise ConfigError("Expected at least one parameter to estimate the Fisher for, but got none")
    named = dict(model.named_parameters())
    for key, value in params.items():
        if key not in named:
            raise ConfigError(
                f"Expected every Fisher parameter to be named as in model.named_parameters(), but got "
                f"{key!r}; pass shared_parameters(model) or a subset of named_parameters()"
            )
        if tuple(value.shape) != tuple(named[key].shape):
            raise ConfigError(
                f"Expected Fisher parameter {key!r} to have shape {tuple(named[key].shape)}, but got "
                f"{tuple(value.shape)}"
            )
    return {k: v.detach() for k, v in params.items()}


def _contributions_fn(
    model: nn.Module, labels: str
) -> Callable[[dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]:
    """Batched ``(params, x, weights) -> {key: (B, *shape)}``: each image's squared-gradient terms.

    ``weights`` is ``p(y|x)`` over the classes (``expected``) or a one-hot sampled label (``sampled``);
    the per-image term is ``sum_y weights_y * (d log p(y|x) / d theta) ** 2``.
    """

    def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return _log_probs(functional_call(model, p, (x.unsqueeze(0),))).squeeze(0)

    if labels == "expected":
        jac = jacrev(log_probs)  # (C, *shape) per image: C backward passes

        def one(p: dict[str, Tensor], x: Tensor, w: Tensor) -> dict[str, Tensor]:
            return {k: torch.tensordot(w.to(j.dtype), j * j, dims=1) for k, j in jac(p, x).items()}

    else:

        def picked(p: dict[str, Tensor], x: Tensor, onehot: Tensor) -> Tensor:
            return (log_probs(p, x) * onehot).sum()

        grad_fn = grad(picked)

        def one(p: dict[str, Tensor], x: Tensor, w: Tensor) -> dict[str, Tensor]:
            return {k: g * g for k, g in grad_fn(p, x, w).items()}

    return vmap(one, in_dims=(None, 0, 0))


def _label_weights(probs: Tensor, labels: str, generator: torch.Generator) -> Tensor:
    if labels == "expected":
        return probs
    drawn = torch.multinomial(probs.to(device=generator.device, dtype=torch.float64), 1, generator=generator)
    return nn.functional.one_hot(drawn.squeeze(1).to(probs.device), probs.shape[1]).to(probs.dtype)


class _EvalMode:
    """Every submodule in eval mode inside the block, each one's own mode restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        for m, _ in self.modes:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def per_sample_fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    labels: str = "expected",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Each image's Fisher term ``sum_y w_y (d log p(y|x) / d theta) ** 2``: ``{key: (N, *shape)}``.

    Gradients are taken with ``torch.func`` with respect to ``params`` only
    (evaluated at their values there), every other parameter and buffer of
    ``model`` fixed, every submodule in eval mode (no dropout, frozen norm
    statistics). The model must return logits ``(N, C)``; ``C = 1`` is read as a
    sigmoid (Bernoulli) model.
    """
    check_choice("labels", labels, LABEL_MODES)
    theta = _checked_params(model, params)
    if inputs.ndim < 1 or len(inputs) == 0:
        raise DataError(
            f"Expected at least one input to estimate the Fisher on, but got shape {tuple(inputs.shape)}"
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with _EvalMode(model):
        with torch.no_grad():
            logits = model(inputs)
        if logits.ndim != 2:
            raise ConfigError(
                f"Expected the model to return logits of shape (N, C), but got {tuple(logits.shape)}"
            )
        weights = _label_weights(torch.exp(_log_probs(logits)), labels, gen)
        return _contributions_fn(model, labels)(theta, inputs, weights)


def _chunks(n: int, batch_size: int) -> range:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"Expected batch_size to be an integer >= 1, but got {batch_size!r}")
    return range(0, n, batch_size)


def fisher_diagonal(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    labels: str = "expected",
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher of the model's predictive distribution, non-private.

    ``F = mean_x sum_y p(y|x) (d log p(y|x) / d theta) ** 2`` (``labels="expected"``,
    exact over the classes) or its Monte Carlo version with one ``y ~ p(y|x)``
    per image (``"sampled"``, drawn with ``generator``; seed 0 when none). The
    mean of *squared per-sample* gradients, not the square of a batch gradient.
    Use it on public or synthetic inputs only, or at a site for a quantity that
    never shapes what leaves it; see :func:`private_fisher_diagonal`.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(inputs)
    sums: dict[str, Tensor] = {}
    for begin in _chunks(n, batch_size):
        terms = per_sample_fisher(
            model, params, inputs[begin : begin + batch_size], labels=labels, generator=gen
        )
        for key, t in terms.items():
            total = t.to(torch.float64).sum(dim=0)
            sums[key] = total if key not in sums else sums[key] + total
    if not sums:  # no inputs: per_sample_fisher raises the error that says so
        per_sample_fisher(model, params, inputs, labels=labels, generator=gen)
    return {key: (sums[key] / n).to(params[key].dtype) for key in params}


def clip_per_sample(terms: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], Tensor]:
    """Scale each sample's term vector (flattened over all keys) to L2 norm <= ``clip``.

    Returns the clipped terms (float64) and each sample's norm before clipping.
    """
    if not (is_number(clip) and math.isfinite(clip) and clip > 0):
        raise PrivacyError(f"Expected the Fisher clip to be a finite number > 0, but got {clip!r}; e.g. 1.0")
    wide = {k: t.to(torch.float64) for k, t in terms.items()}
    norms = torch.stack([t.reshape(len(t), -1).square().sum(dim=1) for t in wide.values()], dim=1)
    norms = norms.sum(dim=1).sqrt()
    # (1 + 1e-12) keeps a clipped norm at or below the bound despite rounding
    factor = (clip / (norms * (1 + 1e-12))).clamp(max=1.0)
    return {k: t * factor.view(-1, *([1] * (t.ndim - 1))) for k, t in wide.items()}, norms


@dataclass(frozen=True)
class FisherRelease:
    """A Fisher diagonal released by the Gaussian mechanism, and what the ledger needs to charge it.

    Accounted as a Poisson-subsampled Gaussian with ``sample_rate = 1`` and one
    step (every image used once): see :attr:`mechanism`.
    """

    fisher: dict[str, Tensor]  # the noisy Fisher diagonal, clamped at 0 (post-processing)
    noise_multiplier: float  # sigma: noise std / clip
    sample_rate: float  # q = 1.0: every image contributes, once
    steps: int  # 1: one release
    clip: float  # L2 bound on one image's squared-gradient vector (the L2 sensitivity of the sum)
    n: int  # images used; the divisor of the noisy sum (treated as public, like the training-set size)

    @property
    def mechanism(self) -> Mechanism:
        """``(noise_multiplier, sample_rate, steps)``, the form of the ledger's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _clipped_sums(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    clip: float,
    labels: str,
    batch_size: int,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """The sum over images of each per-image Fisher term clipped to L2 norm ``clip``."""
    n = len(inputs)
    sums: dict[str, Tensor] = {}
    clipped = 0
    for begin in _chunks(n, batch_size):
        terms = per_sample_fisher(
            model, params, inputs[begin : begin + batch_size], labels=labels, generator=gen
        )
        bounded, norms = clip_per_sample(terms, clip)
        clipped += int((norms > clip).sum())
        for key, t in bounded.items():
            total = t.sum(dim=0)
            sums[key] = total if key not in sums else sums[key] + total
    if not sums:
        per_sample_fisher(model, params, inputs, labels=labels, generator=gen)  # raises: no inputs
    logger.debug("private Fisher: %d of %d per-image terms clipped to %g", clipped, n, clip)
    return sums


def _noised_mean(
    sums: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    std: float,
    n: int,
    noise_source: RandomSource | None,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """Each sum plus Gaussian noise of ``std``, divided by ``n`` and clamped at 0 (post-processing)."""
    fisher = {}
    for key in params:
        total = sums[key]
        if std > 0:
            if noise_source is not None:
                noise = noise_source.normal(std, total)
            else:
                noise = torch.normal(0.0, std, size=tuple(total.shape), generator=gen, dtype=torch.float64)
            total = total + noise.to(device=total.device, dtype=total.dtype)
        fisher[key] = (total / n).clamp(min=0.0).to(params[key].dtype)
    return fisher


def private_fisher_diagonal(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    labels: str = "expected",
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    noise_source: RandomSource | None = None,
) -> FisherRelease:
    """The Fisher diagonal of :func:`fisher_diagonal` under differential privacy (Gaussian mechanism).

    Each image's term vector ``v_i = sum_y w_y g_{i,y} ** 2`` (flattened over
    every key of ``params``) is scaled to L2 norm <= ``clip``; the clipped terms
    are summed, Gaussian noise ``N(0, (noise_multiplier * clip) ** 2)`` is added
    to every coordinate, the result is divided by ``n`` and clamped at 0.

    Why this is private: ``v_i`` depends on image ``i`` alone (its label is the
    model's, not the patient's, and a sampled one is drawn independently), so
    adding or removing one image changes the *sum* by one clipped vector, whose
    L2 norm is at most ``clip``: the sum's L2 sensitivity is ``clip``, and noise
    of std ``noise_multiplier * clip`` makes it a Gaussian mechanism with noise
    multiplier ``noise_multiplier``. Dividing by ``n`` (treated as public) and
    clamping are post-processing. Charge ``release.mechanism`` to the ledger
    before anything built on the release leaves the site.

    Noise comes from ``noise_source`` (pass a secure one, e.g. the DP engine's
    ``SecureSource``, in production) or else from ``generator`` (seeded,
    reproducible, **not** secure; seed 0 when none), which also draws sampled labels.
    """
    if not (is_number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyError(f"Expected a Fisher noise multiplier >= 0, but got {noise_multiplier!r}")
    if noise_multiplier == 0:
        warnings.warn(
            "private_fisher_diagonal with noise_multiplier=0 releases the clipped Fisher without noise: "
            "it is not private and the ledger cannot charge it",
            UserWarning,
            stacklevel=2,
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(inputs)
    sums = _clipped_sums(model, params, inputs, clip, labels, batch_size, gen)
    fisher = _noised_mean(sums, params, float(noise_multiplier) * float(clip), n, noise_source, gen)
    return FisherRelease(
        fisher=fisher,
        noise_multiplier=float(noise_multiplier),
        sample_rate=1.0,
        steps=1,
        clip=float(clip),
        n=n,
    )
