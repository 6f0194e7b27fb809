"""Every number that leaves a site is allowed and accounted: evaluation metrics and statistics.

The real ClientApp in process, with real messages, a real model and a real site
directory: the splits a site evaluates, one answer per (run, round, split), the
keys of every reply, what the egress log records, and what an exception sends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedshift.client.app import make_client_app
from fedshift.client.egress import EVALUATIONS_DIR, read_egress_log
from fedshift.client.site import SiteSettings
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    SITE_ERROR,
    STATUS_KEY,
    STATUS_ROUND_REFUSED,
    STATUS_SPLIT_NOT_ALLOWED,
)
from fedshift.tests.helpers import call_client_app, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)
N_TRAIN, N_VAL, N_TEST = 60, 15, 15
# what an evaluation of one split sends: aggregate metrics of that split, WITHOUT DP (README)
EVALUATION_KEYS = {"num-examples", "auc", "accuracy", "balanced-accuracy", "log-loss", "ece", "n"}


def _arrays(seed: int = 0) -> ArrayRecord:
    """The shared tensors of a fresh model; ``seed`` > 0 moves the head (a different global model)."""
    state = build_model(MODEL).shared_state_dict()
    if seed:
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + (torch.randn(v.shape, generator=gen) if "head" in k else 0) for k, v in state.items()}
    return ArrayRecord(state)


def _message(kind: str, server_round: int, seed: int = 0, **config: Any) -> Message:
    content = RecordDict(
        {ARRAYS_KEY: _arrays(seed), CONFIG_KEY: ConfigRecord({"server-round": server_round, **config})}
    )
    return Message(content, dst_node_id=0, message_type=kind)


class _Calls:
    """A client mod inside the egress guard that counts the messages reaching the handlers."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        self.count += 1
        return call_next(msg, context)  # type: ignore[no-any-return]


def _bytes(reply: Message) -> bytes:
    return recorddict_to_proto(reply.content).SerializeToString()  # type: ignore[no-any-return]


def _config(root: Path, **values: Any) -> dict[str, Any]:
    return site_run_config(root, num_rounds=3, **values)


def test_train_split_is_refused_without_running_site_code(tmp_path: Path) -> None:
    """Before, the reply carried auc/accuracy/n of the training split, and no split was logged."""
    site_dir = write_site(tmp_path)
    calls = _Calls()
    app = make_client_app(mods=[calls])
    reply = call_client_app(app, _message(MessageType.EVALUATE, 1, split="train"), _config(tmp_path))
    status = reply.content.config_records[STATUS_KEY]
    assert status["status"] == STATUS_SPLIT_NOT_ALLOWED
    assert "'train'" in str(status["reason"]) and "test, val" in str(status["reason"])
    assert not reply.content.metric_records and calls.count == 0  # no numbers; no site code ran
    entry = read_egress_log(site_dir)[-1]
    assert entry["split"] == "train"
    assert entry["request"] == {
        "type": MessageType.EVALUATE,
        "run": "1",
        "round": 1,
        "split": "train",
        "config": {"server-round": 1, "split": "train"},
    }
    assert {i["record"] for i in entry["items"]} == {"site", STATUS_KEY}


