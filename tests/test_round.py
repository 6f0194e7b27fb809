"""The client round planner: what a training round releases, charged before the data is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedshift.client.ledger import PrivacyLedger
from fedshift.client.round import Releases, plan_training
from fedshift.client.site import SiteSettings
from fedshift.common.config import FederationConfig
from fedshift.common.errors import BudgetExhaustedError, RoundRefusedError
from fedshift.common.model import FedshiftModel, ModelConfig, build_model
from fedshift.common.privacy import epsilon
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, MECHANISM_DP_SGD, PrivacyReport
from fedshift.tests.helpers import site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")


def _setup(root: Path, **values: Any) -> tuple[FederationConfig, SiteSettings, FedshiftModel]:
    fed = FederationConfig.from_run_config(site_run_config(root, num_rounds=3, **values))
    site = SiteSettings.from_node_config({"partition-id": 0}, fed)
    return site.federation(fed), site, build_model(ModelConfig(image_size=32))


def _message(server_round: int) -> Message:
    arrays = ArrayRecord(build_model(ModelConfig(image_size=32)).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_dp_round_with_ewc_plans_and_charges_every_release(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    values = {"dp": True, "dp-epsilon": 8.0, "ewc-lambda": 50.0, "ewc-fisher-source": "dp"}
    fed, site, model = _setup(tmp_path, **values, **{"ewc-consolidate": True, "ewc-fisher-samples": 32})
    plan = plan_training(_message(1), fed, site, model)
    releases = plan.releases
    assert plan.private is not None and plan.gradient_term is not None and plan.fisher_source == "dp"
    assert [r.mechanism for r in releases.charged] == ["dp-sgd", "dp-fisher"]
    assert releases.charged[0].cost == plan.private.cost == (plan.private.noise_multiplier, 20 / 60, 3)
    assert releases.charged[1].cost == (5.0, 1.0, 1) and releases.final == ((5.0, 1.0, 1),)
    assert releases.counted == ()  # no alignment: no refreshed moments
    ledger = PrivacyLedger.at(site_dir)
    assert tuple(ledger.entries) == releases.entries  # written before the plan came back
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon([c.cost for c in releases.charged], 1e-5))
    # the noise leaves room for all 3 rounds' releases and the end-of-run Fisher, and no more
    run = [c.cost for c in releases.charged] * 3 + [*releases.final]
    assert epsilon(run, 1e-5) <= 8.0
    report = plan.report(site).to_record()
    assert report["mechanism"] == "dp-sgd" and report["ewc-fisher"] == "dp"
    assert report["epsilon"] == releases.entries[-1].epsilon
    with pytest.raises(RoundRefusedError, match="come after round 1"):  # the same round again
        plan_training(_message(1), fed, site, model)
    assert len(PrivacyLedger.at(site_dir).entries) == 2


def test_a_round_without_dp_releases_nothing_and_opens_no_ledger(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    fed, site, model = _setup(tmp_path, dp=False)
    plan = plan_training(_message(1), fed, site, model)
    assert plan.private is None and plan.releases == Releases() and plan.gradient_term is None
    assert plan.report(site).to_record() == {"mechanism": "none"}
    assert not (site_dir / "privacy-ledger.json").exists()


def test_a_round_over_the_budget_is_refused_before_any_charge(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    fed, site, model = _setup(tmp_path, **{"dp": True, "dp-epsilon": 8.0, "dp-noise-multiplier": 0.3})
    with pytest.raises(BudgetExhaustedError, match="round 1 to fit the budget epsilon=8"):
        plan_training(_message(1), fed, site, model)
    assert not (site_dir / "privacy-ledger.json").exists()


def test_the_charges_are_written_before_the_objective_or_the_fisher_reads_the_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features that touch the training images run only once the ledger holds the round's charges."""
    import fedshift.client.round as round_module

    site_dir = write_site(tmp_path)
    fed, site, model = _setup(
        tmp_path, dp=True, **{"dp-epsilon": 8.0, "ewc-lambda": 50.0, "ewc-fisher-source": "dp"}
    )
    seen: list[tuple[str, list[str]]] = []

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, [e.mechanism for e in PrivacyLedger.at(site_dir).entries]))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(round_module, "training_objective", spy("objective", round_module.training_objective))
    monkeypatch.setattr(round_module, "ewc_term", spy("ewc", round_module.ewc_term))
    plan_training(_message(1), fed, site, model)
    assert seen == [("objective", ["dp-sgd", "dp-fisher"]), ("ewc", ["dp-sgd", "dp-fisher"])]


def test_the_privacy_report_reads_back_what_it_writes() -> None:
    report = PrivacyReport(
        MECHANISM_DP_SGD, epsilon=1.5, delta=1e-5, noise_multiplier=1.1, steps=3, ewc_fisher="dp"
    )
    record = report.to_record()
    assert list(record) == ["mechanism", "epsilon", "delta", "noise-multiplier", "steps", "ewc-fisher"]
    assert PrivacyReport.from_record(record) == report
    with pytest.raises(ValueError, match="'mechanism' and only the fields"):
        PrivacyReport.from_record({**record, "train-loss": 0.3})
    with pytest.raises(ValueError, match="'mechanism' and only the fields"):
        PrivacyReport.from_record({"epsilon": 1.0})


def test_a_site_with_more_classes_than_the_model_refuses_before_any_privacy_is_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedshift.client.app import make_client_app
    from fedshift.common.data import Dataset, load_npz, save_npz
    from fedshift.tests.helpers import call_client_app

    site_dir = write_site(tmp_path)
    data = load_npz(site_dir / "data.npz")
    data.split("train").labels[:5] = 2  # a third class the binary model cannot predict
    save_npz(site_dir / "data.npz", Dataset(data.splits, ("normal", "lesion", "effusion"), data.source, True))
    config = site_run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0})
    arrays = ArrayRecord(build_model(ModelConfig(image_size=32)).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": 1})})
    reply = call_client_app(
        make_client_app(), Message(content, dst_node_id=0, message_type=MessageType.TRAIN), config
    )
    assert reply.has_error() and not reply.has_content()
    message = next(r.getMessage() for r in caplog.records if "num-classes" in r.getMessage())
    assert (
        "\n" not in message and "has 3 (normal, lesion, effusion)" in message and "num-classes = 3" in message
    )
    assert PrivacyLedger.at(site_dir).entries == ()
