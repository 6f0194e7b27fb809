"""Aggregation one bad site cannot steer: the per-update norm bound and the robust rules.

The rules are Flower's own Message-API strategies (FedAvg, FedMedian,
FedTrimmedAvg); :func:`rule_strategy` picks one from the run config, and the
server strategy calls its ``aggregate_train`` for the arithmetic on the replies
it has already checked. The norm bound acts on one update before that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from fedshift.common.aggregation_config import AggregationConfig

REJECT, CLIP = "reject", "clip"  # update-norm-action (common/aggregation_config.NORM_ACTIONS)


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over all their tensors, in float64."""
    missing = sorted(set(arrays) ^ set(reference))
    if missing:
        raise ValueError(f"Expected the update and the reference to share their tensors, but not {missing}")
    total = 0.0
    for key, value in arrays.items():
        delta = np.asarray(value, dtype=np.float64) - np.asarray(reference[key], dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return float(np.sqrt(total))


def bound_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    bound: float,
    action: str,
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """An update held to ``bound``: (arrays, None) within it, else rejected (None, reason) or clipped.

    ``bound`` 0 is off. Within the bound (or off) the dict holds the very arrays
    given (``is`` tells a clipped update from a kept one). A clipped update is
    ``reference + delta * bound / norm`` in each tensor's own dtype, so its norm is the bound.
    """
    if action not in (REJECT, CLIP):
        raise ValueError(f"Expected update-norm-action to be {REJECT!r} or {CLIP!r}, but got {action!r}")
    if bound < 0 or not np.isfinite(bound):
        raise ValueError(f"Expected update-norm-bound to be a finite number >= 0, but got {bound!r}")
    if bound == 0:
        return dict(arrays), None
    norm = update_norm(arrays, reference)
    if norm <= bound:
        return dict(arrays), None
    if action == REJECT:
        return None, f"update norm {norm:.6g} is above update-norm-bound {bound:g}"
    scale = bound / norm
    clipped = {}
    for key, value in arrays.items():
        ref = np.asarray(reference[key], dtype=np.float64)
        delta = np.asarray(value, dtype=np.float64) - ref
        clipped[key] = (ref + delta * scale).astype(np.asarray(value).dtype)
    return clipped, None


def adam_update_bound(
    learning_rate: float, steps: int, num_values: int, betas: tuple[float, float] = (0.9, 0.999)
) -> float:
    """The largest L2 norm an honest site's update can have after ``steps`` AdamW steps from a fresh state.

    Whatever the gradients (DP-SGD's clipped and noised ones included), step t
    moves each coordinate by at most ``lr * B_t`` with
    ``B_t = (1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1**2 / b2)**j) * sqrt(1 - b2**t) / (1 - b1**t)``
    (Cauchy-Schwarz on Adam's two moving averages; ``B_1 = 1``), so the update of
    ``num_values`` coordinates is at most ``lr * sqrt(num_values) * sum_t B_t``.
    ``learning_rate`` is the largest of the parameter groups'; weight decay 0
    (fedshift's AdamW). A bound for update-norm-bound that no honest site can exceed.
    """
    beta1, beta2 = betas
    if not 0 <= beta1 < 1 or not 0 < beta2 < 1 or beta1**2 >= beta2:
        raise ValueError(f"Expected Adam betas with 0 <= b1 < 1, 0 < b2 < 1 and b1**2 < b2, but got {betas}")
    if learning_rate <= 0 or steps < 0 or num_values < 0:
        raise ValueError(
            f"Expected learning_rate > 0, steps >= 0 and num_values >= 0, but got "
            f"{learning_rate}, {steps}, {num_values}"
        )
    t = np.arange(1, steps + 1, dtype=np.float64)
    ratio = beta1**2 / beta2
    per_step = (
        (1 - beta1)
        / np.sqrt(1 - beta2)
        * np.sqrt((1 - ratio**t) / (1 - ratio))
        * np.sqrt(1 - beta2**t)
        / (1 - beta1**t)
    )
    return float(learning_rate * np.sqrt(num_values) * per_step.sum())


def rule_strategy(cfg: AggregationConfig, **fedavg_kwargs: Any) -> FedAvg:
    """Flower's strategy for ``cfg.rule``: FedAvg (mean), FedMedian (median), FedTrimmedAvg (trimmed-mean).

    ``fedavg_kwargs`` are FedAvg's own (``weighted_by_key``, ``arrayrecord_key``,
    ``min_*_nodes``, ...). The median and the trimmed mean are unweighted: the
    weight key only weighs their aggregate metrics.
    """
    if cfg.rule == "mean":
        return FedAvg(**fedavg_kwargs)
    if cfg.rule == "median":
        return FedMedian(**fedavg_kwargs)
    if cfg.rule == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction, **fedavg_kwargs)
    raise ValueError(f"Expected aggregation to be mean, median or trimmed-mean, but got {cfg.rule!r}")
