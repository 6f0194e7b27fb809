"""Elastic Weight Consolidation (EWC) for the shared adapters: a quadratic pull towards an anchor.

The penalty is ``(lam / 2) * sum_i F_i * (theta_i - anchor_i) ** 2``, with
``theta`` the shared adapter tensors, ``anchor`` the tensors to stay close to
(the global adapters of this round, or parameters consolidated after an earlier
phase) and ``F`` a diagonal estimate of the Fisher information: how much the
model's predictions depend on each coordinate.

Pure math lives in functions (:func:`ewc_penalty`, :func:`ewc_gradient`,
:func:`fisher_diagonal`, :func:`private_fisher_diagonal`, :func:`consolidate`);
:class:`EWCConfig` only holds the settings.

**Privacy.** A Fisher diagonal estimated on a hospital's images is derived from
patient data. Keeping it at the site is not enough: the penalty's gradient
``lam * F * (theta - anchor)`` shapes the adapters that are sent, and DP-SGD's
clipping and noise do not cover it (it is not a per-sample gradient). So a
Fisher that enters training must be public (``fisher_source="public"``: estimated
on public or synthetic images), absent (``"none"``: ``F = 1``, a plain L2 pull),
or released by an accounted DP mechanism (``"dp"``: :func:`private_fisher_diagonal`,
whose :class:`FisherRelease` the site's ledger charges); everything built from it
afterwards is post-processing.

**With DP-SGD.** Opacus's optimizer builds each step's gradient only from the
per-sample gradients of the model's layers, so a penalty added to the loss is
silently dropped there. Add :func:`ewc_gradient` to the parameters' ``.grad``
after clipping and noise instead (its closed form is the gradient of
:func:`ewc_penalty`); since ``F`` is public or DP, this costs no privacy.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from fedshift.client.dp import RandomSource, SecureSource, SeededSource
from fedshift.common.config import LABEL_MODES, EWCConfig, check_choice, check_lambda, is_number
from fedshift.common.data import make_synthetic_cxr, to_tensor
from fedshift.common.errors import ConfigError, DataError, PrivacyError
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- validation
def _check_same_layout(params: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    """Same keys and shapes as ``params``, naming the first offending key."""
    missing, extra = sorted(set(params) - set(other)), sorted(set(other) - set(params))
    if missing or extra:
        key = (missing or extra)[0]
        where = "is missing from it" if missing else "is not a parameter"
        raise ConfigError(
            f"Expected the EWC {what} to have the same keys as the parameters, but {key!r} {where} "
            f"({len(missing)} missing, {len(extra)} unexpected); compute the {what} for the same "
            "parameters (e.g. shared_parameters(model))"
        )
    for key, theta in params.items():
        if tuple(other[key].shape) != tuple(theta.shape):
            raise ConfigError(
                f"Expected the EWC {what} {key!r} to have shape {tuple(theta.shape)}, but got "
                f"{tuple(other[key].shape)}; the {what} was computed for another model configuration"
            )


def _check_terms(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]
) -> None:
    if not params:
        raise ConfigError("Expected at least one parameter for the EWC penalty, but got none")
    _check_same_layout(params, anchor, "anchor")
    _check_same_layout(params, fisher, "Fisher diagonal")
    for key, theta in params.items():
        if anchor[key].data_ptr() == theta.data_ptr() and theta.numel() > 0:
            raise ConfigError(
                f"Expected the EWC anchor to be a copy of the parameters, but {key!r} shares memory with "
                "the parameter (the penalty would always be 0); clone it: {k: v.detach().clone()}"
            )
    _check_fisher_values(fisher)
    device = next(iter(params.values())).device
    finite = torch.stack([torch.isfinite(a).all().to(device) for a in anchor.values()])
    if not bool(finite.all()):
        key = next(k for k, a in anchor.items() if not bool(torch.isfinite(a).all()))
        raise ConfigError(
            f"Expected the EWC anchor to be finite, but {key!r} has NaN or infinite values; "
            "use the validated global adapters as the anchor"
        )


def _check_fisher_values(fisher: Mapping[str, Tensor]) -> None:
    """Every entry finite and >= 0; one device sync when all is well."""
    if not fisher:
        return
    device = next(iter(fisher.values())).device
    ok = torch.stack([(torch.isfinite(f) & (f >= 0)).all().to(device) for f in fisher.values()])
    if bool(ok.all()):
        return
    key, f = next((k, f) for k, f in fisher.items() if not bool((torch.isfinite(f) & (f >= 0)).all()))
    raise ConfigError(
        f"Expected the Fisher diagonal to be finite and >= 0, but {key!r} has "
        f"{int((~torch.isfinite(f)).sum())} non-finite and {int((f < 0).sum())} negative entries; "
        "re-estimate it (private_fisher_diagonal clamps its noisy estimate at 0)"
    )


# ---------------------------------------------------------------------------- penalty
def ewc_penalty(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float
) -> Tensor:
    """``(lam / 2) * sum_i F_i * (theta_i - anchor_i) ** 2``, differentiable in ``params``.

    ``anchor`` and ``fisher`` must have the keys and shapes of ``params``; the
    anchor must be a copy (``shared_state_dict()`` returns views of the live
    parameters: clone them), and the Fisher finite and >= 0.
    """
    lam = check_lambda(lam)
    _check_terms(params, anchor, fisher)
    terms = []
    for key, theta in params.items():
        diff = theta - anchor[key].to(device=theta.device, dtype=theta.dtype)
        terms.append((fisher[key].to(device=theta.device, dtype=theta.dtype) * diff * diff).sum())
    device = next(iter(params.values())).device
    return 0.5 * lam * torch.stack([t.to(device) for t in terms]).sum()


@torch.no_grad()
def ewc_gradient(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float
) -> dict[str, Tensor]:
    """The gradient of :func:`ewc_penalty` in closed form: ``lam * F * (theta - anchor)`` per key."""
    lam = check_lambda(lam)
    _check_terms(params, anchor, fisher)
    out = {}
    for key, theta in params.items():
        diff = theta.detach() - anchor[key].to(device=theta.device, dtype=theta.dtype)
        out[key] = lam * fisher[key].to(device=theta.device, dtype=theta.dtype) * diff
    return out


def unit_fisher(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``F = 1`` everywhere (``fisher_source="none"``): EWC becomes a plain L2 pull to the anchor."""
    return {k: torch.ones_like(v.detach()) for k, v in params.items()}


