"""Label-shift math: calibration, target-prior estimation, posterior correction, thresholds.

Pure functions over numpy arrays (no torch, no Flower); the client wraps them.

The setting: the shared model was trained on a mixture with class prior ``p_s(y)``;
a site sees the same class-conditional images ``p(x | y)`` but its own prior
``p_t(y)`` (label shift). The site estimates ``p_t`` from *unlabeled* local data
and corrects the model's posteriors, ``p_t(y | x) ∝ p_s(y | x) p_t(y) / p_s(y)``.

Pipeline (Alexandari et al. 2020, "Maximum likelihood with bias-corrected
calibration is hard-to-beat at label shift adaptation"):

1. Calibrate on a labelled validation split: :func:`fit_bcts` (bias-corrected
   temperature scaling), :func:`fit_temperature` or :func:`fit_vector_scaling`.
2. Estimate the target prior from calibrated posteriors of unlabeled data:
   :func:`em_prior` (Saerens, Latinne & Decaestecker 2002; maximum likelihood, or
   MAP under a Dirichlet prior with ``pseudocount > 0``, which keeps a rare class's
   estimate off 0 on small sites) or :func:`bbse_prior` (Lipton, Wang & Smola
   2018), guarded by :func:`estimate_prior`.
3. Correct: :func:`correct_posteriors`.

Which prior is "the source prior"? EM needs the prior under which ``probs`` are
calibrated posteriors: the label marginal of the split the calibration was fitted
on (usually that split's empirical class frequencies), not necessarily the
training mixture's prior. BBSE needs none: it takes the label marginal from the
column sums of the joint confusion matrix (see :func:`bbse_prior`).

Guard (:func:`estimate_prior`): an estimate is *not* applied, and the source prior
is returned with ``fallback=True``, a ``reason`` and a logged warning, when

* there are fewer than ``min_samples`` unlabeled samples;
* BBSE's confusion matrix has a class without labelled samples, or its
  class-conditional form ``P(ŷ | y)`` has a condition number above
  ``max_condition`` (singular: the predictions carry no information to invert);
* BBSE's importance weights are all negative (nothing left after clipping at 0);
* EM did not converge within ``max_iter`` iterations;
* any class prior of the estimate is below ``min_prior`` (default 1e-3): applying it
  would all but erase that class from every corrected posterior, which for a
  rare finding is worse than no correction;
* a bootstrap interval was requested and is wider than ``max_interval_width``
  (default 0.5) for some class: the data barely determine the prior.

Malformed input (NaN, wrong shapes, priors that are not distributions) raises
:class:`~fedshift.common.errors.DataError` instead: that is a bug upstream, not a
property of the site's data.
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

logger = logging.getLogger(__name__)

PRIOR_ATOL = 1e-6  # a prior must sum to 1 within this
ROW_ATOL = 1e-4  # each row of a probability matrix must sum to 1 within this (float32 softmax)
_TINY = np.finfo(np.float64).tiny
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2  # box for T in TS/BCTS (separable data would send T -> 0)


# ----------------------------------------------------------------------------- validation


def _as_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise DataError(
            f"Expected {name} of shape (N, C) with N >= 1 and C >= 2, but got shape {arr.shape}; "
            "pass one row of class scores per sample"
        )
    if not np.all(np.isfinite(arr)):
        raise DataError(
            f"Expected finite {name}, but got {int(np.sum(~np.isfinite(arr)))} NaN/inf entries; "
            "check the model output (diverged training or overflow) before calibrating"
        )
    return arr


def _as_labels(labels: np.ndarray, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(
            f"Expected {name} of shape ({n},), one per row of scores, but got shape {arr.shape}; "
            "pass one integer class index per sample"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise DataError(
                f"Expected integer class indices in {name}, but got non-integer values; "
                "pass class indices 0..C-1, not soft labels"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"Expected integer class indices in {name}, but got dtype {arr.dtype}; pass 0..C-1")
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(
            f"Expected {name} in [0, {num_classes}), but got values from {arr.min()} to {arr.max()}; "
            "the labels and the score columns disagree on the number of classes"
        )
    return arr


def _as_probs(probs: np.ndarray, name: str = "probs", *, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2 or (arr.shape[0] < 1 and not allow_empty):
        raise DataError(
            f"Expected {name} of shape (N, C) with N >= 1 and C >= 2, but got shape {arr.shape}; "
            "pass one row of class probabilities per sample (softmax of the logits)"
        )
    if not np.all(np.isfinite(arr)):
        raise DataError(
            f"Expected finite {name}, but got {int(np.sum(~np.isfinite(arr)))} NaN/inf entries; "
            "check the model output (diverged training or overflow)"
        )
    if arr.size and arr.min() < 0:
        raise DataError(
            f"Expected non-negative {name}, but got minimum {arr.min()!r}; pass softmax outputs, not logits"
        )
    if arr.size:
        worst = float(np.max(np.abs(arr.sum(axis=1) - 1.0)))
        if worst > ROW_ATOL:
            raise DataError(
                f"Expected each row of {name} to sum to 1 (within {ROW_ATOL:g}), but got a row off by "
                f"{worst:.3g}; pass softmax outputs, not logits or unnormalised scores"
            )
        arr = arr / arr.sum(axis=1, keepdims=True)
    return arr


def _as_prior(prior: np.ndarray, num_classes: int | None, name: str) -> np.ndarray:
    arr = np.asarray(prior, dtype=np.float64)
    expected = "(C,)" if num_classes is None else f"({num_classes},)"
    if arr.ndim != 1 or arr.shape[0] < 2 or (num_classes is not None and arr.shape[0] != num_classes):
        raise DataError(
            f"Expected {name} of shape {expected}, one entry per class, but got shape {arr.shape}; "
            "pass the class frequencies in the column order of the probabilities"
        )
    if not np.all(np.isfinite(arr)) or arr.min() <= 0:
        raise DataError(
            f"Expected {name} to be finite and > 0 for every class, but got {arr.tolist()}; "
            "a class with prior 0 cannot be reweighted: smooth the counts (e.g. add 1) first"
        )
    if abs(float(arr.sum()) - 1.0) > PRIOR_ATOL:
        raise DataError(
            f"Expected {name} to sum to 1 (within {PRIOR_ATOL:g}), but got sum {float(arr.sum())!r}; "
            "divide the counts by their total"
        )
    return arr / arr.sum()


# ----------------------------------------------------------------------------- calibration


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
        arr = _as_logits(logits)
        if arr.shape[1] != self.num_classes:
            raise DataError(
                f"Expected logits with {self.num_classes} columns (the calibration's classes), but got "
                f"{arr.shape[1]}; fit the calibration on the same model head"
            )
        return np.asarray(softmax(arr * self.weights + self.bias, axis=1))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood ``-mean_i log probs[i, labels[i]]`` (probabilities clipped at eps)."""
    arr = _as_probs(probs)
    y = _as_labels(labels, arr.shape[0], arr.shape[1])
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
    target = _as_prior(target_prior, num_classes, "target_prior")
    raw = np.asarray(labels)
    y = _as_labels(raw, raw.shape[0] if raw.ndim >= 1 else 0, num_classes)
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
    z = _as_logits(logits)
    n, c = z.shape
    y = _as_labels(labels, n, c)
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

    if kind == "vs":
        theta0 = np.concatenate([np.ones(c), np.zeros(c)])
        bounds: list[tuple[float | None, float | None]] = [(None, None)] * (2 * c)
    else:
        t_box = (math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))
        theta0 = np.zeros(1 + c) if kind == "bcts" else np.zeros(1)
        bounds = [t_box] + [(None, None)] * (c if kind == "bcts" else 0)
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


