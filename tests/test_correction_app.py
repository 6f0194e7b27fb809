"""The ClientApp's statistics stage, corrected evaluation and alignment, called in process.

A real message, a real model and a real site directory, without Flower's engine:
what the site charges, what leaves it (egress log), what it keeps, and how it
falls back when its unlabeled data are too few.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedshift.client.app import make_client_app
from fedshift.client.correction import CORRECTION_FILE
from fedshift.client.egress import BOOKKEEPING, METRIC, read_egress_log
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site_statistics import RELEASE_FILE, own_release
from fedshift.common.config import FederationConfig
from fedshift.common.data import Dataset, load_npz, save_npz
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.privacy import epsilon
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.shift_statistics import (
    GLOBAL_FILE,
    GLOBAL_KEY,
    STAGE_GLOBAL,
    STAGE_KEY,
    STAGE_RELEASE,
    STATISTICS_KEY,
    GlobalStatistics,
    aggregate_class_means,
    aggregate_moments,
    aggregate_prior,
    aggregate_within_variance,
)
from fedshift.tests.helpers import call_client_app, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)
SHIFT = ShiftConfig(correction=True, align_weight=1.0, align_dim=8, bootstrap=20, min_samples=20)


def _site(root: Path, n: int = 150, n_test: int = 40) -> Path:
    return write_site(root, n, n_val=30, n_test=n_test)


def _run_config(root: Path, shift: ShiftConfig = SHIFT, **extra: Any) -> dict[str, Any]:
    return site_run_config(root, **shift.to_run_config(), **extra)


def _arrays() -> ArrayRecord:
    return ArrayRecord(build_model(MODEL).shared_state_dict())


def _release_message() -> Message:
    config = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": 0})
    return Message(
        RecordDict({ARRAYS_KEY: _arrays(), CONFIG_KEY: config}), dst_node_id=0, message_type=MessageType.QUERY
    )


def _global_message(stats: GlobalStatistics) -> Message:
    content = RecordDict(
        {
            CONFIG_KEY: ConfigRecord({STAGE_KEY: STAGE_GLOBAL, "server-round": 0}),
            GLOBAL_KEY: ConfigRecord(stats.to_record()),
        }
    )
    return Message(content, dst_node_id=0, message_type=MessageType.QUERY)


def _message(kind: str, **config: Any) -> Message:
    content = RecordDict({ARRAYS_KEY: _arrays(), CONFIG_KEY: ConfigRecord(config)})
    return Message(content, dst_node_id=0, message_type=kind)


def _evaluate(split: str, server_round: int) -> Message:
    return _message(MessageType.EVALUATE, split=split, **{"server-round": server_round})


def test_statistics_stage_charges_first_and_sends_only_dp_statistics(tmp_path: Path) -> None:
    site_dir = _site(tmp_path)
    config = _run_config(tmp_path)
    app = make_client_app()
    reply = call_client_app(app, _release_message(), config)
    stats = reply.content.config_records[STATISTICS_KEY]
    ledger = PrivacyLedger.at(site_dir)
    charged = [(e.round, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]
    assert charged == [(0, "dp-label-counts", 2.0, 1.0, 1), (0, "dp-moments", 3.0, 1.0, 1)]
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon([(2.0, 1.0, 1), (3.0, 1.0, 1)], 1e-5))
    # the noisy counts are the true ones plus noise of std 2: within 5 sigma of the truth
    train = np.load(site_dir / "data.npz")["train_labels"].ravel()
    truth = np.bincount(train, minlength=2)
    counts = np.asarray(stats["label-counts"])
    assert np.all(np.abs(counts - truth) < 10) and np.any(counts != truth)
    assert np.asarray(stats["moment-sum"]).shape == (16,)  # per-class sums, 2 x 8
    assert np.asarray(stats["moment-square"]).shape == (2,)  # per-class squared norms
    assert "moment-outer" not in stats  # the prototype loss needs no outer products
    # the egress log lists exactly these, each with its DP mechanism; nothing else but the size and name
    entry = read_egress_log(site_dir)[-1]
    assert entry["blocked"] == []
    by_key = {(i["record"], i["key"]): i["mechanism"] for i in entry["items"]}
    assert by_key == {
        (STATISTICS_KEY, "label-counts"): "dp-label-counts",
        (STATISTICS_KEY, "moment-sum"): "dp-moments",
        (STATISTICS_KEY, "moment-square"): "dp-moments",
        (METRICS_KEY, "num-examples"): METRIC,
        ("site", "name"): BOOKKEEPING,
    }
    # asked again in the same run: the same release is sent again, nothing new is drawn or charged
    again = call_client_app(app, _release_message(), config).content.config_records[STATISTICS_KEY]
    assert np.asarray(again["label-counts"]).tolist() == counts.tolist()
    assert len(PrivacyLedger.at(site_dir).entries) == 2
    assert json.loads((site_dir / RELEASE_FILE).read_text())["run"] == "1"


@pytest.mark.parametrize("colour_run", [True, False])
def test_data_the_model_cannot_take_is_refused_before_the_statistics_are_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, colour_run: bool
) -> None:
    site_dir = _site(tmp_path)  # grey images in a colour run, or 3 classes of grey images in a binary one
    if not colour_run:
        data = load_npz(site_dir / "data.npz")
        data.split("train").labels[:3] = 2
        save_npz(site_dir / "data.npz", Dataset(data.splits, ("normal", "lesion", "effusion"), "s", True))
    config = _run_config(tmp_path, **({"image-channels": 3} if colour_run else {}))
    needle = "image-channels = 1" if colour_run else "num-classes = 3"
    reply = call_client_app(make_client_app(), _release_message(), config)
    assert reply.has_error() and not reply.has_content()
    message = next(r.getMessage() for r in caplog.records if needle in r.getMessage())
    assert "\n" not in message and "site-0's data" in message
    assert PrivacyLedger.at(site_dir).entries == ()  # nothing charged: the site can join a fixed run


def test_release_lost_after_its_charge_is_refused_not_redrawn(tmp_path: Path) -> None:
    site_dir = _site(tmp_path)
    config = _run_config(tmp_path)
    call_client_app(make_client_app(), _release_message(), config)
    (site_dir / RELEASE_FILE).unlink()
    reply = call_client_app(make_client_app(), _release_message(), config)
    assert reply.content.config_records["status"]["status"] == "statistics-lost"
    assert STATISTICS_KEY not in reply.content.config_records
    assert len(PrivacyLedger.at(site_dir).entries) == 2


def test_statistics_over_budget_are_refused(tmp_path: Path) -> None:
    site_dir = _site(tmp_path)
    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 0.5})
    reply = call_client_app(make_client_app(), _release_message(), config)
    assert reply.content.config_records["status"]["status"] == "budget-exhausted"
    assert not (site_dir / "privacy-ledger.json").exists()


def test_uncharged_statistic_is_blocked(tmp_path: Path) -> None:
    """A label count smuggled into a reply under the DP statistics' name, without a ledger charge."""
    site_dir = _site(tmp_path)

    def smuggle(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        reply.content.config_records[STATISTICS_KEY] = ConfigRecord({"label-counts": [3.0, 7.0]})
        return reply

    plain = _run_config(tmp_path, shift=ShiftConfig(), dp=False)
    reply = call_client_app(
        make_client_app(mods=[smuggle]), _message(MessageType.TRAIN, **{"server-round": 1}), plain
    )
    assert reply.content.config_records["status"]["status"] == "blocked"
    entry = read_egress_log(site_dir)[-1]
    assert entry["blocked"] == [
        "dp-statistics.label-counts (no 'dp-label-counts' charge for run 1 round 1 in the ledger)"
    ]


def _prepared_site(tmp_path: Path, n_test: int = 40, **shift: Any) -> tuple[Path, dict[str, Any]]:
    site_dir = _site(tmp_path, n_test=n_test)
    cfg = ShiftConfig(**{**SHIFT.__dict__, **shift})
    config = _run_config(tmp_path, shift=cfg)
    app = make_client_app()
    released = call_client_app(app, _release_message(), config).content.config_records[STATISTICS_KEY]
    k = cfg.align_dim
    counts = np.asarray(released["label-counts"])
    sums = np.asarray(released["moment-sum"]).reshape(2, k)
    mean, cov, within = None, None, None
    if cfg.align_loss == "coral":
        outer = np.asarray(released["moment-outer"]).reshape(k, k)
        mean, cov = aggregate_moments([sums.sum(axis=0)], [outer], [80.0])
    else:
        within = aggregate_within_variance([sums], [np.asarray(released["moment-square"])], counts, k)
    stats = GlobalStatistics(
        "1",
        1,
        train_prior=aggregate_prior([counts]),
        class_means=aggregate_class_means([sums], counts),
        within_var=within,
        moment_mean=mean,
        moment_cov=cov,
    )
    ack = call_client_app(app, _global_message(stats), config)
    assert set(ack.content.config_records) == {"site"}
    assert (site_dir / GLOBAL_FILE).is_file()
    return site_dir, config


def test_corrected_evaluation_sends_only_aggregate_metrics(tmp_path: Path) -> None:
    site_dir, config = _prepared_site(tmp_path, tta=True)
    reply = call_client_app(make_client_app(), _evaluate("test", 2), config)
    metrics = reply.content.metric_records[METRICS_KEY]
    for prefix in ("", "cal-", "ls-", "oracle-", "tta-", "tta-ls-"):
        assert 0 <= float(metrics[f"{prefix}accuracy"]) <= 1  # type: ignore[arg-type]
        assert float(metrics[f"{prefix}log-loss"]) > 0  # type: ignore[arg-type]
    entry = read_egress_log(site_dir)[-1]
    assert entry["blocked"] == []
    assert {i["mechanism"] for i in entry["items"]} == {METRIC, BOOKKEEPING}
    kept = json.loads((site_dir / CORRECTION_FILE).read_text())  # the estimate stays at the site
    assert kept["split"] == "test" and kept["n_unlabeled"] == 40 and kept["calibration"]["kind"] == "bcts"
    assert kept["fallback"] == (metrics["ls-fallback"] == 1.0)
    assert sum(kept["prior"]) == pytest.approx(1.0)


def test_too_little_unlabeled_data_falls_back_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_dir, config = _prepared_site(tmp_path, n_test=12)
    with caplog.at_level(logging.WARNING):
        reply = call_client_app(make_client_app(), _evaluate("test", 2), config)
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["ls-fallback"] == 1.0
    # no correction: the corrected predictions are the calibrated ones, not a prior from 12 images
    for key in ("log-loss", "accuracy", "ece"):
        assert metrics[f"ls-{key}"] == pytest.approx(metrics[f"cal-{key}"])
    assert "no correction at this site: only 12 unlabeled samples, fewer than min_samples=20" in caplog.text
    kept = json.loads((site_dir / CORRECTION_FILE).read_text())
    assert kept["fallback"] and kept["prior"] == kept["source_prior"]


def test_without_global_prior_the_site_evaluates_uncorrected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _site(tmp_path)
    shared_norms = _run_config(tmp_path, **{"local-norm": False})
    with caplog.at_level(logging.WARNING):
        reply = call_client_app(make_client_app(), _evaluate("test", 1), shared_norms)
    metrics = reply.content.metric_records[METRICS_KEY]
    assert "auc" in metrics and "ls-log-loss" not in metrics
    assert "no global training prior for this run" in caplog.text
    # with site-local norms the site corrects from its own training prior, which it has without the stage
    # (another round: round 1's test answer was sent already, and a repeat would get it again)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reply = call_client_app(make_client_app(), _evaluate("test", 2), _run_config(tmp_path))
    assert "ls-log-loss" in reply.content.metric_records[METRICS_KEY]
    assert "correcting from the site training prior" in caplog.text


def test_a_dp_site_corrects_from_its_dp_label_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The corrected metrics leave the site: under DP its own prior comes from its DP release of the label
    counts (post-processing), never the exact counts. Before, the exact training counts shaped them."""
    site_dir = _site(tmp_path)
    config = _run_config(tmp_path, **{"dp": True, "dp-epsilon": 8.0})
    app = make_client_app()
    call_client_app(app, _release_message(), config)
    own = own_release(site_dir, "1", 0)
    assert own is not None
    with caplog.at_level(logging.INFO):
        reply = call_client_app(app, _evaluate("test", 1), config)
    assert "ls-log-loss" in reply.content.metric_records[METRICS_KEY]
    [used] = [
        np.asarray(cast(tuple[Any, ...], r.args)[1])
        for r in caplog.records
        if "correcting from the site training prior" in r.getMessage()
    ]
    noisy = np.clip(np.asarray(own["label-counts"]), 0, None)
    np.testing.assert_allclose(used, (noisy + 1) / (noisy.sum() + 2))
    exact = np.bincount(np.load(site_dir / "data.npz")["train_labels"].ravel(), minlength=2)
    assert not np.allclose(used, (exact + 1) / (exact.sum() + 2))


@pytest.mark.parametrize("loss", ["prototype", "coral"])
def test_dp_training_with_alignment_plans_the_refreshed_moments(tmp_path: Path, loss: str) -> None:
    """Training charges DP-SGD only (CORAL's linearisation point is the site's own release: free); the
    moments refreshed before round 2 are charged then, and were planned into round 1's noise."""
    site_dir, config = _prepared_site(tmp_path, logit_adjust=1.0, align_loss=loss)
    config = {**config, "dp": True, "dp-epsilon": 8.0}
    reply = call_client_app(make_client_app(), _message(MessageType.TRAIN, **{"server-round": 1}), config)
    assert reply.content.config_records["privacy"]["mechanism"] == "dp-sgd"
    refresh = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": 2})
    msg = Message(
        RecordDict({ARRAYS_KEY: _arrays(), CONFIG_KEY: refresh}), dst_node_id=0, message_type="query"
    )
    released = call_client_app(make_client_app(), msg, config).content.config_records[STATISTICS_KEY]
    assert "label-counts" not in released and "moment-sum" in released  # counts are released once per run
    ledger = PrivacyLedger.at(site_dir)
    assert [(e.round, e.mechanism) for e in ledger.entries] == [
        (0, "dp-label-counts"),
        (0, "dp-moments"),
        (1, "dp-sgd"),
        (2, "dp-moments"),
    ]
    assert read_egress_log(site_dir)[-1]["blocked"] == []  # the refreshed moments' charge is found
    # the noise multiplier fits both rounds' DP-SGD and the refreshed moments into the budget
    sgd = ledger.entries[2]
    planned = [*ledger.history(), (sgd.noise_multiplier, sgd.sample_rate, sgd.steps)]
    assert epsilon(planned, 1e-5) <= 8.0
    assert read_egress_log(site_dir)[-1]["blocked"] == []


class _Grid:
    """A Flower Grid stand-in that delivers each message to an in-process ClientApp of its node."""

    def __init__(self, root: Path, run_config: dict[str, Any], nodes: int) -> None:
        self.app = make_client_app()
        self.root = root
        self.run_config = run_config
        self.nodes = nodes
        self.run = type("Run", (), {"run_id": 1})()

    def get_node_ids(self) -> list[int]:
        return list(range(self.nodes))

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node},
                state=RecordDict(),
                run_config=self.run_config,
            )
            replies.append(self.app(msg, context))
        return replies


