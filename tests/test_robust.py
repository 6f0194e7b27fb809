"""Robust aggregation: the update norm bound and Flower's rules against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedshift.common.aggregation_config import AggregationConfig
from fedshift.server.robust import adam_update_bound, bound_update, rule_strategy, update_norm

SHAPES = {"lora.down": (4, 6), "lora.up": (6, 4), "head.bias": (2,)}
KWARGS = {"weighted_by_key": "num-examples", "arrayrecord_key": "arrays", "min_train_nodes": 2}

pytestmark = pytest.mark.usefixtures("task_identity")


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, reply_to=ins)


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in SHAPES])


def test_update_norm_equals_np_linalg_norm() -> None:
    new, ref = _arrays(1), _arrays(2)
    expected = np.linalg.norm(_flat(new) - _flat(ref))
    assert update_norm(new, ref) == pytest.approx(expected, rel=1e-12)
    assert update_norm(ref, ref) == 0.0
    with pytest.raises(ValueError, match="share their tensors"):
        update_norm({k: v for k, v in new.items() if k != "head.bias"}, ref)


def test_within_the_bound_or_off_the_update_is_unchanged() -> None:
    new, ref = _arrays(1), _arrays(2)
    norm = update_norm(new, ref)
    for bound in (0.0, norm, 2 * norm):
        kept, reason = bound_update(new, ref, bound, "reject")
        assert reason is None and kept is not None
        assert all(kept[k] is new[k] for k in SHAPES)  # the same arrays, not copies


def test_reject_names_the_norm_and_the_bound() -> None:
    new, ref = _arrays(1, scale=1000.0), _arrays(2)
    norm = update_norm(new, ref)
    kept, reason = bound_update(new, ref, 5.0, "reject")
    assert kept is None
    assert reason == f"update norm {norm:.6g} is above update-norm-bound 5"


def test_clip_lands_on_the_bound_along_the_update() -> None:
    new, ref = _arrays(1, scale=1000.0), _arrays(2)
    delta = _flat(new) - _flat(ref)
    clipped, reason = bound_update(new, ref, 5.0, "clip")
    assert reason is None and clipped is not None
    assert all(clipped[k].dtype == np.float32 for k in SHAPES)
    got = _flat(clipped) - _flat(ref)
    assert np.linalg.norm(got) == pytest.approx(5.0, rel=1e-5)  # float32 rounding of each coordinate
    # the same direction: reference + delta * bound / |delta|
    np.testing.assert_allclose(got, delta * 5.0 / np.linalg.norm(delta), rtol=1e-4, atol=1e-5)


def test_bad_action_or_bound_is_refused() -> None:
    new, ref = _arrays(1), _arrays(2)
    with pytest.raises(ValueError, match="'drop'"):
        bound_update(new, ref, 1.0, "drop")
    with pytest.raises(ValueError, match="-1"):
        bound_update(new, ref, -1.0, "clip")


def _aggregate(cfg: AggregationConfig, arrays: list[dict[str, np.ndarray]], weights: list[int]) -> dict:
    replies = [_reply(i + 1, a, n) for i, (a, n) in enumerate(zip(arrays, weights, strict=True))]
    agg, metrics = rule_strategy(cfg, **KWARGS).aggregate_train(1, replies)
    assert agg is not None and metrics is not None
    return {k: agg[k].numpy() for k in SHAPES}


def _trimmed_reference(stack: np.ndarray, beta: float) -> np.ndarray:
    """Sort each coordinate, cut floor(beta * n) values at each end (Flower's trim_mean), average the rest."""
    cut = math.floor(beta * stack.shape[0])
    ordered = np.sort(stack, axis=0)
    return ordered[cut : stack.shape[0] - cut].mean(axis=0)


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
def test_each_rule_equals_its_numpy_reference(rule: str) -> None:
    arrays = [_arrays(s) for s in range(5)]
    weights = [10, 20, 30, 40, 50]
    got = _aggregate(AggregationConfig(rule=rule, trim_fraction=0.2), arrays, weights)
    for k in SHAPES:
        stack = np.stack([a[k] for a in arrays]).astype(np.float64)
        if rule == "mean":
            expected = np.average(stack, axis=0, weights=weights)
        elif rule == "median":
            expected = np.median(stack, axis=0)
        else:
            expected = _trimmed_reference(stack, 0.2)
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)