def test_a_site_narrows_its_splits_and_never_lists_train(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    (site_dir / "site.toml").write_text('eval-splits = "test"\n')
    app = make_client_app()
    val = call_client_app(app, _message(MessageType.EVALUATE, 1, split="val"), _config(tmp_path))
    assert val.content.config_records[STATUS_KEY]["status"] == STATUS_SPLIT_NOT_ALLOWED
    test = call_client_app(app, _message(MessageType.EVALUATE, 3, split="test"), _config(tmp_path))
    assert set(test.content.metric_records[METRICS_KEY]) == EVALUATION_KEYS
    fed = FederationConfig()
    for value in ("val,train", ["train"]):
        with pytest.raises(ConfigError, match=r"Expected eval-splits to name only val, test.*remove train"):
            SiteSettings.from_node_config({"data-path": "site.npz", "eval-splits": value}, fed)
    with pytest.raises(ConfigError, match="subset of val, test, but got 'validation'"):
        SiteSettings.from_node_config({"data-path": "site.npz", "eval-splits": "validation"}, fed)


def test_a_site_narrows_the_metrics_it_sends(tmp_path: Path) -> None:
    """Before, a site whose egress-metrics left out one of fedshift's metrics got every evaluation
    replaced by a "blocked" refusal; now the others leave and the log names what was withheld."""
    site_dir = write_site(tmp_path)
    (site_dir / "site.toml").write_text('egress-metrics = "num-examples,auc,n"\n')
    reply = call_client_app(
        make_client_app(), _message(MessageType.EVALUATE, 1, split="val"), _config(tmp_path)
    )
    assert set(reply.content.metric_records[METRICS_KEY]) == {"num-examples", "auc", "n"}
    entry = read_egress_log(site_dir)[-1]
    assert entry["withheld"] == sorted(EVALUATION_KEYS - {"num-examples", "auc", "n"})
    assert entry["blocked"] == []
    assert {i["key"] for i in entry["items"] if i["record"] == METRICS_KEY} == {"num-examples", "auc", "n"}


def test_each_round_and_split_is_evaluated_once(tmp_path: Path) -> None:
    """Before, a repeated evaluate ran the model again: a different global model gave new numbers."""
    site_dir = write_site(tmp_path)
    calls = _Calls()
    app = make_client_app(mods=[calls])
    config = _config(tmp_path)
    first = call_client_app(app, _message(MessageType.EVALUATE, 1, seed=0, split="val"), config)
    again = call_client_app(app, _message(MessageType.EVALUATE, 1, seed=7, split="val"), config)
    assert calls.count == 1  # the model ran once
    assert _bytes(again) == _bytes(first)  # the stored answer, byte for byte
    assert len(list((site_dir / EVALUATIONS_DIR).rglob("*"))) == 2  # run-1/round-1-val
    # the same model at the next round is evaluated: its numbers differ (the repeat above was not luck)
    later = call_client_app(app, _message(MessageType.EVALUATE, 2, seed=7, split="val"), config)
    assert calls.count == 2
    assert later.content.metric_records[METRICS_KEY]["log-loss"] != pytest.approx(
        first.content.metric_records[METRICS_KEY]["log-loss"]
    )
    # test is another split of round 1: evaluated (once)
    call_client_app(app, _message(MessageType.EVALUATE, 1, seed=7, split="test"), config)
    assert calls.count == 3
    log = read_egress_log(site_dir)
    assert [(e["round"], e["split"], e["repeat"]) for e in log] == [
        (1, "val", False),
        (1, "val", True),
        (2, "val", False),
        (1, "test", False),
    ]
    assert log[0]["items"] == log[1]["items"] and log[1]["request"]["config"]["split"] == "val"


@pytest.mark.parametrize("server_round", [0, 4, 7])
def test_evaluate_round_outside_the_run_is_refused(tmp_path: Path, server_round: int) -> None:
    """Before, any round number got fresh numbers: an unbounded count of queries in one run."""
    write_site(tmp_path)
    calls = _Calls()
    msg = _message(MessageType.EVALUATE, server_round, split="val")
    reply = call_client_app(make_client_app(mods=[calls]), msg, _config(tmp_path))
    assert reply.content.config_records[STATUS_KEY]["status"] == STATUS_ROUND_REFUSED
    assert not reply.content.metric_records and calls.count == 0


@pytest.mark.parametrize("dp", [True, False])
def test_replies_carry_no_training_statistic_without_dp(tmp_path: Path, dp: bool) -> None:
    """Before, a training reply carried train-loss (the private batches' loss, no DP) and val metrics."""
    site_dir = write_site(tmp_path, n=N_TRAIN + N_VAL + N_TEST, n_val=N_VAL, n_test=N_TEST)
    config = _config(tmp_path, dp=dp, **({"dp-epsilon": 8.0} if dp else {}))
    app = make_client_app()
    train = call_client_app(app, _message(MessageType.TRAIN, 1), config)
    metrics = train.content.metric_records[METRICS_KEY]
    assert set(metrics) == {"num-examples", "samples-per-second"}
    assert metrics["num-examples"] == N_TRAIN  # the FedAvg weight; DP-SGD's sample rate discloses it too
    privacy = train.content.config_records["privacy"]
    if dp:
        assert float(privacy["sample-rate"]) == pytest.approx(20 / N_TRAIN)  # type: ignore[arg-type]
    for split, n in (("val", N_VAL), ("test", N_TEST)):
        reply = call_client_app(app, _message(MessageType.EVALUATE, 1, split=split), config)
        assert set(reply.content.metric_records[METRICS_KEY]) == EVALUATION_KEYS
        assert reply.content.metric_records[METRICS_KEY]["n"] == n
    assert all(e["blocked"] == [] for e in read_egress_log(site_dir))


def _raises(msg: Message, context: Context, call_next: Any) -> Message:
    raise RuntimeError("patient 0017 has label 1")


def _error_reply(msg: Message, context: Context, call_next: Any) -> Message:
    return Message(Error(code=0, reason="site path /data/ward-7/site.npz"), reply_to=msg)


@pytest.mark.parametrize("mod", [_raises, _error_reply])
def test_a_failure_sends_a_generic_error_and_its_text_stays_at_the_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mod: Any
) -> None:
    """Before, the exception left the ClientApp, and Flower sends its text (``"<class ...>:<'...'>"``,
    flwr/supernode/runtime/run_clientapp.py) to the server; an inner error reply passed unchanged."""
    site_dir = write_site(tmp_path)
    with caplog.at_level(logging.INFO):
        reply = call_client_app(
            make_client_app(mods=[mod]), _message(MessageType.TRAIN, 1), _config(tmp_path)
        )
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (2, SITE_ERROR)  # CLIENT_APP_RAISED_EXCEPTION
    secret = "patient 0017" if mod is _raises else "ward-7"
    assert secret in caplog.text  # the site's own log has it
    if mod is _raises:
        assert any(r.exc_info is not None for r in caplog.records)  # with the traceback
    entry = read_egress_log(site_dir)[-1]
    assert (entry["items"], entry["bytes"], entry["error"]) == ([], 0, SITE_ERROR)
    assert secret not in (site_dir / "egress-log.jsonl").read_text()


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
@pytest.mark.parametrize("server_round", ["x", float("nan"), float("inf"), 2.5, True])
def test_a_bad_round_number_is_refused_inside_the_guard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, server_round: Any
) -> None:
    """Before, ``describe_request`` ran ``int(server-round)`` outside the guard's catch: "x", NaN or inf
    raised out of the ClientApp (under plain Flower its text goes to the server), nothing was logged."""
    site_dir = write_site(tmp_path)
    calls = _Calls()
    msg = _message(kind, 1, split="val")
    msg.content.config_records[CONFIG_KEY]["server-round"] = server_round
    with caplog.at_level(logging.WARNING):
        reply = call_client_app(make_client_app(mods=[calls]), msg, _config(tmp_path))
    status = reply.content.config_records[STATUS_KEY]
    assert status["status"] == STATUS_ROUND_REFUSED and "Expected server-round to be a whole number" in str(
        status["reason"]
    )
    assert not reply.content.metric_records and not reply.content.array_records and calls.count == 0
    assert "refused" in caplog.text and not any(r.exc_info for r in caplog.records)
    entry = read_egress_log(site_dir)[-1]
    assert entry["round"] is None and entry["blocked"] == []
    assert {i["record"] for i in entry["items"]} == {"site", STATUS_KEY}
