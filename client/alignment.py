"""Domain alignment at a site: a feature-alignment loss, DP feature moments, test-time norm statistics.

**Where features are compared.** The pooled backbone features (the head's
input, ``D`` = 1280 for EfficientNet-Lite0) are projected on ``k`` fixed random
orthonormal directions (:func:`projection`, seeded by the run's seed: public,
the same at every site). Moments in ``k`` dimensions can be released with far
less noise than in ``D``.

**DP moments** (:func:`private_moments`). Each projected feature vector ``g`` is
clipped to L2 norm ``R``; the site releases ``Σ g`` and ``Σ g gᵀ`` with Gaussian
noise. One patient changes the vector ``(g, vec(g gᵀ) / R)`` by at most
``sqrt(R² + R⁴ / R²) = sqrt(2) R`` in L2 norm, so noise of std
``sigma * sqrt(2) * R`` on ``Σ g`` (and ``R`` times that on ``Σ g gᵀ``) is one
Gaussian mechanism with noise multiplier ``sigma`` (q = 1, one step), charged
as ``dp-moments``. The server adds the sites' releases into global moments
(:func:`fedshift.common.shift_statistics.aggregate_moments`).

**The alignment loss** (:class:`AlignmentLoss`). In coordinates centred on the
global mean and scaled by the global variance per direction,
``u = (g - mu_g) / sqrt(s)`` with ``s = tr(Cov_g) / k`` (one public scalar), the
site's discrepancy is ``L = (||Cov(u) - T||_F² + ||E u||²) / k`` with
``T = Cov_g / s``: CORAL plus a mean term. Nothing is inverted, so the DP noise
in ``Cov_g`` (comparable to the small directions' variance at realistic sizes)
enters the target linearly and unbiased instead of being blown up by a
whitening. ``L`` couples the samples of a batch, which DP-SGD's per-sample
clipping cannot take, so the loss is written as a *sum of per-sample terms*
whose gradient equals ``dL/dθ`` at a linearisation point ``(E u, E u uᵀ)``:
``l_i = u_iᵀ G u_i + aᵀ u_i`` with ``G = dL/dE[uuᵀ]`` and ``a = dL/dE[u]``.
Without DP the point is the batch's own (detached) moments, which gives Deep
CORAL's gradient exactly; with DP-SGD it is the site's DP moment release of
this round (charged as ``dp-moments``; post-processing from then on), so each
sample's term depends on that sample alone.

**Site-local norms.** The norm affines of the adapted stages are site-local and
trained under DP-SGD with everything else; their *statistics* stay the frozen
pretrained ones during training (no data access). Test-time adaptation of those
statistics is :mod:`fedshift.client.norm_adaptation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedshift.client.dp import RandomSource
from fedshift.client.training import Objective, batched_outputs, cross_entropy
from fedshift.common.errors import DataError, PrivacyError
from fedshift.common.label_shift import logit_adjustment
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.shift_statistics import GlobalStatistics

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- features


def projection(num_features: int, dim: int, seed: int) -> np.ndarray:
    """``(num_features, dim)`` with orthonormal columns, from a seeded Gaussian (public)."""
    if not 1 <= dim <= num_features:
        raise DataError(f"Expected align-dim in [1, {num_features}], but got {dim}; use e.g. 16")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    q, r = np.linalg.qr(rng.normal(size=(num_features, dim)))
    return np.asarray(q * np.sign(np.diag(r)))


def feature_matrix(
    model: FedshiftModel, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """The pooled features that enter the head, ``(N, D)``, in eval mode."""
    width = int(model.head.in_features)
    return batched_outputs(model, images, device, model.forward_features, width, batch_size)


# ----------------------------------------------------------------------------- DP moments


@dataclass(frozen=True, eq=False)
class MomentRelease:
    """Per-class ``Σ g`` and a second moment (per-class ``Σ ||g||²`` or the marginal ``Σ g gᵀ``) of
    clipped projected features, released by the Gaussian mechanism."""

    class_sums: np.ndarray  # (C, k) noisy sum of the clipped vectors of each class
    class_squares: np.ndarray | None  # (C,) noisy sum of their squared norms (prototype loss)
    outer: np.ndarray | None  # (k, k) noisy sum of all outer products, symmetrised (CORAL)
    n: int  # samples (public, like the training-set size the site reports)
    noise_multiplier: float  # sigma
    clip: float  # R, the L2 bound of one projected vector

    @property
    def mechanism(self) -> Mechanism:
        return moment_mechanism(self.noise_multiplier)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Marginal ``(E g, E g gᵀ)`` estimated from the release (post-processing; needs ``outer``)."""
        if self.outer is None:
            raise DataError("Expected a release with outer products for marginal moments, but it has none")
        n = max(self.n, 1)
        return self.class_sums.sum(axis=0) / n, self.outer / n


