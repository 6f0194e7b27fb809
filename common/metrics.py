"""Classification metrics: scikit-learn where it has them, ECE implemented once here."""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

logger = logging.getLogger(__name__)

METRIC_NAMES = ("auc", "accuracy", "balanced_accuracy", "log_loss", "ece")


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"Expected probabilities of shape (N, C>=2) or (N,), but got {probs.shape}")
    return probs / probs.sum(axis=1, keepdims=True)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width confidence bins on (0, 1].

    ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``; a sample with confidence
    ``c`` falls in bin ``b`` when ``b/n_bins < c <= (b+1)/n_bins``.
    """
    probs = _as_probs(probs)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if len(labels) != len(probs):
        raise ValueError(f"Expected {len(probs)} labels, but got {len(labels)}")
    if len(labels) == 0:
        return math.nan
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy, log loss, ECE and n for predicted probabilities.

    AUC is ``nan`` (with a log line) when only one class is present.
    """
    probs = _as_probs(probs)
    labels = np.asarray(labels).astype(np.int64).ravel()
    num_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        logger.info("AUC undefined: only class %s present among %d samples", present, len(labels))
        auc = math.nan
    elif num_classes == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(num_classes))))
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(num_classes)))),
        "ece": expected_calibration_error(labels, probs),
        "n": float(len(labels)),
    }
