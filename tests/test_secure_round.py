"""One secure-aggregation round between the real strategy and real in-process ClientApps (no Ray).

Each node keeps its Flower context (where its round secrets live) between messages, as a SuperNode
does; node ids above 2**63 check that they travel as strings.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedshift.client.app import make_client_app
from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import SECAGG_MASKED_KEY, SECAGG_UNMASK_QUERY
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import expected_specs
from fedshift.tests.helpers import site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)
BIG = 2**63 + 5  # node ids as Flower draws them: unsigned 64-bit


class _Grid:
    """Delivers each message to its node's in-process ClientApp; a node's context lives on between
    messages. ``drop(node, message)`` True: the node is offline for that message (no reply)."""

    def __init__(self, run_config: dict[str, Any], nodes: int, drop: Callable[[int, Message], bool]) -> None:
        self.app = make_client_app()
        self.drop = drop
        self.contexts = {
            BIG + k: Context(
                run_id=1,
                node_id=BIG + k,
                node_config={"partition-id": k},
                state=RecordDict(),
                run_config=run_config,
            )
            for k in range(nodes)
        }
        self.run = type("Run", (), {"run_id": 1})()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.drop(node, msg):
                continue
            replies.append(self.app(msg, self.contexts[node]))  # from the node it was sent to
        return replies


def _sites(root: Path, n: int) -> None:
    first = write_site(root, n=90)
    for k in range(1, n):
        shutil.copytree(first, root / f"site-{k}")


def _online(node: int, msg: Message) -> bool:
    return False


def _round(root: Path, secure: bool, drop: Callable[[int, Message], bool] = _online) -> AdapterFedAvg:
    """Round 1 of three sites (plain or secure) through the strategy; the strategy afterwards."""
    _sites(root, 3)
    run_config = site_run_config(root, **{"dp": True, "dp-epsilon": 8.0, "secure-aggregation": secure})
    fed = FederationConfig.from_run_config(run_config)
    grid = _Grid(run_config, 3, drop)
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    strategy = AdapterFedAvg(
        expected=expected_specs(arrays),
        checkpoint_dir=root / "ckpt",
        model_config=MODEL,
        num_rounds=2,
        aggregation=fed.aggregation,
        reply_timeout=fed.reply_timeout,
    )
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))  # type: ignore[arg-type]
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    return strategy


def test_secure_round_equals_fedavg_within_the_quantisation_bound(tmp_path: Path) -> None:
    _round(tmp_path / "plain", secure=False)
    _round(tmp_path / "secure", secure=True)
    a = load_checkpoint(tmp_path / "plain" / "ckpt").arrays
    b = load_checkpoint(tmp_path / "secure" / "ckpt").arrays
    gap = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    # 3 summands on (2**32 - 1) // 3 levels over [-1, 1]: <= 3 * 2 / 1431655765 ~ 4.2e-9 on the weighted
    # sum, plus float32 rounding of the adapters (~6e-8 at |w| ~ 1)
    assert 0 < gap < 2e-7


def test_a_site_that_drops_after_masking_is_unmasked_by_the_others(tmp_path: Path) -> None:
    def silent_at_unmask(node: int, msg: Message) -> bool:
        return node == BIG + 2 and str(msg.metadata.message_type).endswith(SECAGG_UNMASK_QUERY)

    _round(tmp_path / "plain", secure=False)
    strategy = _round(tmp_path / "secure", secure=True, drop=silent_at_unmask)
    assert sorted(strategy.history.train[1]) == ["site-0", "site-1", "site-2"]  # its update still counts
    a = load_checkpoint(tmp_path / "plain" / "ckpt").arrays
    b = load_checkpoint(tmp_path / "secure" / "ckpt").arrays
    assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) < 2e-7


def test_too_few_live_sites_refuse_the_round_and_reveal_nothing(tmp_path: Path) -> None:
    def two_gone(node: int, msg: Message) -> bool:  # t = 2 of 3: one survivor cannot be unmasked
        return node != BIG and str(msg.metadata.message_type) == "train"

    strategy = _round(tmp_path, secure=True, drop=two_gone)
    refused = [r for r in strategy.history.refused if r["stage"] == "secure-aggregation"]
    assert len(refused) == 1 and "t=2" in refused[0]["reason"]
    assert not (tmp_path / "ckpt").exists()  # nothing aggregated, no checkpoint written


def test_a_plain_update_in_a_secure_round_is_rejected(tmp_path: Path) -> None:
    """An unmasked update never reaches the server's aggregation: a secure round takes only masked ones."""

    _sites(tmp_path, 3)
    run_config = site_run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0, "secure-aggregation": True})
    fed = FederationConfig.from_run_config(run_config)
    grid = _Grid(run_config, 3, _online)
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    strategy = AdapterFedAvg(
        expected=expected_specs(arrays),
        checkpoint_dir=tmp_path / "ckpt",
        model_config=MODEL,
        num_rounds=2,
        aggregation=fed.aggregation,
    )
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))  # type: ignore[arg-type]
    replies = grid.send_and_receive(messages)
    plain = replies[0]
    masked = plain.content.array_records.pop(SECAGG_MASKED_KEY)
    plain.content.array_records["arrays"] = arrays  # as if the site sent its adapters in the clear
    assert masked is not None
    strategy.aggregate_train(1, replies)
    reasons = [r["reason"] for r in strategy.history.rejected]
    assert reasons == [f"expected one ArrayRecord {SECAGG_MASKED_KEY!r}, got ['arrays']"]
    assert load_checkpoint(tmp_path / "ckpt").round == 1  # the other two were unmasked (t = 2)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_are_refused_with_secure_aggregation(rule: str) -> None:
    with pytest.raises(Exception, match="needs every site's update"):
        AggregationConfig(secure=True, rule=rule)