def moment_mechanism(noise_multiplier: float) -> Mechanism:
    """What one moment release costs in the ledger's form (a Gaussian mechanism, q = 1, one step)."""
    return (float(noise_multiplier), 1.0, 1)


def clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled to L2 norm <= ``clip``."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x * np.minimum(1.0, clip / np.maximum(norms * (1 + 1e-12), 1e-300)))


MOMENT_SENSITIVITY_FACTOR = math.sqrt(2.0)


def moment_sensitivity(clip: float) -> float:
    """L2 sensitivity of a moment release: ``sqrt(2) R``.

    One patient adds ``g`` (``||g|| <= R``) to exactly one class's sum, and a
    second moment scaled by ``1 / R``: ``||g||² / R <= R`` to its class's squared
    norms, or ``g gᵀ / R`` (Frobenius norm ``||g||² / R <= R``) to the outer
    products. Together ``sqrt(R² + R²)``.
    """
    return float(clip) * MOMENT_SENSITIVITY_FACTOR


def private_moments(
    projected: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    clip: float,
    noise_multiplier: float,
    source: RandomSource,
    *,
    outer: bool = False,
) -> MomentRelease:
    """The Gaussian mechanism on the per-class sums of the rows of ``projected`` clipped to ``clip``,
    and on the per-class sums of squared norms (or, with ``outer``, on ``Σ g gᵀ``), both divided by ``R``.

    Every coordinate gets noise of std ``noise_multiplier * moment_sensitivity``
    (times ``R`` on the second moments once scaled back); the outer-product sum
    is symmetrised afterwards (post-processing). Charge
    :attr:`MomentRelease.mechanism` first.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyError(
            f"Expected a moment noise multiplier > 0, but got {noise_multiplier!r}; feature moments leave "
            "a site only with noise (set align-noise-multiplier, e.g. 3.0)"
        )
    if not (math.isfinite(clip) and clip > 0):
        raise PrivacyError(f"Expected a moment clip > 0, but got {clip!r}; set align-clip, e.g. 1.0")
    g = clip_rows(np.asarray(projected, dtype=np.float64), clip)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.shape[0] != g.shape[0] or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise DataError(
            f"Expected one label in [0, {num_classes}) per feature row ({g.shape[0]}), but got {y.shape[0]}"
        )
    k = g.shape[1]
    std = float(noise_multiplier) * moment_sensitivity(clip)

    def noise(*shape: int) -> np.ndarray:
        return np.asarray(source.normal(std, torch.zeros(shape, dtype=torch.float64)).cpu().numpy())

    sums = np.zeros((num_classes, k))
    np.add.at(sums, y, g)
    sums += noise(num_classes, k)
    squares, released_outer = None, None
    if outer:
        total = g.T @ g + clip * noise(k, k)
        released_outer = (total + total.T) / 2
    else:
        squares = np.bincount(y, weights=np.sum(g**2, axis=1), minlength=num_classes) + clip * noise(
            num_classes
        )
    return MomentRelease(
        class_sums=sums,
        class_squares=squares,
        outer=released_outer,
        n=int(g.shape[0]),
        noise_multiplier=float(noise_multiplier),
        clip=float(clip),
    )


# ----------------------------------------------------------------------------- the loss


def global_scale(cov: np.ndarray) -> float:
    """``s = tr(cov) / k``: the mean variance per direction (floored at a tiny positive number)."""
    return max(float(np.trace(cov)) / cov.shape[0], 1e-12)


class AlignmentLoss:
    """Per-sample CORAL + mean alignment towards the global moments (see the module docstring).

    ``point`` is the linearisation point in raw projected coordinates,
    ``(E g, E g gᵀ)``; ``None`` uses each batch's own detached moments (non-DP only).
    """

    def __init__(
        self,
        projection_matrix: np.ndarray,
        global_mean: np.ndarray,
        global_cov: np.ndarray,
        weight: float,
        point: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.k = projection_matrix.shape[1]
        self.weight = float(weight)
        scale = global_scale(global_cov)
        self._proj = torch.as_tensor(projection_matrix, dtype=torch.float32)
        self._mean = torch.as_tensor(global_mean, dtype=torch.float32)
        self._inv_sqrt_scale = 1.0 / math.sqrt(scale)
        self._target = torch.as_tensor((global_cov + global_cov.T) / (2 * scale), dtype=torch.float32)
        self._point: tuple[torch.Tensor, torch.Tensor] | None = None
        if point is not None:
            m_raw, second_raw = point
            mu = np.asarray(global_mean, dtype=np.float64)
            centred = second_raw - np.outer(m_raw, mu) - np.outer(mu, m_raw) + np.outer(mu, mu)
            m = (m_raw - mu) / math.sqrt(scale)
            s = centred / scale
            self._point = (torch.as_tensor(m, dtype=torch.float32), torch.as_tensor(s, dtype=torch.float32))

    def scaled(self, features: torch.Tensor) -> torch.Tensor:
        """``u = (P f - mu_g) / sqrt(s)`` per row."""
        dev = features.device
        g = features.float() @ self._proj.to(dev)
        return (g - self._mean.to(dev)) * self._inv_sqrt_scale

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        z = self.scaled(features)
        k = self.k
        if self._point is None:
            zd = z.detach()
            m = zd.mean(dim=0)
            s = zd.T @ zd / max(len(zd), 1)
        else:
            m, s = (t.to(z.device) for t in self._point)
        target = self._target.to(z.device)
        cov = s - torch.outer(m, m)
        g_mat = 2.0 * (cov - target) / k  # dL / dE[u uᵀ]
        a = -2.0 * g_mat @ m + 2.0 * m / k  # dL / dE[u]
        value = (torch.sum((cov - target) ** 2) + torch.sum(m**2)) / k
        constant = value - (torch.sum(g_mat * s) + a @ m)  # the terms' mean equals L at the point
        terms = torch.einsum("ni,ij,nj->n", z, g_mat, z) + z @ a + constant
        return self.weight * terms


class PrototypeLoss:
    """Class-conditional alignment: ``w ||P f_i - mu_{y_i}||² / (k s)`` per sample, exactly per-sample.

    ``mu_c`` are the global class means of the projected features (from the
    sites' DP per-class sums and DP label counts), ``s`` the global within-class
    variance per direction (from the DP squared norms): a site whose class-``c``
    features sit where everyone's do pays about 1 per sample. Pulling
    every site's class-``c`` features to the same global ``mu_c`` aligns the
    class-conditional feature distributions across scanners without aligning the
    marginals, which would also erase the label shift the sites legitimately
    have (Zhao et al. 2019). Each sample's term depends on it alone: DP-SGD as is.
    """

    def __init__(
        self, projection_matrix: np.ndarray, class_means: np.ndarray, within_var: float, weight: float
    ) -> None:
        self.k = class_means.shape[1]
        self.scale = max(float(within_var), 1e-12)
        self.weight = float(weight)
        self._proj = torch.as_tensor(projection_matrix, dtype=torch.float32)
        self._means = torch.as_tensor(class_means, dtype=torch.float32)

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        g = features.float() @ self._proj.to(features.device)
        centre = self._means.to(features.device)[labels]
        return self.weight * torch.sum((g - centre) ** 2, dim=1) / (self.k * self.scale)


AlignTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (features, labels) -> (N,)


def _alignment_term(
    shift: ShiftConfig,
    stats: GlobalStatistics | None,
    projection_matrix: np.ndarray | None,
    point: tuple[np.ndarray, np.ndarray] | None,
) -> AlignTerm | None:
    """The configured alignment loss, or ``None`` when its global statistics are missing."""
    if stats is None or (stats.class_means is None and stats.moment_cov is None):
        return None
    if projection_matrix is None:
        raise DataError("Expected a projection matrix for the alignment loss, but got None")
    if shift.align_loss == "prototype" and stats.class_means is not None and stats.within_var is not None:
        return PrototypeLoss(projection_matrix, stats.class_means, stats.within_var, shift.align_weight)
    if shift.align_loss == "coral" and stats.moment_mean is not None and stats.moment_cov is not None:
        coral = AlignmentLoss(
            projection_matrix, stats.moment_mean, stats.moment_cov, shift.align_weight, point
        )

        def marginal(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            del labels
            return coral(features)

        return marginal
    return None


def site_objective(
    shift: ShiftConfig,
    stats: GlobalStatistics | None,
    *,
    projection_matrix: np.ndarray | None = None,
    point: tuple[np.ndarray, np.ndarray] | None = None,
    site: str = "site",
) -> Objective:
    """The per-sample training objective: cross-entropy, logit-adjusted and/or plus alignment.

    A part whose global statistics are missing (the site was left out of the
    statistics stage) is left out, with a warning.
    """
    adjust: torch.Tensor | None = None
    align: AlignTerm | None = None
    if shift.logit_adjust > 0:
        if stats is not None and stats.train_prior is not None:
            adjust = torch.as_tensor(
                logit_adjustment(stats.train_prior, shift.logit_adjust), dtype=torch.float32
            )
        else:
            logger.warning(
                "%s: no global training prior for this run: training without logit adjustment", site
            )
    if shift.align:
        align = _alignment_term(shift, stats, projection_matrix, point)
        if align is None:
            logger.warning("%s: no global feature moments for this run: training without alignment", site)
    if adjust is None and align is None:
        return cross_entropy

    def objective(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = logits + adjust.to(logits.device, logits.dtype) if adjust is not None else logits
        loss = nn.functional.cross_entropy(shifted, labels, reduction="none")
        return loss + align(features, labels) if align is not None else loss

    return objective
