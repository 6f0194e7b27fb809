"""Target-prior estimation from unlabeled calibrated posteriors: EM, BBSE, a bootstrap and a guard.

:func:`em_prior` (Saerens, Latinne & Decaestecker 2002; maximum likelihood, or MAP
under a Dirichlet prior with ``pseudocount > 0``, which keeps a rare class's
estimate off 0 on small sites) or :func:`bbse_prior` (Lipton, Wang & Smola 2018),
guarded by :func:`estimate_prior`.

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedshift.common.errors import ConfigError, DataError
from fedshift.common.label_shift import PRIOR_ATOL, as_labels, as_prior, as_probs, correct_posteriors

logger = logging.getLogger(__name__)

_TINY = np.finfo(np.float64).tiny


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
    p = as_probs(probs)
    ps = as_prior(source_prior, p.shape[1], "source_prior")
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
    p = as_labels(pred, n, num_classes, "pred_labels")
    y = as_labels(labels, n, num_classes)
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (p, y), 1.0)
    return joint / n


def prediction_marginal(probs: np.ndarray) -> np.ndarray:
    """``μ̂[i]``: the fraction of rows whose argmax (hard prediction) is class ``i``."""
    p = as_probs(probs)
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
    ps = as_prior(source_prior, c, "source_prior")
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
    vp = as_probs(val_probs, "val_probs")
    tp = as_probs(target_probs, "target_probs")
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
    p = as_probs(probs)
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
    vp = as_probs(val_probs, "val_probs")
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


def _estimator_for(
    method: str,
    ps: np.ndarray,
    val_probs: np.ndarray | None,
    val_labels: np.ndarray | None,
    max_iter: int,
    tol: float,
    max_condition: float,
    pseudocount: float,
) -> Estimator:
    """The estimator registered as ``method`` in :data:`PRIOR_METHODS`, set up for ``ps``."""
    try:
        factory = PRIOR_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"Expected the prior estimation method to be one of {sorted(PRIOR_METHODS)}, but got "
            f"{method!r}; use 'em' with calibrated probabilities"
        ) from None
    return factory(ps, val_probs, val_labels, max_iter, tol, max_condition, pseudocount)


def _rejected(
    est: PriorEstimate, ps: np.ndarray, method: str, n: int, tol: float, min_prior: float
) -> PriorEstimate | None:
    """The fallback when EM did not converge or a class's estimate is below ``min_prior``; else None."""
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
    return None


def _with_interval(
    est: PriorEstimate,
    estimator: Estimator,
    p: np.ndarray,
    ps: np.ndarray,
    method: str,
    bootstrap: int,
    alpha: float,
    seed: int,
    max_interval_width: float,
) -> PriorEstimate:
    """``est`` with its bootstrap interval, or the source prior when that interval is too wide."""
    raw, n = est.prior, p.shape[0]
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
    return PriorEstimate(raw, ps, method, n, est.iterations, est.converged, interval, estimate=raw.copy())


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
    p = as_probs(probs, allow_empty=True)
    ps = as_prior(source_prior, p.shape[1], "source_prior")
    if bootstrap < 0 or min_samples < 1 or not 0 <= min_prior < 1 or not max_interval_width > 0:
        raise ConfigError(
            f"Expected bootstrap >= 0, min_samples >= 1, 0 <= min_prior < 1 and max_interval_width > 0, "
            f"but got {bootstrap!r}, {min_samples!r}, {min_prior!r}, {max_interval_width!r}"
        )
    estimator = _estimator_for(method, ps, val_probs, val_labels, max_iter, tol, max_condition, pseudocount)
    n = p.shape[0]
    if n < min_samples:
        return _fallback(ps, method, n, f"only {n} unlabeled samples, fewer than min_samples={min_samples}")
    est = estimator(p)
    if est.fallback:  # BBSE could not invert its confusion matrix (already logged)
        return est
    rejected = _rejected(est, ps, method, n, tol, min_prior)
    if rejected is not None:
        return rejected
    raw = est.prior
    if bootstrap:
        est = _with_interval(est, estimator, p, ps, method, bootstrap, alpha, seed, max_interval_width)
        if est.fallback:
            return est
    logger.info("Label shift (%s, n=%d): source prior %s -> target prior %s", method, n, ps, raw)
    return est