def shared_parameters(model: FedshiftModel) -> dict[str, nn.Parameter]:
    """The live shared parameters, keyed like ``model.shared_state_dict()`` (and ``named_parameters``)."""
    named = dict(model.named_parameters())
    keys = list(model.shared_state_dict())
    unknown = [k for k in keys if k not in named]
    if unknown:
        raise ConfigError(
            f"Expected every shared tensor to be a parameter of the model, but {unknown[0]!r} is not; "
            "the model's shared_state_dict() and named_parameters() disagree"
        )
    return {k: named[k] for k in keys}


class EWCTerm:
    """The EWC gradient as a data-independent gradient term for :func:`~fedshift.client.training.train_local`.

    Added to the gradient *after* DP-SGD's clipping and noise (adding the penalty
    to the loss would be clipped per sample, and Opacus would drop it), so it
    costs no privacy as long as the Fisher is public or was released under DP.
    """

    def __init__(
        self, model: FedshiftModel, anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float
    ) -> None:
        self.params = shared_parameters(model)
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.fisher = {k: v.detach().clone() for k, v in fisher.items()}
        self.lam = check_lambda(lam)
        _check_terms(self.params, self.anchor, self.fisher)  # once; the loop calls the unchecked path

    def __call__(self) -> dict[nn.Parameter, Tensor]:
        out = {}
        for key, theta in self.params.items():
            anchor = self.anchor[key].to(device=theta.device, dtype=theta.dtype)
            fisher = self.fisher[key].to(device=theta.device, dtype=theta.dtype)
            out[theta] = self.lam * fisher * (theta.detach() - anchor)
        return out


