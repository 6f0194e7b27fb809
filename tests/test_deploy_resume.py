"""Resuming a federation from a checkpoint: round numbers, history and the checks on the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedshift.common.checkpoint import load_checkpoint, save_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import CheckpointError
from fedshift.common.model import ModelConfig
from fedshift.server.app import load_resume_point
from fedshift.server.strategy import AdapterFedAvg, RunHistory
from fedshift.server.validation import expected_specs

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"lora.down": (4, 6), "head.bias": (2,)}


class _Grid:
    """The two calls FedAvg's sampling makes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def get_node_ids_with_wait(self, *_args: Any, **_kwargs: Any) -> list[int]:
        return [1, 2]


def _strategy(tmp_path: Path, first_round: int, history: RunHistory | None = None) -> AdapterFedAvg:
    initial = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    return AdapterFedAvg(
        expected=expected_specs(initial),
        checkpoint_dir=tmp_path / "ckpt",
        model_config=ModelConfig(),
        num_rounds=4,
        min_nodes=2,
        first_round=first_round,
        history=history,
    )


def _reply(node: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = {k: np.full(s, float(node), np.float32) for k, s in SHAPES.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            "site": ConfigRecord({"name": f"site-{node}"}),
            "privacy": ConfigRecord({"mechanism": "dp-sgd"}),
        }
    )
    return Message(content, reply_to=ins)


def test_a_resumed_strategy_numbers_rounds_from_the_checkpoint(tmp_path: Path) -> None:
    earlier = RunHistory(train={1: {"site-1": {"train-loss": 1.0}}, 2: {"site-1": {"train-loss": 0.9}}})
    strategy = _strategy(tmp_path, first_round=3, history=earlier)
    arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    assert {int(m.content.config_records["config"]["server-round"]) for m in sent} == {3}  # type: ignore[arg-type]
    sent = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    assert {int(m.content.config_records["config"]["server-round"]) for m in sent} == {3}  # type: ignore[arg-type]

    aggregate, _ = strategy.aggregate_train(1, [_reply(1), _reply(2)])  # Flower's first round of this run
    assert aggregate is not None
    np.testing.assert_allclose(aggregate["head.bias"].numpy(), [1.5, 1.5])
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.round == 3
    assert sorted(strategy.history.train) == [1, 2, 3]  # the earlier rounds are kept
    # the checkpoint carries the history a later resume starts from
    again = RunHistory.from_dict(checkpoint.extra["history"], up_to_round=checkpoint.round)
    assert sorted(again.train) == [1, 2, 3]
    assert again.train[3]["site-1"]["train-loss"] == 0.5


def test_history_after_the_checkpoint_is_dropped() -> None:
    history = RunHistory(
        train={1: {}, 2: {}, 3: {}},
        evaluate={1: {}, 2: {}},
        rejected=[{"round": 2, "reason": "x"}, {"round": 3, "reason": "y"}],
    )
    kept = RunHistory.from_dict(history.to_dict(), up_to_round=2)
    assert sorted(kept.train) == [1, 2] and sorted(kept.evaluate) == [1, 2]
    assert [r["round"] for r in kept.rejected] == [2]


def test_resume_refuses_a_checkpoint_of_another_model_or_a_later_round(tmp_path: Path) -> None:
    arrays = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    save_checkpoint(tmp_path / "ckpt", arrays, ModelConfig(image_size=32), server_round=2)
    cfg = FederationConfig(num_rounds=4, resume_from=str(tmp_path / "ckpt"), model=ModelConfig(image_size=32))
    assert load_resume_point(cfg, arrays).round == 2
    other_model = FederationConfig(
        num_rounds=4, resume_from=cfg.resume_from, model=ModelConfig(image_size=64)
    )
    with pytest.raises(CheckpointError, match="model settings differ"):
        load_resume_point(other_model, arrays)
    with pytest.raises(CheckpointError, match="tensor names differ"):
        load_resume_point(cfg, {"other": np.zeros(1)})
    too_few = FederationConfig(num_rounds=1, resume_from=cfg.resume_from, model=ModelConfig(image_size=32))
    with pytest.raises(CheckpointError, match="at most num-server-rounds"):
        load_resume_point(too_few, arrays)
