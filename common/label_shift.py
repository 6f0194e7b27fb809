"""Label-shift math: the shared array checks and the posterior correction.

Pure functions over numpy arrays (no torch, no Flower); the client wraps them.

The setting: the shared model was trained on a mixture with class prior ``p_s(y)``;
a site sees the same class-conditional images ``p(x | y)`` but its own prior
``p_t(y)`` (label shift). The site estimates ``p_t`` from *unlabeled* local data
and corrects the model's posteriors, ``p_t(y | x) ∝ p_s(y | x) p_t(y) / p_s(y)``.

Pipeline (Alexandari et al. 2020, "Maximum likelihood with bias-corrected
calibration is hard-to-beat at label shift adaptation"):

1. Calibrate on a labelled validation split (:mod:`fedshift.common.calibration`).
2. Estimate the target prior from calibrated posteriors of unlabeled data, with a
   guard that falls back to the source prior (:mod:`fedshift.common.prior_estimation`).
3. Correct: :func:`correct_posteriors` (here); optionally pick a decision threshold
   (:mod:`fedshift.common.thresholds`).

Malformed input (NaN, wrong shapes, priors that are not distributions) raises
:class:`~fedshift.common.errors.DataError` (the ``as_*`` checks here): that is a
bug upstream, not a property of the site's data.
"""

from __future__ import annotations

import math

import numpy as np

from fedshift.common.errors import ConfigError, DataError

PRIOR_ATOL = 1e-6  # a prior must sum to 1 within this
ROW_ATOL = 1e-4  # each row of a probability matrix must sum to 1 within this (float32 softmax)


# ----------------------------------------------------------------------------- validation


def as_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
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


def as_labels(labels: np.ndarray, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
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


def as_probs(probs: np.ndarray, name: str = "probs", *, allow_empty: bool = False) -> np.ndarray:
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


def as_prior(prior: np.ndarray, num_classes: int | None, name: str) -> np.ndarray:
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


# ----------------------------------------------------------------------------- correction


def correct_posteriors(probs: np.ndarray, source_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """``p_t(y | x) ∝ p_s(y | x) p_t(y) / p_s(y)``, each row renormalised to sum to 1."""
    p = as_probs(probs)
    ps = as_prior(source_prior, p.shape[1], "source_prior")
    pt = as_prior(target_prior, p.shape[1], "target_prior")
    r = p * (pt / ps)
    return r / r.sum(axis=1, keepdims=True)


def logit_adjustment(prior: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """``tau * log(prior)``, to add to the logits inside the training loss (Menon et al. 2021).

    Training on ``logits + tau * log(p)`` and predicting with plain ``logits`` yields
    a classifier that is balanced (as if the prior were uniform) for ``tau = 1``.
    """
    if not math.isfinite(tau):
        raise ConfigError(f"Expected a finite tau, but got {tau!r}; use tau=1.0")
    return float(tau) * np.log(as_prior(prior, None, "prior"))
