"""EWC across phases: the end-of-phase Fisher release, its consolidation, and the consolidated anchor.

In process (real ClientApp, real model, real ledger, no Flower engine): a site's
``query.fisher`` reply under DP is charged once and logged as a DP release; the
server-side average is the example-weighted mean scaled to mean 1; training towards
a consolidated anchor with a huge lambda keeps the adapters at the anchor, and with
lambda = 0 it is exactly training without EWC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedshift.client.app import make_client_app
from fedshift.client.egress import read_egress_log
from fedshift.client.ledger import PrivacyLedger
from fedshift.common.errors import CheckpointError, ConfigError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import (
    ANCHOR_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    FISHER_KEY,
    METRICS_KEY,
    PRIVACY_KEY,
    SITE_KEY,
)
from fedshift.server.consolidation import (
    FISHER_MESSAGE,
    fisher_problem,
    load_consolidated,
    save_consolidated,
)
from fedshift.tests.helpers import call_client_app, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)


def _run_config(root: Path, **values: Any) -> dict[str, Any]:
    return site_run_config(root, **values)


def _shared() -> dict[str, torch.Tensor]:
    model = build_model(MODEL)
    with torch.no_grad():  # off LoRA's zero start, so that every tensor has a gradient
        return {k: v + 0.02 * torch.randn_like(v) for k, v in model.shared_state_dict().items()}


def _message(
    kind: str, server_round: int, arrays: dict[str, torch.Tensor], **records: ArrayRecord
) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(arrays),
            CONFIG_KEY: ConfigRecord({"server-round": server_round}),
            **records,
        }
    )
    return Message(content, dst_node_id=0, message_type=kind)


def test_dp_fisher_release_is_charged_once_logged_and_refused_when_repeated(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    config = _run_config(
        tmp_path,
        **{"dp": True, "dp-epsilon": 8.0, "ewc-consolidate": True, "ewc-fisher-noise-multiplier": 5.0},
    )
    app = make_client_app()
    arrays = _shared()
    reply = call_client_app(app, _message(FISHER_MESSAGE, 3, arrays), config)
    fisher = reply.content.array_records[FISHER_KEY]
    assert sorted(fisher) == sorted(arrays)
    assert all(tuple(fisher[k].shape) == tuple(arrays[k].shape) for k in arrays)
    assert all((fisher[k].numpy() >= 0).all() for k in arrays)
    privacy = reply.content.config_records[PRIVACY_KEY]
    assert privacy["mechanism"] == "dp-fisher" and privacy["ewc-fisher"] == "dp"
    ledger = PrivacyLedger.at(site_dir)
    [entry] = ledger.entries
    assert (entry.round, entry.mechanism, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        3,
        "dp-fisher",
        5.0,
        1.0,
        1,
    )
    assert float(privacy["epsilon"]) == pytest.approx(entry.epsilon)  # type: ignore[arg-type]
    [logged] = read_egress_log(site_dir)
    assert logged["blocked"] == [] and logged["stage"] == FISHER_MESSAGE
    fisher_items = [i for i in logged["items"] if i["record"] == FISHER_KEY]
    assert {i["mechanism"] for i in fisher_items} == {"dp-fisher"}
    assert sum(i["bytes"] for i in fisher_items) == 4 * sum(v.numel() for v in arrays.values())
    # the same release again is refused, and nothing more is charged
    again = call_client_app(app, _message(FISHER_MESSAGE, 3, arrays), config)
    assert "status" in again.content.config_records and FISHER_KEY not in again.content.array_records
    assert len(PrivacyLedger.at(site_dir).entries) == 1


def test_dp_budget_planning_keeps_room_for_the_end_of_run_fisher(tmp_path: Path) -> None:
    """With ewc-consolidate, the derived noise multiplier leaves room for the final release."""
    site_dir = write_site(tmp_path)
    train = _message(MessageType.TRAIN, 1, _shared())
    plain = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 4.0})
    call_client_app(make_client_app(), train, plain)
    sigma_plain = PrivacyLedger.at(site_dir).entries[0].noise_multiplier
    fresh = tmp_path / "fresh"  # the same data as a new site (deleting a ledger stops a site)
    site_dir = write_site(fresh)
    plain = _run_config(fresh, **{"dp": True, "dp-epsilon": 4.0})
    reserved = {**plain, "ewc-consolidate": True, "ewc-fisher-noise-multiplier": 2.0}
    call_client_app(make_client_app(), train, reserved)
    ledger = PrivacyLedger.at(site_dir)
    sgd = ledger.entries[0]
    assert sgd.noise_multiplier > sigma_plain  # more noise: the budget holds the Fisher release too
    # two planned rounds + the release fit into epsilon 4, within the planning tolerance
    history = [*ledger.history(), *ledger.history(), (2.0, 1.0, 1)]
    from fedshift.common.privacy import epsilon

    assert epsilon(history, 1e-5) <= 4.0  # the ledger's own (default) accountant
    assert epsilon(history, 1e-5) == pytest.approx(4.0, rel=0.01)


def _train(
    tmp_path: Path, lam: float, records: dict[str, ArrayRecord], arrays: dict[str, torch.Tensor]
) -> dict:
    write_site(tmp_path)
    config = _run_config(
        tmp_path,
        **{"ewc-lambda": lam, "ewc-anchor": "consolidated", "learning-rate": 0.01, "local-epochs": 3},
    )
    reply = call_client_app(make_client_app(), _message(MessageType.TRAIN, 1, arrays, **records), config)
    assert "status" not in reply.content.config_records, reply.content.config_records.get("status")
    return {k: v.numpy() for k, v in reply.content.array_records[ARRAYS_KEY].items()}


def test_consolidated_anchor_holds_the_adapters_and_lambda_zero_changes_nothing(tmp_path: Path) -> None:
    start = _shared()
    anchor = {k: v + 0.05 for k, v in start.items()}  # the anchor differs from the starting point
    fisher = {k: torch.ones_like(v) for k, v in start.items()}
    records = {ANCHOR_KEY: ArrayRecord(anchor), FISHER_KEY: ArrayRecord(fisher)}
    free = _train(tmp_path / "free", 0.0, records, start)  # lambda 0: training as without EWC
    plain_dir = tmp_path / "plain"
    write_site(plain_dir)
    plain_config = _run_config(plain_dir, **{"learning-rate": 0.01, "local-epochs": 3})
    plain_reply = call_client_app(make_client_app(), _message(MessageType.TRAIN, 1, start), plain_config)
    zero = {k: v.numpy() for k, v in plain_reply.content.array_records[ARRAYS_KEY].items()}
    for k in free:
        np.testing.assert_array_equal(free[k], zero[k])
    held = _train(tmp_path / "held", 1e6, records, start)
    moved = max(float(np.abs(free[k] - start[k].numpy()).max()) for k in free)
    dist_free = sum(float(((free[k] - anchor[k].numpy()) ** 2).sum()) for k in free)
    dist_held = sum(float(((held[k] - anchor[k].numpy()) ** 2).sum()) for k in held)
    dist_start = sum(float(((start[k] - anchor[k]) ** 2).sum()) for k in start)
    assert moved > 1e-3
    # 9 AdamW steps of lr 0.01 pull every tensor over most of the 0.05 gap; free training does not close it
    assert dist_held < 0.2 * dist_start
    assert dist_free > 0.9 * dist_start


def test_consolidated_anchor_without_records_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_site(tmp_path)
    config = _run_config(tmp_path, **{"ewc-lambda": 10.0, "ewc-anchor": "consolidated"})
    with caplog.at_level("ERROR"):
        reply = call_client_app(make_client_app(), _message(MessageType.TRAIN, 1, _shared()), config)
    # the site's log names the fix; the server gets the egress guard's generic error, no site text
    assert reply.has_error() and "init-checkpoint" not in reply.error.reason
    assert "init-checkpoint" in caplog.text


def _fisher_reply(arrays: dict[str, np.ndarray], weight: float) -> Message:
    content = RecordDict(
        {
            FISHER_KEY: ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
            METRICS_KEY: MetricRecord({"num-examples": weight}),
            SITE_KEY: ConfigRecord({"name": "site-x"}),
        }
    )
    return Message(content, dst_node_id=0, message_type=FISHER_MESSAGE)


def test_fisher_replies_are_validated_and_the_consolidated_file_round_trips(tmp_path: Path) -> None:
    shape = {"a": (2, 3), "b": (4,)}
    good = {k: np.full(s, 0.5, np.float32) for k, s in shape.items()}
    assert fisher_problem(_fisher_reply(good, 10), shape) is None
    negative = {**good, "b": np.array([1.0, -1.0, 0.0, 0.0], np.float32)}
    assert "negative" in str(fisher_problem(_fisher_reply(negative, 10), shape))
    assert "cover" in str(fisher_problem(_fisher_reply({"a": good["a"]}, 10), shape))
    assert "positive" in str(fisher_problem(_fisher_reply(good, 0), shape))
    anchor = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) for k, s in shape.items()}
    save_consolidated(tmp_path, anchor, good, {"sites": ["site-x"]})
    loaded_anchor, loaded_fisher = load_consolidated(tmp_path)
    for k in shape:
        np.testing.assert_array_equal(loaded_anchor[k], anchor[k])
        np.testing.assert_array_equal(loaded_fisher[k], good[k])
    blob = bytearray((tmp_path / "consolidated.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "consolidated.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_consolidated(tmp_path)
    with pytest.raises(ConfigError, match="ewc-consolidate"):
        load_consolidated(tmp_path / "elsewhere")