def test_server_statistics_stage_with_two_sites_and_a_refresh(tmp_path: Path) -> None:
    from fedshift.server.statistics import StatisticsRefresh, collect_statistics, with_refresh
    from fedshift.server.strategy import AdapterFedAvg
    from fedshift.server.validation import expected_specs

    site_dirs = [_site(tmp_path)]
    other = tmp_path / "site-1"
    other.mkdir()
    (other / "data.npz").write_bytes((site_dirs[0] / "data.npz").read_bytes())
    site_dirs.append(other)
    fed = FederationConfig.from_run_config(_run_config(tmp_path))
    grid = _Grid(tmp_path, _run_config(tmp_path), nodes=2)
    arrays = _arrays()
    inner = AdapterFedAvg(
        expected=expected_specs(arrays),
        checkpoint_dir=tmp_path / "ckpt",
        model_config=MODEL,
        num_rounds=2,
    )
    stats = collect_statistics(grid, arrays, fed, "1", names=inner.names)  # type: ignore[arg-type]
    assert stats is not None and stats.sites == 2
    strategy = with_refresh(inner, fed, stats)
    assert isinstance(strategy, StatisticsRefresh) and strategy.statistics is stats
    labels = np.load(site_dirs[0] / "data.npz")["train_labels"].ravel()
    assert stats.train_prior is not None and stats.train_prior[1] == pytest.approx(labels.mean(), abs=0.05)
    assert stats.class_means is not None and stats.class_means.shape == (2, 8)
    assert stats.within_var is not None and stats.within_var > 0
    kept = [GlobalStatistics.from_record(json.loads((d / GLOBAL_FILE).read_text())) for d in site_dirs]
    for k in kept:  # every site holds the same global statistics of this run
        np.testing.assert_allclose(k.class_means, stats.class_means)  # type: ignore[arg-type]
        assert k.run == "1" and k.round == 0
    # before round 2 the moments are released again (charged at round 2), the label counts are not
    list(strategy.configure_train(2, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    assert strategy.statistics is not None and strategy.statistics.round == 2
    np.testing.assert_allclose(strategy.statistics.train_prior, stats.train_prior)  # type: ignore[arg-type]
    assert strategy.statistics.within_var == stats.within_var  # round 0's scale is kept
    assert not np.allclose(strategy.statistics.class_means, stats.class_means)  # type: ignore[arg-type]
    for d in site_dirs:
        ledger = PrivacyLedger.at(d)
        assert [(e.round, e.mechanism) for e in ledger.entries] == [
            (0, "dp-label-counts"),
            (0, "dp-moments"),
            (2, "dp-moments"),
        ]
        assert GlobalStatistics.from_record(json.loads((d / GLOBAL_FILE).read_text())).round == 2