# ----------------------------------------------------------------------------- prior estimation


@dataclass(frozen=True, eq=False)
class PriorEstimate:
    """A target class prior estimated from unlabeled data, with how it was obtained."""

    prior: np.ndarray  # (C,) the prior to use: the estimate, or the source prior if fallback
    source_prior: np.ndarray  # (C,) the prior the posteriors were calibrated under
    method: str  # "em" or "bbse"
    n: int  # number of unlabeled samples it was estimated from
    iterations: int  # EM iterations run (0 for BBSE, which is closed-form)
    converged: bool  # EM met its tolerance (always True for a solvable BBSE)
    interval: tuple[np.ndarray, np.ndarray] | None = None  # per-class bootstrap (low, high); None if none
    fallback: bool = False  # True when the estimate was rejected and ``prior`` is the source prior
    reason: str = ""  # why it fell back; "" when it did not
    estimate: np.ndarray | None = None  # (C,) the estimator's raw output, kept even after a fallback

    @property
    def weights(self) -> np.ndarray:
        """Importance weights ``p_t(y) / p_s(y)`` that :func:`correct_posteriors` applies."""
        return self.prior / self.source_prior

    def correct(self, probs: np.ndarray) -> np.ndarray:
        """``probs`` (calibrated under the source prior) adjusted to this prior."""
        return correct_posteriors(probs, self.source_prior, self.prior)


