"""Calibration of a model's logits on a labelled split: temperature, bias-corrected temperature, vector.

Each map is ``probs = softmax(weights * logits + bias)``, fitted by minimum
(optionally sample-weighted, optionally shrunk) NLL with L-BFGS-B and an exact
gradient; the registry :data:`CALIBRATORS` names the kinds. Bias-corrected
temperature scaling (BCTS) followed by EM is hard to beat for label-shift
adaptation (Alexandari et al. 2020). Pure numpy and scipy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from fedshift.common.errors import ConfigError, DataError
from fedshift.common.label_shift import as_labels, as_logits, as_prior, as_probs

logger = logging.getLogger(__name__)

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2  # box for T in TS/BCTS (separable data would send T -> 0)


@dataclass(frozen=True, eq=False)
class Calibration:
    """A fitted calibration map ``probs = softmax(weights * logits + bias)``."""

    kind: str  # "identity", "ts" (temperature), "bcts" (bias-corrected temperature) or "vs" (vector)
    weights: np.ndarray  # (C,) per-class multiplier of the logits; 1/T in every entry for TS and BCTS
    bias: np.ndarray  # (C,) added after scaling; zeros for TS; centred to mean 0 (softmax ignores shifts)
    fit_nll: float  # mean (sample-weighted, if fitted with weights) NLL on its split after calibration

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    @property
    def temperature(self) -> float:
        """``T`` for identity/TS/BCTS; ``nan`` for VS, whose per-class weights differ."""
        if self.kind == "vs":
            return math.nan
        return float(1.0 / self.weights[0])

    @classmethod
    def identity(cls, num_classes: int) -> Calibration:
        """The map that leaves ``softmax(logits)`` unchanged."""
        return cls("identity", np.ones(num_classes), np.zeros(num_classes), math.nan)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` for logits ``(N, C)``."""
        arr = as_logits(logits)
        if arr.shape[1] != self.num_classes:
            raise DataError(
                f"Expected logits with {self.num_classes} columns (the calibration's classes), but got "
                f"{arr.shape[1]}; fit the calibration on the same model head"
            )
        return np.asarray(softmax(arr * self.weights + self.bias, axis=1))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood ``-mean_i log probs[i, labels[i]]`` (probabilities clipped at eps)."""
    arr = as_probs(probs)
    y = as_labels(labels, arr.shape[0], arr.shape[1])
    eps = np.finfo(np.float64).eps
    picked = np.clip(arr[np.arange(arr.shape[0]), y], eps, 1.0)
    return float(-np.mean(np.log(picked)))


def _as_sample_weight(sample_weight: np.ndarray | None, n: int) -> np.ndarray:
    """Weights normalised to mean 1 (``None`` -> all ones); finite, >= 0, not all zero."""
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise DataError(
            f"Expected sample_weight of shape ({n},) with finite entries >= 0 and a positive sum, but got "
            f"shape {w.shape}; pass one weight per sample, e.g. prior_weights(labels, target, own)"
        )
    return w * (n / w.sum())


def prior_weights(labels: np.ndarray, target_prior: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights ``target(y) / empirical(y)``: the labelled split reweighted to ``target_prior``.

    Calibrating with these weights fits the map under ``target_prior`` (e.g. the
    model's training prior) instead of the split's own label mix, so the
    calibration does not absorb the site's prior (which EM is to estimate).
    Every class of ``target_prior`` must occur in ``labels``.
    """
    target = as_prior(target_prior, num_classes, "target_prior")
    raw = np.asarray(labels)
    y = as_labels(raw, raw.shape[0] if raw.ndim >= 1 else 0, num_classes)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if counts.min() <= 0:
        missing = np.flatnonzero(counts <= 0).tolist()
        raise DataError(
            f"Expected every class among the labels to reweight them, but class(es) {missing} have none; "
            "calibrate without reweighting or on a split with both classes"
        )
    empirical = counts / counts.sum()
    return np.asarray((target / empirical)[y])


