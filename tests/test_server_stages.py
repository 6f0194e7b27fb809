"""The server's stages outside the round loop: one helper asks every site, with the run's reply timeout.

:func:`~fedshift.server.ask.ask_sites` is fed real Flower replies through a fake Grid;
:func:`~fedshift.server.app.run_federation` runs Flower's real round loop against
a Grid whose sites answer every stage (training, evaluation, statistics, Fisher).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedshift.common.config import FederationConfig
from fedshift.common.protocol import FINAL_MODEL_QUERY, NUM_SITES_KEY
from fedshift.server.app import run_federation
from fedshift.server.ask import ask_sites
from fedshift.server.consolidation import FISHER_MESSAGE
from fedshift.server.enrollment import SiteNames

FINAL_MODEL_MESSAGE = f"{MessageType.QUERY}.{FINAL_MODEL_QUERY}"

pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    """Delivers each message to ``answer`` and remembers every call's message types and timeout."""

    def __init__(self, nodes: list[int], answer: Callable[[Message], list[Message]]) -> None:
        self.nodes, self.answer = nodes, answer
        self.calls: list[tuple[list[str], list[dict[str, Any]], float | None]] = []
        self.run = type("Run", (), {"run_id": 5})()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        types = [m.metadata.message_type for m in messages]
        configs = [dict(m.content.config_records["config"]) for m in messages]
        self.calls.append((types, configs, timeout))
        return [reply for m in messages for reply in self.answer(m)]


def _reply(msg: Message, node: int, records: dict[str, Any]) -> Message:
    content = RecordDict({"site": ConfigRecord({"name": f"site-{node}"}), **records})
    return Message(content, reply_to=msg)


def test_ask_sites_keeps_the_first_checked_reply_of_each_enrolled_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def answer(msg: Message) -> list[Message]:
        node = msg.metadata.dst_node_id
        reply = _reply(msg, node, {"metrics": MetricRecord({"num-examples": 10 * node})})
        return [reply, reply] if node == 2 else [reply]  # node 2 answers twice

    grid: Any = _Grid([1, 2, 3, 4], answer)
    names = SiteNames({1: "a", 2: "b", 3: "c"})  # node 4 is not enrolled

    def check(msg: Message) -> str | None:
        return "too few examples" if msg.content.metric_records["metrics"]["num-examples"] == 30 else None

    content = RecordDict({"config": ConfigRecord({"server-round": 4})})
    with caplog.at_level(logging.WARNING, logger="fedshift.server.ask"):
        got = ask_sites(
            grid,
            content,
            MessageType.QUERY,
            names=names,
            timeout=12.5,
            check=check,
            left_out="Stage: left out",  # type: ignore[arg-type]
        )
    assert [(name, m.metadata.src_node_id) for name, m in got] == [("a", 1), ("b", 2)]
    assert grid.calls == [([MessageType.QUERY] * 4, [{"server-round": 4}] * 4, 12.5)]
    assert [r.getMessage() for r in caplog.records if r.name == "fedshift.server.ask"] == [
        "Stage: left out b: a second reply from the same site",
        "Stage: left out c: too few examples",
        "Stage: left out node-4: node 4 is not enrolled (claims 'site-4'; see )",
    ]


