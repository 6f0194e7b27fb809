"""Server aggregation: weighted FedAvg against np.average, and bad replies left out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.model import ModelConfig
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import expected_specs

SHAPES = {"lora.down": (4, 6), "lora.up": (6, 4), "head.bias": (2,)}


pytestmark = pytest.mark.usefixtures("task_identity")


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int, name: str | None = None) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.1 * node}),
            "site": ConfigRecord({"name": name or f"site-{node}"}),
        }
    )
    return Message(content, reply_to=ins)


def make_strategy(tmp_path: Path, **kwargs: Any) -> AdapterFedAvg:
    """An AdapterFedAvg over SHAPES, checkpointing in ``tmp_path/ckpt``; ``kwargs`` go to it."""
    initial = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    return AdapterFedAvg(
        expected=expected_specs(initial),
        checkpoint_dir=tmp_path / "ckpt",
        model_config=ModelConfig(),
        num_rounds=3,
        **kwargs,
    )


def test_aggregate_equals_weighted_np_average(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    arrays = [_arrays(s) for s in range(3)]
    weights = [10, 30, 60]
    replies = [_reply(i + 1, a, n) for i, (a, n) in enumerate(zip(arrays, weights, strict=True))]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None
    for key in SHAPES:
        expected = np.average(np.stack([a[key] for a in arrays]), axis=0, weights=weights)
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    # the checkpoint holds exactly the aggregate, and the history the bytes each site sent
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.round == 1
    for key in SHAPES:
        np.testing.assert_array_equal(ckpt.arrays[key], agg[key].numpy())
    per_site = strategy.history.train[1]
    assert per_site["site-2"]["bytes-sent"] == replies[1].content["arrays"].count_bytes()
    assert per_site["site-2"]["num-examples"] == 30


def _bad_replies(good: dict[str, np.ndarray]) -> dict[str, Message]:
    nan = {**good, "lora.up": np.full(SHAPES["lora.up"], np.nan, np.float32)}
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    shape = {**good, "lora.down": np.zeros((5, 6), np.float32)}
    dtype = {**good, "head.bias": good["head.bias"].astype(np.float64)}
    inf = {**good, "head.bias": np.array([np.inf, 0], np.float32)}
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=99, message_type=MessageType.TRAIN)
    return {
        "nan": _reply(10, nan, 50),
        "missing key": _reply(11, missing, 50),
        "wrong shape": _reply(12, shape, 50),
        "wrong dtype": _reply(13, dtype, 50),
        "inf": _reply(14, inf, 50),
        "error": Message(Error(code=1, reason="site crashed"), reply_to=ins),
    }


@pytest.mark.parametrize("kind", ["nan", "missing key", "wrong shape", "wrong dtype", "inf", "error"])
def test_bad_reply_is_left_out(tmp_path: Path, kind: str) -> None:
    strategy = make_strategy(tmp_path)
    a, b = _arrays(1), _arrays(2)
    bad = _bad_replies(a)[kind]
    agg, metrics = strategy.aggregate_train(2, [_reply(1, a, 20), bad, _reply(2, b, 60)])
    assert agg is not None and metrics is not None
    for key in SHAPES:
        expected = np.average(np.stack([a[key], b[key]]), axis=0, weights=[20, 60])
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert len(strategy.history.rejected) == 1
    assert strategy.history.rejected[0]["round"] == 2
    assert set(strategy.history.train[2]) == {"site-1", "site-2"}


def test_all_bad_replies_give_no_aggregate(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    bad = _bad_replies(_arrays(0))
    agg, _ = strategy.aggregate_train(1, [bad["nan"], bad["wrong shape"]])
    assert agg is None
    assert not (tmp_path / "ckpt" / "checkpoint.json").exists()


def test_budget_refusal_is_left_out_and_remembered(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=3, message_type=MessageType.TRAIN)
    refusal = Message(
        RecordDict(
            {
                "site": ConfigRecord({"name": "site-3"}),
                "status": ConfigRecord({"status": "budget-exhausted", "reason": "epsilon 8.1 > 8"}),
            }
        ),
        reply_to=ins,
    )
    arrays = [_arrays(1), _arrays(2)]
    replies = [_reply(1, arrays[0], 10), _reply(2, arrays[1], 30), refusal]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    expected = np.average(np.stack([a["head.bias"] for a in arrays]), axis=0, weights=[10, 30])
    np.testing.assert_allclose(aggregated["head.bias"].numpy(), expected, rtol=1e-6)
    assert strategy.history.refused == [
        {
            "round": 1,
            "stage": "train",
            "node": refusal.metadata.src_node_id,
            "site": "site-3",
            "status": "budget-exhausted",
            "reason": "epsilon 8.1 > 8",
        }
    ]
    assert strategy.exhausted == {refusal.metadata.src_node_id: "site-3"}
    assert strategy.history.rejected == []