def em_prior(
    probs: np.ndarray,
    source_prior: np.ndarray,
    max_iter: int = 1000,
    tol: float = 1e-8,
    pseudocount: float = 0.0,
) -> PriorEstimate:
    """Saerens, Latinne & Decaestecker (2002) EM estimate of the target prior, optionally MAP.

    Starting from ``p_t = p_s``, repeat: ``w = p_t / p_s``; reweight each row,
    ``r_i ∝ probs_i * w``; ``p_t = (sum_i r_i + a) / (n + C a)``; stop when
    ``max |Δp_t| < tol``. With ``pseudocount`` ``a = 0`` this is maximum
    likelihood for the prior when ``probs`` are calibrated posteriors under
    ``source_prior``; with ``a > 0`` it is the maximum a posteriori estimate under
    a symmetric Dirichlet(1 + a) prior on ``p_t`` (EM for MAP: the same E-step, the
    Dirichlet's pseudo-counts added in the M-step). The maximum likelihood estimate
    of a rare class from a few dozen images often sits on the boundary (a
    prevalence of 0.05 estimated as 0.008 from 60 images); ``a = 1`` (Laplace)
    keeps it off the boundary and matters little once ``n`` is in the hundreds.
    Never falls back; see :func:`estimate_prior`.
    """
    p = _as_probs(probs)
    ps = _as_prior(source_prior, p.shape[1], "source_prior")
    if max_iter < 1 or not tol > 0:
        raise ConfigError(f"Expected max_iter >= 1 and tol > 0, but got {max_iter!r} and {tol!r}")
    if not (math.isfinite(pseudocount) and pseudocount >= 0):
        raise ConfigError(
            f"Expected the prior pseudocount to be a finite number >= 0, but got {pseudocount!r}; "
            "use 1 (Laplace) or 0 (maximum likelihood)"
        )
    pt = ps.copy()
    converged = False
    iterations = 0
    n, c = p.shape
    while iterations < max_iter and not converged:
        w = pt / ps
        resp = w * (p.T @ (1.0 / np.maximum(p @ w, _TINY)))  # sum_i p_i * w / (p_i . w)
        new = (resp + pseudocount) / (n + c * pseudocount)
        converged = float(np.max(np.abs(new - pt))) < tol
        pt = new
        iterations += 1
    logger.debug("EM prior after %d iterations (converged=%s): %s", iterations, converged, pt)
    return PriorEstimate(pt, ps, "em", n, iterations, converged, estimate=pt.copy())


