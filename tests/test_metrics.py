"""Metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from fedshift.common.metrics import classification_metrics, expected_calibration_error


def test_ece_matches_hand_computation() -> None:
    # 4 samples, positive-class probabilities; confidences = max(p, 1-p)
    p1 = np.array([0.9, 0.8, 0.3, 0.55])
    labels = np.array([1, 0, 0, 0])
    # confidences 0.9, 0.8, 0.7, 0.55; correct: 1, 0, 1, 0
    # with 10 bins: (0.8,0.9] holds 0.9 -> |1-0.9| ; (0.7,0.8] holds 0.8 -> |0-0.8|;
    # (0.6,0.7] holds 0.7 -> |1-0.7| ; (0.5,0.6] holds 0.55 -> |0-0.55|
    expected = (0.1 + 0.8 + 0.3 + 0.55) / 4
    assert expected_calibration_error(labels, p1, n_bins=10) == pytest.approx(expected)
    # with 2 bins everything lands in (0.5, 1]: |acc - mean conf| = |0.5 - 0.7375|
    assert expected_calibration_error(labels, p1, n_bins=2) == pytest.approx(0.2375)


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    labels = np.array([1, 1, 1, 0] * 25)  # in one bin, accuracy 0.75 with confidence 0.75
    probs = np.full(100, 0.75)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-12)


def test_classification_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(0.35 * labels + rng.uniform(0, 0.65, 300), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(labels, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, p1 > 0.5))
    assert m["accuracy"] == pytest.approx(np.mean((p1 > 0.5) == labels))
    assert m["log_loss"] == pytest.approx(log_loss(labels, probs), rel=1e-6)
    assert m["n"] == 300


def test_auc_is_nan_with_one_class() -> None:
    m = classification_metrics(np.zeros(5, dtype=int), np.full(5, 0.2))
    assert math.isnan(m["auc"])
    assert m["accuracy"] == 1.0