def test_trimmed_mean_cuts_floor_of_beta_times_n_at_each_end() -> None:
    # 6 sites, beta 0.3: Flower cuts int(1.8) = 1 value at each end, not 2
    arrays = [{k: np.full(s, float(v), np.float32) for k, s in SHAPES.items()} for v in (0, 1, 2, 3, 4, 100)]
    got = _aggregate(AggregationConfig(rule="trimmed-mean", trim_fraction=0.3), arrays, [1] * 6)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.full(SHAPES[k], (1 + 2 + 3 + 4) / 4))


def test_median_of_five_ignores_one_update_a_thousand_times_too_large() -> None:
    arrays = [_arrays(s) for s in range(5)]
    clean = _aggregate(AggregationConfig(rule="median"), arrays, [1] * 5)
    attacked = [*arrays[:4], {k: 1000.0 * v for k, v in arrays[4].items()}]
    got = _aggregate(AggregationConfig(rule="median"), attacked, [1] * 5)
    mean = _aggregate(AggregationConfig(rule="mean"), attacked, [1] * 5)
    for k in SHAPES:
        honest = np.sort(np.stack([a[k] for a in arrays[:4]]).astype(np.float64), axis=0)
        # with one value replaced by anything, the median of 5 lies between the 4 honest values' 2nd and
        # 3rd smallest in every coordinate (as the clean median does): the attacker moves it only within them
        for median in (got[k], clean[k]):
            assert np.all(median >= honest[1] - 1e-6) and np.all(median <= honest[2] + 1e-6)
    assert update_norm(mean, clean) > 50 * update_norm(got, clean)


def _adamw_steps(gradients: np.ndarray, lr: float) -> np.ndarray:
    """The displacement of each AdamW step (torch, fresh state, no weight decay) for rows of gradients."""
    import torch

    param = torch.zeros(gradients.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.0, eps=1e-300)
    moves = []
    for g in gradients:
        before = param.detach().clone()
        param.grad = torch.as_tensor(g, dtype=torch.float64)
        optimizer.step()
        moves.append((param.detach() - before).numpy())
    return np.array(moves)


def test_adam_bound_is_reached_by_its_worst_gradients_and_holds_for_others() -> None:
    lr, steps = 1e-3, 20
    beta1, beta2 = 0.9, 0.999
    # Cauchy-Schwarz is tight for g_k = (b1/b2)**(T-k): step T then moves exactly lr * B_T
    worst = np.array([[(beta1 / beta2) ** (steps - k)] for k in range(1, steps + 1)])
    last_step = abs(_adamw_steps(worst, lr)[-1, 0])
    per_step = adam_update_bound(lr, steps, 1) - adam_update_bound(lr, steps - 1, 1)
    assert last_step == pytest.approx(per_step, rel=1e-9)
    assert adam_update_bound(lr, 1, 400) == pytest.approx(lr * 20)  # the first step: lr * sign(g)
    # random gradients of any scale (DP noise included) never move the parameters further
    rng = np.random.default_rng(0)
    d = 50
    for scale in (1e-6, 1.0, 1e6):
        for kind in ("normal", "heavy", "same-sign"):
            if kind == "normal":
                g = rng.normal(size=(steps, d))
            elif kind == "heavy":
                g = rng.standard_cauchy(size=(steps, d))
            else:
                g = np.abs(rng.normal(size=(steps, d)))
            moved = np.linalg.norm(_adamw_steps(scale * g, lr).sum(axis=0))
            assert moved <= adam_update_bound(lr, steps, d) * (1 + 1e-9)
    assert adam_update_bound(lr, 0, d) == 0.0
    with pytest.raises(ValueError, match="betas"):
        adam_update_bound(lr, 3, d, betas=(0.99, 0.9))
