"""Decision thresholds for a binary classifier, chosen on a labelled split by a registered metric.

:data:`THRESHOLD_METRICS` maps a name to ``metric(tp, fp, n_pos, n_neg)`` over
candidate thresholds (higher is better); :func:`best_threshold` picks the best.
Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedshift.common.errors import ConfigError, DataError
from fedshift.common.label_shift import as_labels


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
    y = as_labels(labels, s.shape[0], 2)
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