# ---------------------------------------------------------------------------- Fisher estimation
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
    std = float(noise_multiplier) * float(clip)
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
    logger.debug("private Fisher: %d of %d per-image terms clipped to %g", clipped, n, clip)
    return FisherRelease(
        fisher=fisher,
        noise_multiplier=float(noise_multiplier),
        sample_rate=1.0,
        steps=1,
        clip=float(clip),
        n=n,
    )


# ---------------------------------------------------------------------------- consolidation
def consolidate(
    fisher_a: Mapping[str, Tensor], fisher_b: Mapping[str, Tensor], weight_a: float, weight_b: float
) -> dict[str, Tensor]:
    """``weight_a * F_a + weight_b * F_b`` per key: the Fisher of two phases combined.

    Weights ``(0.5, 0.5)`` average two estimates; ``(gamma, 1)`` is online EWC's
    decayed running Fisher. A combination of public or DP Fishers stays public
    or DP (post-processing).
    """
    for name, w in (("weight_a", weight_a), ("weight_b", weight_b)):
        if not (is_number(w) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"Expected {name} to be a finite number >= 0, but got {w!r}")
    if weight_a == 0 and weight_b == 0:
        raise ConfigError("Expected at least one consolidation weight > 0, but both are 0")
    _check_same_layout(fisher_a, fisher_b, "Fisher diagonal")
    _check_fisher_values(fisher_a)
    _check_fisher_values(fisher_b)
    return {k: weight_a * fisher_a[k] + weight_b * fisher_b[k].to(fisher_a[k]) for k in fisher_a}


# ---------------------------------------------------------------------------- at a site
FISHER_PUBLIC = "public (synthetic images)"
FISHER_LOCAL = "local (dp=false at this site)"


def site_fisher(
    config: EWCConfig,
    model: FedshiftModel,
    train_images: np.ndarray,
    *,
    private: bool,
    seed: int,
    secure_rng: bool = False,
) -> tuple[dict[str, Tensor], str, FisherRelease | None]:
    """The Fisher diagonal a site uses this round, where it came from, and its DP release (if any).

    ``none``: F = 1. ``public``: estimated on SYNTHETIC chest X-rays (no patient data,
    no privacy cost). ``dp``: estimated on up to ``fisher_samples`` of the site's
    training images and released by the Gaussian mechanism, which the caller must
    have charged to the ledger first (:attr:`FisherRelease.mechanism`); at a site
    that trains without DP (``dp=false``) it is estimated on local data without
    noise, since nothing it shapes is protected anyway, and labelled so.
    """
    params = shared_parameters(model)
    size = model.config.image_size
    if config.fisher_source == "none":
        return unit_fisher(params), "none", None
    generator = torch.Generator().manual_seed(seed)
    if config.fisher_source == "public":
        images = make_synthetic_cxr(config.fisher_samples, seed=seed).split("train").images
        fisher = fisher_diagonal(
            model, params, to_tensor(images, size), labels=config.fisher_labels, generator=generator
        )
        return fisher, FISHER_PUBLIC, None
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(train_images))[: config.fisher_samples]
    inputs = to_tensor(train_images[np.sort(chosen)], size)
    if not private:
        fisher = fisher_diagonal(model, params, inputs, labels=config.fisher_labels, generator=generator)
        return fisher, FISHER_LOCAL, None
    release = private_fisher_diagonal(
        model,
        params,
        inputs,
        clip=config.fisher_clip,
        noise_multiplier=config.fisher_noise_multiplier,
        labels=config.fisher_labels,
        generator=generator,
        noise_source=SecureSource() if secure_rng else SeededSource(seed),
    )
    return release.fisher, "dp", release


def fisher_mechanism(config: EWCConfig) -> Mechanism:
    """What one DP Fisher release costs, in the ledger's form: a Gaussian mechanism (q = 1, one step)."""
    return (config.fisher_noise_multiplier, 1.0, 1)
