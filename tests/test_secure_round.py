"""One secure-aggregation round between the real strategy and real in-process ClientApps (no Ray:
:mod:`fedshift.simulations.local_grid`, node ids above 2**63)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import SECAGG_MASKED_KEY, SECAGG_UNMASK_QUERY
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import expected_specs
from fedshift.simulations.local_grid import FIRST_NODE, LocalGrid, one_round, online
from fedshift.tests.helpers import site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)


def _sites(root: Path, n: int) -> None:
    first = write_site(root, n=90)
    for k in range(1, n):
        shutil.copytree(first, root / f"site-{k}")


def _round(root: Path, secure: bool, drop: Callable[[int, Message], bool] = online) -> AdapterFedAvg:
    """Round 1 of three sites (plain or secure) through the strategy; the strategy afterwards."""
    _sites(root, 3)
    strategy, _ = one_round(_run_config(root, secure), 3, drop)
    return strategy


def _run_config(root: Path, secure: bool) -> dict[str, Any]:
    values = {"dp": True, "dp-epsilon": 8.0, "secure-aggregation": secure, "run-dir": str(root / "ckpt")}
    return site_run_config(root, **values)


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
        return node == FIRST_NODE + 2 and str(msg.metadata.message_type).endswith(SECAGG_UNMASK_QUERY)

    _round(tmp_path / "plain", secure=False)
    strategy = _round(tmp_path / "secure", secure=True, drop=silent_at_unmask)
    assert sorted(strategy.history.train[1]) == ["site-0", "site-1", "site-2"]  # its update still counts
    a = load_checkpoint(tmp_path / "plain" / "ckpt").arrays
    b = load_checkpoint(tmp_path / "secure" / "ckpt").arrays
    assert max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a) < 2e-7


def test_too_few_live_sites_refuse_the_round_and_reveal_nothing(tmp_path: Path) -> None:
    def two_gone(node: int, msg: Message) -> bool:  # t = 2 of 3: one survivor cannot be unmasked
        return node != FIRST_NODE and str(msg.metadata.message_type) == "train"

    strategy = _round(tmp_path, secure=True, drop=two_gone)
    refused = [r for r in strategy.history.refused if r["stage"] == "secure-aggregation"]
    assert len(refused) == 1 and "t=2" in refused[0]["reason"]
    assert not (tmp_path / "ckpt").exists()  # nothing aggregated, no checkpoint written


def test_a_plain_update_in_a_secure_round_is_rejected(tmp_path: Path) -> None:
    """An unmasked update never reaches the server's aggregation: a secure round takes only masked ones."""

    _sites(tmp_path, 3)
    fed = FederationConfig.from_run_config(_run_config(tmp_path, True))
    grid = LocalGrid(_run_config(tmp_path, True), 3)
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


def test_a_malformed_protocol_reply_leaves_out_its_site_only(tmp_path: Path) -> None:
    """A setup reply without keys (as a site running other code could send) costs that site the round,
    not the federation: the others' sum is still unmasked."""
    from fedshift.common.protocol import SECAGG_C_KEYS_FIELD, SECAGG_KEY, SECAGG_SETUP_QUERY

    class Tampering(LocalGrid):
        def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
            replies = super().send_and_receive(messages, timeout)
            for reply in replies:
                kind = str(reply.metadata.message_type)
                if reply.metadata.src_node_id == FIRST_NODE + 1 and kind.endswith(SECAGG_SETUP_QUERY):
                    reply.content.config_records[SECAGG_KEY][SECAGG_C_KEYS_FIELD] = []
            return replies

    _sites(tmp_path, 3)
    strategy, _ = one_round(_run_config(tmp_path, True), 3, grid_class=Tampering)
    assert sorted(strategy.history.train[1]) == ["site-0", "site-2"]
    assert load_checkpoint(tmp_path / "ckpt").round == 1


def test_the_egress_guard_holds_secure_aggregation_items_to_their_stage() -> None:
    from flwr.app import MessageType

    from fedshift.client.egress import secagg_problems
    from fedshift.common.protocol import (
        SECAGG_C_KEYS_FIELD,
        SECAGG_KEY,
        SECAGG_NODES_FIELD,
        SECAGG_S_KEYS_FIELD,
        SECAGG_SETUP_QUERY,
        SECAGG_SHARES_FIELD,
    )

    def reply(kind: str, record: dict[str, Any]) -> list[str]:
        msg = Message(RecordDict(), dst_node_id=1, message_type=kind)
        return secagg_problems(msg, RecordDict({SECAGG_KEY: ConfigRecord(record)}))

    unmask = f"{MessageType.QUERY}.{SECAGG_UNMASK_QUERY}"
    setup = f"{MessageType.QUERY}.{SECAGG_SETUP_QUERY}"
    assert reply(unmask, {SECAGG_NODES_FIELD: ["3"], SECAGG_SHARES_FIELD: [bytes(67)]}) == []
    # a 32-byte secret (a private key) where a revealed share belongs is blocked
    assert reply(unmask, {SECAGG_NODES_FIELD: ["3"], SECAGG_SHARES_FIELD: [bytes(32)]}) != []
    assert reply(setup, {SECAGG_C_KEYS_FIELD: [bytes(32)], SECAGG_S_KEYS_FIELD: [bytes(32)]}) == []
    assert reply(setup, {SECAGG_C_KEYS_FIELD: [bytes(32)] * 2, SECAGG_S_KEYS_FIELD: [bytes(32)]}) != []
    assert reply(setup, {SECAGG_SHARES_FIELD: [bytes(67)]}) != []  # another stage's field
    assert reply(MessageType.EVALUATE, {SECAGG_C_KEYS_FIELD: [bytes(32)]}) != []  # outside the protocol
