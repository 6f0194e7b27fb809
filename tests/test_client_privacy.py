"""The ClientApp under DP, called in process: ledger charges, egress log, budget refusal, blocking.

The same ClientApp runs in simulation and deployment; here it gets a real
message, a real model and a real site directory, without Flower's engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import PRVAccountant

from fedshift.client.app import make_client_app
from fedshift.client.egress import EGRESS_LOG_FILE, read_egress_log
from fedshift.client.ledger import PrivacyLedger
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig, build_model, size_report
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_ERROR
from fedshift.tests.helpers import assert_tight_and_sound, call_client_app, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)


def _run_config(root: Path, **privacy: Any) -> dict[str, Any]:
    return site_run_config(root, num_rounds=3, **privacy)


def _train_message(server_round: int) -> Message:
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _sent_items(reply: Message) -> set[tuple[str, str, int]]:
    """(record, key, bytes) of everything in the reply: what actually leaves."""
    content = reply.content
    items = {
        (name, k, int(a.numpy().nbytes))
        for name, rec in content.array_records.items()
        for k, a in rec.items()
    }
    items |= {(name, k, 8) for name, rec in content.metric_records.items() for k in rec}
    for name, rec in content.config_records.items():
        for k, v in rec.items():
            items.add((name, k, len(v) if isinstance(v, str | bytes) else 8))
    return items


def test_dp_round_charges_ledger_and_logs_exactly_what_left(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0, "dp-clip-norm": 1.0})
    app = make_client_app()
    replies = [call_client_app(app, _train_message(r), config) for r in (1, 2)]
    ledger = PrivacyLedger.at(site_dir)
    assert [e.round for e in ledger.entries] == [1, 2]
    first = ledger.entries[0]
    assert (first.sample_rate, first.steps) == (pytest.approx(20 / 60), 3)
    assert_tight_and_sound(ledger)  # the ledger of real rounds: PRV, never below dp-accounting's PLD
    reply = replies[-1]
    privacy = reply.content.config_records["privacy"]
    assert privacy["mechanism"] == "dp-sgd"
    assert float(cast(float, privacy["epsilon"])) == pytest.approx(ledger.epsilon(1e-5), abs=1e-9)
    # the noise multiplier fits all 3 planned rounds into epsilon 8
    assert ledger.epsilon_if(first.noise_multiplier, first.sample_rate, first.steps, 1e-5) <= 8.0
    # the egress log lists exactly what left: every key, its bytes, and a mechanism for each
    log = read_egress_log(site_dir)
    assert [e["round"] for e in log] == [1, 2]
    logged = {(i["record"], i["key"], i["bytes"]) for i in log[-1]["items"]}
    assert logged == _sent_items(reply)
    mechanisms = {(i["record"], i["mechanism"]) for i in log[-1]["items"]}
    assert {m for r, m in mechanisms if r == ARRAYS_KEY} == {"dp-sgd"}
    shared_bytes = size_report(build_model(MODEL))["shared_bytes"]
    assert sum(i["bytes"] for i in log[-1]["items"] if i["record"] == ARRAYS_KEY) == shared_bytes
    assert {i["key"] for i in log[-1]["items"] if i["record"] == ARRAYS_KEY} == set(
        build_model(MODEL).shared_state_dict()
    )
    assert log[-1]["blocked"] == []


def test_site_at_its_budget_refuses_and_sends_no_update(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    ledger = PrivacyLedger.at(site_dir)
    ledger.charge(
        run_id="0", round=1, mechanism="dp-sgd", noise_multiplier=0.8, sample_rate=0.3, steps=40, delta=1e-5
    )
    spent = ledger.epsilon(1e-5)
    before = (site_dir / "privacy-ledger.json").read_bytes()
    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": spent + 0.001})
    reply = call_client_app(make_client_app(), _train_message(1), config)
    status = reply.content.config_records["status"]
    assert status["status"] == "budget-exhausted"
    assert "epsilon" in str(status["reason"])
    assert not reply.content.array_records and not reply.content.metric_records
    assert (site_dir / "privacy-ledger.json").read_bytes() == before  # nothing charged
    assert read_egress_log(site_dir)[-1]["bytes"] == sum(
        len(str(v)) if isinstance(v, str) else 8
        for rec in reply.content.config_records.values()
        for v in rec.values()
    )


@pytest.mark.parametrize(
    ("record", "blocked"),
    [
        (METRICS_KEY, "metrics.label-count-1 (metric not in the site's egress-metrics)"),
        ("privacy", "privacy.label-count-1 (not a declared bookkeeping field)"),
    ],
)
def test_unaccounted_statistic_is_blocked(tmp_path: Path, record: str, blocked: str) -> None:
    """Label counts (private, unaccounted) cannot leave, as a metric or hidden in bookkeeping."""
    site_dir = write_site(tmp_path)

    def leak_label_counts(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if record == METRICS_KEY:
            reply.content.metric_records[METRICS_KEY]["label-count-1"] = 30
        else:
            reply.content.config_records[record]["label-count-1"] = 30
        return reply

    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0})
    reply = call_client_app(make_client_app(mods=[leak_label_counts]), _train_message(1), config)
    assert reply.content.config_records["status"]["status"] == "blocked"
    assert not reply.content.array_records and not reply.content.metric_records
    entry = read_egress_log(site_dir)[-1]
    assert entry["blocked"] == [blocked]
    assert {i["record"] for i in entry["items"]} == {"site", "status"}


def test_dp_off_must_be_explicit_and_shows_in_the_log(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    reply = call_client_app(make_client_app(), _train_message(1), _run_config(tmp_path, dp=False))
    assert reply.content.config_records["privacy"]["mechanism"] == "none"
    items = read_egress_log(site_dir)[-1]["items"]
    assert {i["mechanism"] for i in items if i["record"] == ARRAYS_KEY} == {"none (dp=false at this site)"}
    assert not (site_dir / "privacy-ledger.json").exists()
    assert (site_dir / EGRESS_LOG_FILE).stat().st_mode & 0o777 == 0o600


def test_metrics_record_type_is_flower_s(tmp_path: Path) -> None:
    """Guard against replies Flower cannot serialise: the metrics are a MetricRecord of numbers."""
    write_site(tmp_path)
    reply = call_client_app(make_client_app(), _train_message(1), _run_config(tmp_path, dp=False))
    assert isinstance(reply.content.metric_records[METRICS_KEY], MetricRecord)
    assert all(isinstance(v, int | float) for v in reply.content.metric_records[METRICS_KEY].values())


def test_corrupt_ledger_stops_training_and_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_dir = write_site(tmp_path)
    ledger_file = site_dir / "privacy-ledger.json"
    ledger_file.write_text('{"format": "fedshift-privacy-ledger", "version": 1, "entries": [')
    before = ledger_file.read_bytes()
    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0})
    with caplog.at_level(logging.ERROR):
        reply = call_client_app(make_client_app(), _train_message(1), config)
    # the site's log has the reason (one line, no traceback); the server gets a generic error
    assert reply.has_error() and reply.error.reason == SITE_ERROR
    logged = [r for r in caplog.records if "privacy-ledger.json" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None
    assert ledger_file.read_bytes() == before
    entry = read_egress_log(site_dir)[-1]  # nothing but the error left the site
    assert (entry["items"], entry["bytes"], entry["error"]) == ([], 0, SITE_ERROR)


def test_ewc_with_a_dp_fisher_is_charged_and_planned(tmp_path: Path) -> None:
    """EWC's Fisher on private images is a DP release: charged with the round, counted in the plan."""
    site_dir = write_site(tmp_path)
    config = _run_config(
        tmp_path,
        **{
            "dp": True,
            "dp-epsilon": 8.0,
            "ewc-lambda": 50.0,
            "ewc-fisher-source": "dp",
            "ewc-fisher-samples": 32,
        },
    )
    replies = [call_client_app(make_client_app(), _train_message(r), config) for r in (1, 2)]
    ledger = PrivacyLedger.at(site_dir)
    assert [(e.round, e.mechanism) for e in ledger.entries] == [
        (1, "dp-sgd"),
        (1, "dp-fisher"),
        (2, "dp-sgd"),
        (2, "dp-fisher"),
    ]
    fisher = ledger.entries[1]
    assert (fisher.noise_multiplier, fisher.sample_rate, fisher.steps) == (5.0, 1.0, 1)
    assert_tight_and_sound(ledger)  # the ledger of real rounds: PRV, never below dp-accounting's PLD
    privacy = replies[-1].content.config_records["privacy"]
    assert privacy["ewc-fisher"] == "dp"
    assert float(cast(float, privacy["epsilon"])) == pytest.approx(ledger.epsilon(1e-5), abs=1e-9)
    # the noise multiplier was planned with the Fisher releases of all 3 rounds inside the budget
    sgd = ledger.entries[0]
    planned = [*ledger.history(), (sgd.noise_multiplier, sgd.sample_rate, sgd.steps), (5.0, 1.0, 1)]
    reference = PRVAccountant()
    reference.history = planned
    assert reference.get_epsilon(1e-5) <= 8.0