def confusion_joint(pred_labels: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Joint confusion ``C[i, j] = P(ŷ = i, y = j)``, estimated as counts / N (rows: predicted)."""
    pred = np.asarray(pred_labels)
    if pred.ndim != 1 or pred.shape[0] < 1:
        raise DataError(f"Expected pred_labels of shape (N,) with N >= 1, but got shape {pred.shape}")
    if num_classes < 2:
        raise DataError(f"Expected num_classes >= 2, but got {num_classes}; pass the model's class count")
    n = pred.shape[0]
    p = _as_labels(pred, n, num_classes, "pred_labels")
    y = _as_labels(labels, n, num_classes)
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (p, y), 1.0)
    return joint / n


def prediction_marginal(probs: np.ndarray) -> np.ndarray:
    """``μ̂[i]``: the fraction of rows whose argmax (hard prediction) is class ``i``."""
    p = _as_probs(probs)
    return np.bincount(p.argmax(axis=1), minlength=p.shape[1]) / p.shape[0]


def _fallback(
    source_prior: np.ndarray,
    method: str,
    n: int,
    reason: str,
    *,
    iterations: int = 0,
    converged: bool = False,
    interval: tuple[np.ndarray, np.ndarray] | None = None,
    estimate: np.ndarray | None = None,
) -> PriorEstimate:
    logger.warning("Label shift (%s, n=%d): keeping the source prior: %s", method, n, reason)
    return PriorEstimate(
        source_prior.copy(), source_prior, method, n, iterations, converged, interval, True, reason, estimate
    )


def bbse_prior(
    confusion: np.ndarray,
    predicted_marginal: np.ndarray,
    source_prior: np.ndarray,
    *,
    n: int = 0,
    max_condition: float = 100.0,
) -> PriorEstimate:
    """Lipton, Wang & Smola (2018) black-box shift estimate of the target prior.

    ``confusion[i, j] = P_s(ŷ = i, y = j)`` (from :func:`confusion_joint` on labelled
    data) and ``predicted_marginal[i] = P_t(ŷ = i)``. Solves ``C w = μ̂`` for the
    importance weights ``w``, clips them at 0 and returns ``w * p_s`` renormalised,
    where ``p_s`` is the label marginal of ``C`` (its column sums). That makes the
    estimate ``M^{-1} μ̂`` with ``M = P(ŷ | y)``, correct whatever prior the labelled
    split had; ``source_prior`` is the model's prior, returned on fallback and used
    for :attr:`PriorEstimate.weights`. ``n`` is recorded as the number of unlabeled
    samples behind ``μ̂``.

    Falls back to ``source_prior`` (``fallback=True``) when a class has no labelled
    samples, when ``cond(M) > max_condition`` (e.g. a classifier that always
    predicts one class), or when every weight is negative.
    """
    joint = np.asarray(confusion, dtype=np.float64)
    c = joint.shape[0] if joint.ndim == 2 else -1
    if joint.ndim != 2 or joint.shape != (c, c) or c < 2:
        raise DataError(
            f"Expected a square confusion matrix (C, C) with C >= 2, but got shape {joint.shape}; "
            "build it with confusion_joint"
        )
    if not np.all(np.isfinite(joint)) or joint.min() < 0 or abs(float(joint.sum()) - 1.0) > PRIOR_ATOL:
        raise DataError(
            f"Expected a joint confusion matrix of non-negative entries summing to 1, but got sum "
            f"{float(joint.sum())!r} and min {float(joint.min())!r}; divide the counts by N"
        )
    mu = _as_prior_like(predicted_marginal, c)
    ps = _as_prior(source_prior, c, "source_prior")
    label_marginal = joint.sum(axis=0)
    if label_marginal.min() <= 0:
        missing = np.flatnonzero(label_marginal <= 0).tolist()
        return _fallback(ps, "bbse", n, f"BBSE confusion has no labelled samples of class(es) {missing}")
    conditional = joint / label_marginal  # M[i, j] = P(ŷ = i | y = j)
    cond = float(np.linalg.cond(conditional))
    if not math.isfinite(cond) or cond > max_condition:
        return _fallback(
            ps,
            "bbse",
            n,
            f"BBSE confusion P(ŷ|y) is singular or ill-conditioned (condition number {cond:.3g} > "
            f"max_condition={max_condition:g}); the predictions carry too little class information",
        )
    w = np.linalg.solve(joint, mu)
    q = np.clip(w, 0.0, None) * label_marginal
    if q.sum() <= 0:
        return _fallback(ps, "bbse", n, f"BBSE importance weights are all negative ({w.tolist()})")
    q = q / q.sum()
    return PriorEstimate(q, ps, "bbse", n, 0, True, estimate=q.copy())


def _as_prior_like(vector: np.ndarray, c: int) -> np.ndarray:
    """A distribution that may contain zeros (a predicted marginal)."""
    arr = np.asarray(vector, dtype=np.float64)
    if arr.shape != (c,) or not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise DataError(
            f"Expected predicted_marginal of shape ({c},) with finite entries >= 0, but got "
            f"{arr.tolist() if arr.size <= 10 else arr.shape}; build it with prediction_marginal"
        )
    if abs(float(arr.sum()) - 1.0) > PRIOR_ATOL:
        raise DataError(
            f"Expected predicted_marginal to sum to 1, but got {float(arr.sum())!r}; divide counts by N"
        )
    return arr / arr.sum()


def bbse_from_data(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    target_probs: np.ndarray,
    source_prior: np.ndarray,
    *,
    max_condition: float = 100.0,
) -> PriorEstimate:
    """BBSE with hard (argmax) predictions: confusion from ``val_*``, ``μ̂`` from ``target_probs``."""
    vp = _as_probs(val_probs, "val_probs")
    tp = _as_probs(target_probs, "target_probs")
    if vp.shape[1] != tp.shape[1]:
        raise DataError(
            f"Expected val_probs and target_probs with the same classes, but got {vp.shape[1]} and "
            f"{tp.shape[1]} columns; score both with the same model"
        )
    joint = confusion_joint(vp.argmax(axis=1), val_labels, vp.shape[1])
    return bbse_prior(
        joint, prediction_marginal(tp), source_prior, n=tp.shape[0], max_condition=max_condition
    )


def bootstrap_interval(
    fn: Callable[[np.ndarray], np.ndarray],
    probs: np.ndarray,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class percentile bootstrap ``(low, high)`` of ``fn(probs)``, at level ``1 - alpha``.

    Resamples the rows of ``probs`` with replacement ``n_boot`` times, calls ``fn``
    (e.g. ``lambda p: em_prior(p, ps).prior``) on each resample and returns the
    ``alpha/2`` and ``1 - alpha/2`` quantiles per class. Only the unlabeled rows
    are resampled: for BBSE this ignores the uncertainty of the confusion matrix.
    """
    p = _as_probs(probs)
    if n_boot < 2 or not 0 < alpha < 1:
        raise ConfigError(
            f"Expected n_boot >= 2 and 0 < alpha < 1, but got n_boot={n_boot!r}, alpha={alpha!r}; "
            "use e.g. n_boot=200, alpha=0.05"
        )
    rng = np.random.default_rng(seed)
    n = p.shape[0]
    draws = np.stack([np.asarray(fn(p[rng.integers(0, n, size=n)]), dtype=np.float64) for _ in range(n_boot)])
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


Estimator = Callable[[np.ndarray], PriorEstimate]


def _em_estimator(
    source_prior: np.ndarray,
    val_probs: np.ndarray | None,
    val_labels: np.ndarray | None,
    max_iter: int,
    tol: float,
    max_condition: float,
    pseudocount: float,
) -> Estimator:
    return lambda p: em_prior(p, source_prior, max_iter=max_iter, tol=tol, pseudocount=pseudocount)


def _bbse_estimator(
    source_prior: np.ndarray,
    val_probs: np.ndarray | None,
    val_labels: np.ndarray | None,
    max_iter: int,
    tol: float,
    max_condition: float,
    pseudocount: float,
) -> Estimator:
    if val_probs is None or val_labels is None:
        raise ConfigError(
            "Expected val_probs and val_labels for method='bbse', but got None; pass the labelled "
            "validation split's probabilities and labels, or use method='em'"
        )
    vp = _as_probs(val_probs, "val_probs")
    joint = confusion_joint(vp.argmax(axis=1), val_labels, vp.shape[1])

    def estimate(p: np.ndarray) -> PriorEstimate:
        if p.shape[1] != joint.shape[0]:
            raise DataError(
                f"Expected probs with {joint.shape[0]} columns like val_probs, but got {p.shape[1]}; "
                "score both with the same model"
            )
        return bbse_prior(
            joint, prediction_marginal(p), source_prior, n=p.shape[0], max_condition=max_condition
        )

    return estimate


PRIOR_METHODS: dict[str, Callable[..., Estimator]] = {"em": _em_estimator, "bbse": _bbse_estimator}


def estimate_prior(
    probs: np.ndarray,
    source_prior: np.ndarray,
    method: str = "em",
    *,
    val_probs: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    bootstrap: int = 0,
    alpha: float = 0.05,
    seed: int = 0,
    min_samples: int = 50,
    min_prior: float = 1e-3,
    max_interval_width: float = 0.5,
    max_condition: float = 100.0,
    max_iter: int = 1000,
    tol: float = 1e-8,
    pseudocount: float = 0.0,
) -> PriorEstimate:
    """The site's target prior from unlabeled calibrated posteriors ``probs``, or a safe fallback.

    ``method`` is ``"em"`` (needs calibrated ``probs``; ``pseudocount > 0`` makes
    it MAP, see :func:`em_prior`) or ``"bbse"`` (needs the labelled
    ``val_probs``/``val_labels``; closed-form, ignores ``pseudocount``). With ``bootstrap > 0`` the estimate
    carries a per-class ``interval`` from that many resamples. Never raises for
    a poor estimate: it returns ``source_prior`` with ``fallback=True`` and a
    ``reason`` (see the module docstring for the rules). Raises
    :class:`DataError` for malformed input and :class:`ConfigError` for bad settings.
    """
    p = _as_probs(probs, allow_empty=True)
    ps = _as_prior(source_prior, p.shape[1], "source_prior")
    if bootstrap < 0 or min_samples < 1 or not 0 <= min_prior < 1 or not max_interval_width > 0:
        raise ConfigError(
            f"Expected bootstrap >= 0, min_samples >= 1, 0 <= min_prior < 1 and max_interval_width > 0, "
            f"but got {bootstrap!r}, {min_samples!r}, {min_prior!r}, {max_interval_width!r}"
        )
    try:
        factory = PRIOR_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"Expected the prior estimation method to be one of {sorted(PRIOR_METHODS)}, but got "
            f"{method!r}; use 'em' with calibrated probabilities"
        ) from None
    estimator = factory(ps, val_probs, val_labels, max_iter, tol, max_condition, pseudocount)
    n = p.shape[0]
    if n < min_samples:
        return _fallback(ps, method, n, f"only {n} unlabeled samples, fewer than min_samples={min_samples}")
    est = estimator(p)
    if est.fallback:  # BBSE could not invert its confusion matrix (already logged)
        return est
    raw = est.prior
    if not est.converged:
        return _fallback(
            ps,
            method,
            n,
            f"EM did not converge in {est.iterations} iterations (tol={tol:g})",
            iterations=est.iterations,
            estimate=raw,
        )
    if raw.min() < min_prior:
        return _fallback(
            ps,
            method,
            n,
            f"estimated prior {np.round(raw, 6).tolist()} has a class below min_prior={min_prior:g}",
            iterations=est.iterations,
            converged=est.converged,
            estimate=raw,
        )
    if bootstrap:
        interval = bootstrap_interval(lambda q: estimator(q).prior, p, bootstrap, alpha, seed)
        width = float(np.max(interval[1] - interval[0]))
        if width > max_interval_width:
            return _fallback(
                ps,
                method,
                n,
                f"bootstrap {100 * (1 - alpha):g}% interval is {width:.3g} wide for some class, more "
                f"than max_interval_width={max_interval_width:g}: the data barely determine the prior",
                iterations=est.iterations,
                converged=est.converged,
                interval=interval,
                estimate=raw,
            )
        est = PriorEstimate(raw, ps, method, n, est.iterations, est.converged, interval, estimate=raw.copy())
    logger.info("Label shift (%s, n=%d): source prior %s -> target prior %s", method, n, ps, raw)
    return est