def _site_answer(cfg: FederationConfig) -> Callable[[Message], list[Message]]:
    """Honest sites of a prototype-aligned run: adapters back unchanged, fixed metrics and releases."""
    c, k = cfg.model.num_classes, cfg.shift.align_dim

    def answer(msg: Message) -> list[Message]:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        metrics = MetricRecord({"num-examples": 10 * node, "auc": 0.5})
        arrays = msg.content.array_records.get("arrays", ArrayRecord())
        if kind == MessageType.TRAIN:
            return [_reply(msg, node, {"arrays": arrays, "metrics": metrics})]
        if kind == MessageType.EVALUATE:
            return [_reply(msg, node, {"metrics": metrics})]
        if kind == FISHER_MESSAGE:
            ones = ArrayRecord({key: Array(np.ones(a.shape, np.float32)) for key, a in arrays.items()})
            return [_reply(msg, node, {"ewc-fisher": ones, "metrics": metrics})]
        if kind == FINAL_MODEL_MESSAGE:
            return [_reply(msg, node, {})]  # the bundle written
        if msg.content.config_records["config"]["stage"] != "statistics":
            return [_reply(msg, node, {})]  # the global statistics, taken
        release: dict[str, Any] = {"moment-sum": [0.5] * (c * k), "moment-square": [2.0] * c}
        if msg.content.config_records["config"]["server-round"] == 0:
            release["label-counts"] = [30.0, 10.0]
        return [_reply(msg, node, {"dp-statistics": ConfigRecord(release), "metrics": metrics})]

    return answer


def test_the_reply_timeout_reaches_every_stage(tmp_path: Path) -> None:
    values = {
        "num-server-rounds": 2,
        "image-size": 32,
        "run-dir": str(tmp_path / "run"),
        "reply-timeout": 120.0,
    }
    values |= {"align-weight": 0.5, "align-dim": 2, "ewc-consolidate": True}
    cfg = FederationConfig.from_run_config(values)
    grid = _Grid([1, 2], _site_answer(cfg))
    results = run_federation(grid, cfg)  # type: ignore[arg-type]
    stages = [(types[0], configs[0], timeout) for types, configs, timeout in grid.calls]
    release, take = {"stage": "statistics"}, {"stage": "global-statistics"}
    assert stages == [
        (MessageType.QUERY, {**release, "server-round": 0}, 120.0),
        (MessageType.QUERY, {**take, "server-round": 0}, 120.0),
        (MessageType.TRAIN, {"server-round": 1}, 120.0),
        (MessageType.EVALUATE, {"split": "val", "server-round": 1}, 120.0),
        (MessageType.QUERY, {**release, "server-round": 2}, 120.0),  # the refresh before round 2
        (MessageType.QUERY, {**take, "server-round": 2}, 120.0),
        (MessageType.TRAIN, {"server-round": 2}, 120.0),
        (MessageType.EVALUATE, {"split": "val", "server-round": 2}, 120.0),
        (FISHER_MESSAGE, {"server-round": 3}, 120.0),
        (MessageType.EVALUATE, {"split": "test", "server-round": 2}, 120.0),
        (FINAL_MODEL_MESSAGE, {"server-round": 2, NUM_SITES_KEY: 2}, 120.0),
    ]
    assert results["statistics"] == {"sites": 2, "train_prior": [0.75, 0.25], "align_dim": 2}
    assert results["consolidated"]["sites"] == ["site-1", "site-2"]
    assert results["consolidated"]["examples"] == 30.0
    assert results["final_test"] == {
        n: {"num-examples": 10.0 * i, "auc": 0.5} for i, n in ((1, "site-1"), (2, "site-2"))
    }
    assert results["bundles"] == ["site-1", "site-2"]


def test_a_site_that_fails_the_final_model_stage_is_logged_and_the_federation_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = FederationConfig.from_run_config(
        {"num-server-rounds": 1, "image-size": 32, "run-dir": str(tmp_path / "run")}
    )
    honest = _site_answer(cfg)

    def answer(msg: Message) -> list[Message]:
        if msg.metadata.message_type == FINAL_MODEL_MESSAGE and msg.metadata.dst_node_id == 2:
            return [
                Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="site-error"), reply_to=msg)
            ]
        return honest(msg)

    with caplog.at_level(logging.WARNING, logger="fedshift.server.ask"):
        results = run_federation(_Grid([1, 2], answer), cfg)  # type: ignore[arg-type]
    assert results["bundles"] == ["site-1"] and set(results["final_test"]) == {"site-1", "site-2"}
    assert "Final model: no bundle at site-2: the site reported an error: site-error" in caplog.text
    assert (tmp_path / "run" / "results.json").is_file()