def test_ewc_with_a_public_fisher_costs_nothing(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    config = _run_config(tmp_path, **{"dp": False, "ewc-lambda": 50.0, "ewc-fisher-source": "public"})
    reply = call_client_app(make_client_app(), _train_message(1), config)
    assert reply.content.config_records["privacy"]["ewc-fisher"] == "public (synthetic images)"
    assert not (site_dir / "privacy-ledger.json").exists()


@pytest.mark.parametrize("value", ["abc", -1.0])
def test_bad_ewc_lambda_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="Expected run-config 'ewc-lambda' to be a finite number >= 0"):
        FederationConfig.from_run_config({"ewc-lambda": value})


def test_the_run_config_is_parsed_once_per_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The egress guard and the handler share one parse of the message's settings."""
    write_site(tmp_path)
    config = _run_config(tmp_path, dp=False)
    calls: list[int] = []
    original = FederationConfig.from_run_config.__func__  # type: ignore[attr-defined]

    def counted(cls: type[FederationConfig], values: Any) -> FederationConfig:
        calls.append(1)
        return cast(FederationConfig, original(cls, values))

    monkeypatch.setattr(FederationConfig, "from_run_config", classmethod(counted))
    app = make_client_app()
    reply = call_client_app(app, _train_message(1), config)
    assert "arrays" in reply.content.array_records
    assert len(calls) == 1
    call_client_app(app, _train_message(2), config)
    assert len(calls) == 2  # the next message (a new context) is parsed afresh