# ----------------------------------------------------------------------------- correction


def correct_posteriors(probs: np.ndarray, source_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """``p_t(y | x) ∝ p_s(y | x) p_t(y) / p_s(y)``, each row renormalised to sum to 1."""
    p = _as_probs(probs)
    ps = _as_prior(source_prior, p.shape[1], "source_prior")
    pt = _as_prior(target_prior, p.shape[1], "target_prior")
    r = p * (pt / ps)
    return r / r.sum(axis=1, keepdims=True)


def logit_adjustment(prior: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """``tau * log(prior)``, to add to the logits inside the training loss (Menon et al. 2021).

    Training on ``logits + tau * log(p)`` and predicting with plain ``logits`` yields
    a classifier that is balanced (as if the prior were uniform) for ``tau = 1``.
    """
    if not math.isfinite(tau):
        raise ConfigError(f"Expected a finite tau, but got {tau!r}; use tau=1.0")
    return float(tau) * np.log(_as_prior(prior, None, "prior"))


def _rates(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    return tp / n_pos, (n_neg - fp) / n_neg


def _balanced_accuracy(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    tpr, tnr = _rates(tp, fp, n_pos, n_neg)
    return (tpr + tnr) / 2


def _youden(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    tpr, tnr = _rates(tp, fp, n_pos, n_neg)
    return tpr + tnr - 1


def _accuracy(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    return (tp + n_neg - fp) / (n_pos + n_neg)


def _f1(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    return 2 * tp / np.maximum(tp + fp + n_pos, 1)


# metric(tp, fp, n_pos, n_neg) over candidate thresholds; higher is better
THRESHOLD_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]] = {
    "balanced_accuracy": _balanced_accuracy,
    "youden": _youden,
    "accuracy": _accuracy,
    "f1": _f1,
}


def best_threshold(probs_pos: np.ndarray, labels: np.ndarray, metric: str = "balanced_accuracy") -> float:
    """The decision threshold ``t`` (predict positive iff ``p >= t``) that maximises ``metric``.

    Candidates are the midpoints between consecutive distinct scores, plus the
    lowest score (all positive) and just above the highest (all negative); the
    midpoint leaves equal margin on both sides for unseen data. Ties go to the
    lowest threshold (more sensitive). ``balanced_accuracy`` and ``youden``
    (``J = 2 BA - 1``) always pick the same threshold; ``accuracy`` and ``f1`` are
    also registered. Binary only: both classes must be present in ``labels``.
    """
    try:
        score = THRESHOLD_METRICS[metric]
    except KeyError:
        raise ConfigError(
            f"Expected the threshold metric to be one of {sorted(THRESHOLD_METRICS)}, but got {metric!r}"
        ) from None
    s = np.asarray(probs_pos, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] < 2 or not np.all(np.isfinite(s)):
        raise DataError(
            f"Expected probs_pos as a finite 1-D array with N >= 2, but got shape {s.shape}; "
            "pass the positive-class probability column, probs[:, 1]"
        )
    y = _as_labels(labels, s.shape[0], 2)
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"Expected both classes in labels to choose a threshold, but got {n_pos} positives and "
            f"{n_neg} negatives; use a validation split with both classes"
        )
    distinct = np.unique(s)
    candidates = np.concatenate(
        [distinct[:1], (distinct[:-1] + distinct[1:]) / 2, [np.nextafter(distinct[-1], np.inf)]]
    )
    pos = np.sort(s[y == 1])
    neg = np.sort(s[y == 0])
    tp = (n_pos - np.searchsorted(pos, candidates, side="left")).astype(np.float64)
    fp = (n_neg - np.searchsorted(neg, candidates, side="left")).astype(np.float64)
    values = score(tp, fp, n_pos, n_neg)
    best = int(np.argmax(values))
    return float(candidates[best])
