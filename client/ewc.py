"""Elastic Weight Consolidation (EWC) for the shared adapters: a quadratic pull towards an anchor.

The penalty is ``(lam / 2) * sum_i F_i * (theta_i - anchor_i) ** 2``, with
``theta`` the shared adapter tensors, ``anchor`` the tensors to stay close to
(the global adapters of this round, or parameters consolidated after an earlier
phase) and ``F`` a diagonal estimate of the Fisher information: how much the
model's predictions depend on each coordinate.

Pure math lives in functions (:func:`ewc_penalty`, :func:`ewc_gradient`, :func:`consolidate`;
the Fisher estimates are :mod:`fedshift.client.fisher`); :class:`EWCConfig` only holds the settings.

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
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fedshift.client.dp import SecureSource, SeededSource
from fedshift.client.fisher import (
    FisherRelease,
    fisher_diagonal,
    private_fisher_diagonal,
)
from fedshift.common.config import EWCConfig, check_lambda, is_number
from fedshift.common.data import make_synthetic_cxr, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism
from fedshift.common.synthetic_colour import make_synthetic_colour

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
    channels = model.config.in_chans
    if config.fisher_source == "public":  # public images of the model's kind: SYNTHETIC X-rays or H&E patches
        make = make_synthetic_colour if channels == 3 else make_synthetic_cxr
        images = make(config.fisher_samples, seed=seed).split("train").images
        fisher = fisher_diagonal(
            model, params, to_tensor(images, size, channels), labels=config.fisher_labels, generator=generator
        )
        return fisher, FISHER_PUBLIC, None
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(train_images))[: config.fisher_samples]
    inputs = to_tensor(train_images[np.sort(chosen)], size, channels)
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