def _fit_scaling(
    logits: np.ndarray,
    labels: np.ndarray,
    kind: str,
    sample_weight: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> Calibration:
    """Minimise the (weighted) NLL of ``softmax(w * logits + b)`` with L-BFGS-B and an exact gradient.

    ``shrinkage`` adds ``shrinkage / n * ||theta - identity||²`` (``theta``: log T
    and the bias; for VS the weights minus 1 and the bias), a Gaussian prior
    worth about ``shrinkage`` samples: on a small, separable split the plain
    NLL drives ``T`` to its lower bound (saturated, tied probabilities).
    """
    z = as_logits(logits)
    n, c = z.shape
    y = as_labels(labels, n, c)
    sw = _as_sample_weight(sample_weight, n)[:, None]
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    if not (math.isfinite(shrinkage) and shrinkage >= 0):
        raise ConfigError(f"Expected a calibration shrinkage >= 0, but got {shrinkage!r}; e.g. 1.0 or 0")
    size = 2 * c if kind == "vs" else (1 + c if kind == "bcts" else 1)
    identity = np.concatenate([np.ones(c), np.zeros(c)]) if kind == "vs" else np.zeros(size)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if kind == "vs":
            return theta[:c], theta[c:]
        w = np.full(c, math.exp(-theta[0]))  # T = exp(t), scale = 1 / T
        return w, (theta[1:] if kind == "bcts" else np.zeros(c))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = unpack(theta)
        logp = log_softmax(z * w + b, axis=1)
        loss = -float(np.sum(sw * logp * onehot)) / n
        g = sw * (np.exp(logp) - onehot) / n  # d loss / d scores
        if kind == "vs":
            grad = np.concatenate([np.sum(g * z, axis=0), np.sum(g, axis=0)])
        else:
            d_t = -float(np.sum(g * z)) * w[0]  # d scores / d t = -z / T
            grad = np.concatenate([[d_t], np.sum(g, axis=0)]) if kind == "bcts" else np.array([d_t])
        if shrinkage:
            offset = theta - identity
            loss += shrinkage / n * float(np.sum(offset**2))
            grad = grad + 2.0 * shrinkage / n * offset
        return loss, grad

    theta0, bounds = _start_and_bounds(kind, c)
    before, _ = objective(theta0)
    result = minimize(
        objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 1000}
    )
    w, b = unpack(np.asarray(result.x))
    b = b - b.mean()
    after = float(result.fun)
    if not result.success:
        logger.warning("%s calibration: L-BFGS-B stopped early (%s)", kind.upper(), result.message)
    logger.info("Fitted %s calibration on %d samples: NLL %.4f -> %.4f", kind.upper(), n, before, after)
    return Calibration(kind, np.array(w, dtype=np.float64), np.array(b, dtype=np.float64), after)


def _start_and_bounds(kind: str, c: int) -> tuple[np.ndarray, list[tuple[float | None, float | None]]]:
    """The identity map as L-BFGS-B's start, and the box (``log T`` within its bounds; the rest free)."""
    if kind == "vs":
        theta0 = np.concatenate([np.ones(c), np.zeros(c)])
        bounds: list[tuple[float | None, float | None]] = [(None, None)] * (2 * c)
    else:
        t_box = (math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))
        theta0 = np.zeros(1 + c) if kind == "bcts" else np.zeros(1)
        bounds = [t_box] + [(None, None)] * (c if kind == "bcts" else 0)
    return theta0, bounds


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> Calibration:
    """Temperature scaling: ``softmax(logits / T)``, ``T = exp(t)`` in [1e-2, 1e2], by minimum NLL."""
    return _fit_scaling(logits, labels, "ts", sample_weight, shrinkage)


def fit_bcts(
    logits: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> Calibration:
    """Bias-corrected temperature scaling: ``softmax(logits / T + b)``, ``b`` per class, by minimum NLL.

    Alexandari et al. (2020) show BCTS + EM is hard to beat for label-shift adaptation:
    the per-class bias removes the systematic class bias that EM would otherwise
    read as a prior shift.
    """
    return _fit_scaling(logits, labels, "bcts", sample_weight, shrinkage)


def fit_vector_scaling(
    logits: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> Calibration:
    """Vector scaling: ``softmax(w * logits + b)``, ``w`` and ``b`` per class, by minimum NLL."""
    return _fit_scaling(logits, labels, "vs", sample_weight, shrinkage)


CALIBRATORS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None, float], Calibration]] = {
    "ts": fit_temperature,
    "bcts": fit_bcts,
    "vs": fit_vector_scaling,
}


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    kind: str = "bcts",
    sample_weight: np.ndarray | None = None,
    shrinkage: float = 0.0,
) -> Calibration:
    """Fit the calibration registered as ``kind`` (``"ts"``, ``"bcts"``, ``"vs"``).

    ``sample_weight`` (one per row) weights the NLL, e.g. :func:`prior_weights`
    to calibrate under another label prior than the split's own; ``shrinkage``
    pulls the map towards the identity (see :func:`_fit_scaling`).
    """
    try:
        fit = CALIBRATORS[kind]
    except KeyError:
        raise ConfigError(
            f"Expected the calibration to be one of {sorted(CALIBRATORS)}, but got {kind!r}; "
            "use 'bcts' unless you have a reason not to"
        ) from None
    return fit(logits, labels, sample_weight, shrinkage)
