"""The server checks what it actually received.

Every test feeds real Flower ``Message``/``ArrayRecord``/``MetricRecord`` replies to
the strategy's real ``aggregate_train``/``aggregate_evaluate`` (or to Flower's own
round loop, ``Strategy.start``) and checks that a bad reply is logged and left out
while the others are averaged exactly as ``np.average`` over them.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message
from flwr.serverapp.strategy import FedAvg

from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.server.app import final_evaluation
from fedshift.server.consolidation import fisher_problem
from fedshift.server.enrollment import SiteNames, load_enrollment, wait_for_enrolled
from fedshift.server.strategy import NO_REPLY, AdapterFedAvg
from fedshift.server.validation import weight_problem
from fedshift.tests.test_strategy import SHAPES, make_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

TRAIN_METRICS = {"train-loss": 0.5, "samples-per-second": 100.0}
EVAL_METRICS = {"auc": 0.8, "accuracy": 0.7}


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _reply(
    node: int,
    arrays: dict[str, np.ndarray] | ArrayRecord | None,
    n: float,
    name: str | None = None,
    metrics: dict[str, float] | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A real reply of ``node`` (Flower sets its src_node_id from the instruction it answers)."""
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=message_type)
    default = TRAIN_METRICS if message_type == MessageType.TRAIN else EVAL_METRICS
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": n, **(default if metrics is None else metrics)}),
            "site": ConfigRecord({"name": name or f"site-{node}"}),
        }
    )
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else _record(arrays)
    return Message(content, reply_to=ins)


def _assert_average(agg: ArrayRecord | None, arrays: list[dict[str, np.ndarray]], weights: list[int]) -> None:
    assert agg is not None
    for key in SHAPES:
        expected = np.average(np.stack([a[key] for a in arrays]), axis=0, weights=weights)
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-7)


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _lying(good: dict[str, np.ndarray], key: str, data: bytes) -> ArrayRecord:
    """``good`` with ``key``'s data replaced by ``data`` while its declared dtype and shape stay right."""
    record = _record(good)
    declared = record[key]
    record[key] = Array(dtype=declared.dtype, shape=tuple(declared.shape), stype=declared.stype, data=data)
    return record


# (a) the decoded data, not the declaration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("shape", "declares shape (4, 6) but its data has shape (1, 6)"),
        ("dtype", "declares dtype float32 but its data has dtype float64"),
        ("bytes", "does not decode as an array"),
    ],
)
def test_data_that_differs_from_its_declaration_is_left_out(
    tmp_path: Path, kind: str, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    # before: only the declared shape/dtype were checked; the (1, 6) data was broadcast into the
    # average, float64 data averaged in, and undecodable bytes raised out of reply_problem
    strategy = make_strategy(tmp_path)
    a, b, c = _arrays(1), _arrays(2), _arrays(3)
    data = {
        "shape": _npy(np.full((1, 6), 1e3, np.float32)),
        "dtype": _npy(c["lora.down"].astype(np.float64)),
        "bytes": b"\x93NUMPY not really",
    }[kind]
    bad = _reply(7, _lying(c, "lora.down", data), 50)
    assert (
        tuple(bad.content.array_records["arrays"]["lora.down"].shape) == SHAPES["lora.down"]
    )  # declared right
    with caplog.at_level(logging.WARNING, logger="fedshift.server.strategy"):
        agg, _ = strategy.aggregate_train(1, [_reply(1, a, 20), bad, _reply(2, b, 60)])
    _assert_average(agg, [a, b], [20, 60])
    assert [(r["node"], r["site"]) for r in strategy.history.rejected] == [(7, "site-7")]
    assert needle in strategy.history.rejected[0]["reason"]
    assert needle in caplog.text
    assert sorted(strategy.history.train[1]) == ["site-1", "site-2"]


# (b) FedAvg weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [float("inf"), 1e300, 2.5, 1_000_001, float("nan"), -5, 0])
def test_an_unusable_weight_is_left_out(tmp_path: Path, weight: float) -> None:
    # before: inf made the average NaN, 1e300 made it that one site's arrays, 2.5 and 1_000_001 counted
    strategy = make_strategy(tmp_path)
    a, b = _arrays(1), _arrays(2)
    agg, _ = strategy.aggregate_train(1, [_reply(1, a, 20), _reply(3, _arrays(3), weight), _reply(2, b, 60)])
    _assert_average(agg, [a, b], [20, 60])
    assert [r["node"] for r in strategy.history.rejected] == [3]
    assert "'num-examples' to be a positive whole number <= 1000000" in strategy.history.rejected[0]["reason"]
    assert np.isfinite(load_checkpoint(tmp_path / "ckpt").arrays["head.bias"]).all()


def test_the_weight_cap_comes_from_the_run_config(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config({"max-num-examples": 100})
    assert cfg.max_num_examples == 100
    strategy = make_strategy(tmp_path, max_num_examples=cfg.max_num_examples)
    a, b = _arrays(1), _arrays(2)
    agg, _ = strategy.aggregate_train(1, [_reply(1, a, 100), _reply(2, b, 101), _reply(3, b, 100.0)])
    _assert_average(agg, [a, b], [100, 100])  # 100.0 is a whole number: kept
    assert [r["node"] for r in strategy.history.rejected] == [2]
    assert weight_problem(100, 100) is None and weight_problem(True, 100) is not None
    with pytest.raises(ConfigError, match="'max-num-examples' to be an integer >= 1, but got 0"):
        FederationConfig.from_run_config({"max-num-examples": 0})


# (c) metric key sets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "left_out"),
    [({"samples-per-second": 90.0}, ["train-loss"]), ({}, ["samples-per-second", "train-loss"])],
    ids=["one key withheld", "only num-examples"],
)
def test_a_site_that_narrows_its_metrics_still_has_its_arrays_averaged_in(
    tmp_path: Path, metrics: dict[str, float], left_out: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # before: its reply's key set differed from the others' and it was left out every round (its
    # DP update thrown away); in a 2-site tie the narrowed set even pushed out the honest site
    strategy = make_strategy(tmp_path)
    a, b, c = _arrays(1), _arrays(2), _arrays(3)
    for rnd, honest in ((1, [_reply(1, a, 20), _reply(2, b, 60)]), (2, [_reply(1, a, 20)])):
        narrowed = _reply(5, c, 40, metrics=metrics)
        with caplog.at_level(logging.WARNING, logger="fedshift.server.strategy"):
            agg, agg_metrics = strategy.aggregate_train(rnd, [*honest, narrowed])
        kept = [a, b, c] if rnd == 1 else [a, c]
        _assert_average(agg, kept, [20, 60, 40] if rnd == 1 else [20, 40])
        assert agg_metrics is not None
        assert set(agg_metrics) == set(metrics)  # the aggregate keeps only the keys all share
        for key, value in agg_metrics.items():
            ns, values = (
                ([20, 60, 40], [TRAIN_METRICS[key]] * 2) if rnd == 1 else ([20, 40], [TRAIN_METRICS[key]])
            )
            assert value == pytest.approx(np.average([*values, metrics[key]], weights=ns))
    assert strategy.history.rejected == []
    assert sorted(strategy.history.train[2]) == ["site-1", "site-5"]
    assert strategy.history.train[2]["site-1"]["train-loss"] == 0.5  # each site's row is what it sent
    line = f"Round 2 train: metrics not in every reply, left out of the aggregate metrics: site-1 {left_out}"
    assert line in caplog.text
    assert load_checkpoint(tmp_path / "ckpt").round == 2


def test_an_extra_metric_key_is_left_out_of_the_aggregate_only(tmp_path: Path) -> None:
    # before: the reply with the extra key was dropped (its arrays lost); before that, Flower's
    # FedAvg raised InconsistentMessageReplies, which ended the run
    strategy = make_strategy(tmp_path)
    a, b, c = _arrays(1), _arrays(2), _arrays(5)
    extra = _reply(5, c, 40, metrics={**TRAIN_METRICS, "leak": 41.0})
    agg, agg_metrics = strategy.aggregate_train(1, [extra, _reply(1, a, 20), _reply(2, b, 60)])
    _assert_average(agg, [c, a, b], [40, 20, 60])
    assert agg_metrics is not None and set(agg_metrics) == set(TRAIN_METRICS)
    assert strategy.history.rejected == []
    # evaluation: the metrics all three send are averaged over all three
    ev = MessageType.EVALUATE
    replies = [
        _reply(1, None, 10, message_type=ev, metrics={"auc": 0.9, "accuracy": 0.8}),
        _reply(2, None, 30, message_type=ev, metrics={"auc": 0.5}),  # narrowed: no accuracy
        _reply(3, None, 30, message_type=ev, metrics={"auc": 0.1, "accuracy": 0.1, "train-count": 77.0}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and set(metrics) == {"auc"}
    assert metrics["auc"] == pytest.approx(np.average([0.9, 0.5, 0.1], weights=[10, 30, 30]))
    assert sorted(strategy.history.evaluate[1]) == ["site-1", "site-2", "site-3"]
    assert strategy.history.rejected == []


# (d) site names come from the node id --------------------------------------------------------------


def test_a_second_node_cannot_take_a_bound_name_without_enrollment(tmp_path: Path) -> None:
    # before: node 3's reply named site-1 overwrote site-1's row in the history and was averaged in
    strategy = make_strategy(tmp_path)
    a, b, c = _arrays(1), _arrays(2), _arrays(3)
    strategy.aggregate_train(1, [_reply(1, a, 20, "site-1"), _reply(2, b, 60, "site-2")])
    agg, _ = strategy.aggregate_train(
        2, [_reply(3, c, 999, "site-1"), _reply(1, a, 20, "site-1"), _reply(2, b, 60, "site-2")]
    )
    _assert_average(agg, [a, b], [20, 60])
    assert strategy.history.train[2]["site-1"]["num-examples"] == 20  # site-1's own row
    assert [(r["node"], r["site"]) for r in strategy.history.rejected] == [(3, "node-3")]
    assert "claims the name 'site-1', which node 1 holds" in strategy.history.rejected[0]["reason"]
    # a bound node that later claims another name keeps its first one
    strategy.aggregate_train(3, [_reply(1, a, 20, "site-2"), _reply(2, b, 60, "site-2")])
    assert sorted(strategy.history.train[3]) == ["site-1", "site-2"]


def _enrollment(tmp_path: Path, sites: dict[str, Any]) -> Path:
    path = tmp_path / "enrolled.json"
    path.write_text(
        json.dumps({s: {"node-id": n, "key-sha256": "ab" * 32, "key": "k.pub"} for s, n in sites.items()})
    )
    return path


def test_enrolled_names_win_over_what_a_reply_says(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _enrollment(tmp_path, {"hospital-a": "11", "hospital-b": "12"})
    cfg = FederationConfig.from_run_config({"enrollment": str(path)})
    strategy = make_strategy(tmp_path, names=SiteNames.from_file(cfg.enrollment))
    a, b, c = _arrays(1), _arrays(2), _arrays(3)
    with caplog.at_level(logging.WARNING):
        agg, _ = strategy.aggregate_train(
            1,
            [
                _reply(11, a, 20, "hospital-a"),
                _reply(12, b, 60, "hospital-a"),  # enrolled as hospital-b, claims hospital-a
                _reply(13, c, 500, "hospital-a"),  # not enrolled at all
            ],
        )
    _assert_average(agg, [a, b], [20, 60])
    rows = strategy.history.train[1]
    assert sorted(rows) == ["hospital-a", "hospital-b"]
    assert rows["hospital-a"]["num-examples"] == 20 and rows["hospital-b"]["num-examples"] == 60
    assert [(r["node"], r["site"]) for r in strategy.history.rejected] == [(13, "node-13")]
    assert "node 13 is not enrolled" in strategy.history.rejected[0]["reason"]
    assert "Node 12 (hospital-b) claims to be 'hospital-a'" in caplog.text


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "readable JSON file"),
        ("[1, 2]", "to hold {site: {'node-id': ...}}"),
        (json.dumps({"hospital-a": {"node-id": "(already enrolled)"}}), "numeric node-id"),
        (json.dumps({"a": {"node-id": "5"}, "b": {"node-id": 5}}), "share node 5"),
    ],
)
def test_an_unusable_enrollment_file_is_refused(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "enrolled.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="enroll") as err:
        load_enrollment(path)
    assert needle in str(err.value)
    assert load_enrollment(_enrollment(tmp_path, {"a": "5", "b": 6})) == {5: "a", 6: "b"}


class _Clock:
    """A fake clock for the waiting logic: ``sleep`` advances it, and nodes come online at set times."""

    def __init__(self, arrivals: dict[int, float]) -> None:
        self.now, self.arrivals = 0.0, arrivals

    def online(self) -> list[int]:
        return [node for node, at in self.arrivals.items() if at <= self.now]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("arrivals", "wait", "missing", "waited"),
    [
        ({5: 0.0, 6: 0.0, 7: 9.0}, 600.0, [], 10.0),  # the late site is waited for (polled every 2 s)
        ({5: 0.0, 6: 0.0, 7: 900.0}, 60.0, ["c"], 60.0),  # ... but not past enrolled-wait
        ({5: 0.0, 6: 0.0, 7: 900.0}, 0.0, ["c"], 0.0),  # 0: start as soon as Flower's min-nodes allows
    ],
)
def test_the_first_round_waits_for_every_enrolled_site(
    arrivals: dict[int, float], wait: float, missing: list[str], waited: float
) -> None:
    clock = _Clock(arrivals)
    names = SiteNames({5: "a", 6: "b", 7: "c"})
    got = wait_for_enrolled(clock.online, names, wait, clock=lambda: clock.now, sleep=clock.sleep)
    assert (got, clock.now) == (missing, waited)
    alone = wait_for_enrolled(clock.online, SiteNames(), 600.0, clock=lambda: clock.now, sleep=clock.sleep)
    assert alone == []
    assert clock.now == waited  # no enrollment (a simulation): no wait at all


@pytest.mark.parametrize("wait", [-1.0, float("inf"), float("nan")])
def test_an_unusable_enrolled_wait_is_refused(wait: float) -> None:
    with pytest.raises(ConfigError, match=f"'enrolled-wait' to be a finite number >= 0, but got {wait}"):
        FederationConfig.from_run_config({"enrolled-wait": wait})


# the aggregate itself ------------------------------------------------------------------------------


def test_a_nan_aggregate_writes_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = make_strategy(tmp_path)
    a, b = _arrays(1), _arrays(2)
    first, _ = strategy.aggregate_train(1, [_reply(1, a, 20), _reply(2, b, 60)])
    assert first is not None
    before = (tmp_path / "ckpt" / "checkpoint.json").read_bytes()

    def broken(self: FedAvg, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, None]:
        # an aggregation rule gone wrong (the check stands between any aggregator and the disk)
        return _record({**_arrays(0), "lora.up": np.full(SHAPES["lora.up"], np.nan, np.float32)}), None

    monkeypatch.setattr(FedAvg, "aggregate_train", broken)
    with caplog.at_level(logging.ERROR, logger="fedshift.server.strategy"):
        agg, _ = strategy.aggregate_train(2, [_reply(1, a, 20), _reply(2, b, 60)])
    assert agg is None  # Flower's loop keeps the previous global adapters
    assert (tmp_path / "ckpt" / "checkpoint.json").read_bytes() == before
    assert load_checkpoint(tmp_path / "ckpt").round == 1
    assert "Round 2: the aggregate is unusable ('lora.up' contains NaN or infinite values)" in caplog.text


# the run goes on: Flower's own round loop ----------------------------------------------------------


class _ScriptedGrid:
    """The two Grid calls Flower's round loop makes; each node answers through ``answer``."""

    def __init__(self, nodes: list[int], answer: Callable[[Message], Message]) -> None:
        self.nodes, self.answer = nodes, answer

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.answer(m) for m in messages]


def test_a_misbehaving_site_never_ends_the_run(tmp_path: Path) -> None:
    """Three rounds of Flower's real ``Strategy.start``; node 3 misbehaves differently every round."""
    honest = {1: (_arrays(1), 20), 2: (_arrays(2), 60)}

    def answer(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        evaluating = msg.metadata.message_type == MessageType.EVALUATE
        metrics = dict(EVAL_METRICS if evaluating else TRAIN_METRICS)
        arrays: dict[str, np.ndarray] | ArrayRecord | None = None
        n: float
        if node in honest:
            arrays, n, name = honest[node][0], honest[node][1], f"site-{node}"
        else:
            arrays, n, name = _arrays(3), 40, "site-3"
            if rnd == 1:  # a list-valued metric, in training and evaluation
                metrics["auc" if evaluating else "train-loss"] = [0.5, 0.1]  # type: ignore[assignment]
            elif rnd == 2:
                n = float("inf")
                arrays = _lying(arrays, "lora.up", _npy(np.ones((1, 4), np.float32)))
            else:  # a good reply with an extra metric key, but claiming another site's name
                name, metrics["leak"] = "site-1", 1.0
        return _reply(node, None if evaluating else arrays, n, name, metrics, msg.metadata.message_type)

    strategy = make_strategy(tmp_path, min_nodes=3)
    grid = _ScriptedGrid([1, 2, 3], answer)
    result = strategy.start(
        grid=grid,  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}),
        num_rounds=3,
        evaluate_config=ConfigRecord({"split": "val"}),
    )
    # round 3's aggregate: node 3's good reply counts, under the name its node id bound in round 1
    _assert_average(result.arrays, [honest[1][0], honest[2][0], _arrays(3)], [20, 60, 40])
    rejected = [(r["round"], r["stage"]) for r in strategy.history.rejected]
    assert rejected == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    for rnd in (1, 2):
        assert sorted(strategy.history.train[rnd]) == ["site-1", "site-2"]
    assert sorted(strategy.history.train[3]) == ["site-1", "site-2", "site-3"]
    assert strategy.history.train[3]["site-1"]["num-examples"] == 20
    assert load_checkpoint(tmp_path / "ckpt").round == 3

    assert "expected metric 'train-loss' to be one number (not infinite), got [0.5, 0.1]" in rejected_reasons(
        strategy
    )
    assert set(strategy.history.train[3]["site-3"]) == {*TRAIN_METRICS, "num-examples", "leak", "bytes-sent"}

    # the final evaluation is screened the same way: a taken name and a list leave nothing; each site's
    # own keys stay (nothing is averaged there)
    intruder = {4: "site-2", 5: "site-5", 6: "site-6"}

    def final(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        metrics: dict[str, Any] = {**EVAL_METRICS, **({"leak": 1.0} if node == 5 else {})}
        if node == 6:
            metrics["auc"] = [0.5, 0.1]
        return _reply(node, None, 30, intruder.get(node, f"site-{node}"), metrics, MessageType.EVALUATE)

    out = final_evaluation(_ScriptedGrid([1, 2, 3, 4, 5, 6], final), result.arrays, strategy, "test", 60)  # type: ignore[arg-type]
    assert sorted(out) == ["site-1", "site-2", "site-3", "site-5"]
    assert out["site-5"]["leak"] == 1.0 and out["site-1"] == {"num-examples": 30.0, **EVAL_METRICS}


def rejected_reasons(strategy: AdapterFedAvg) -> str:
    return "\n".join(r["reason"] for r in strategy.history.rejected)


@pytest.mark.parametrize(
    ("auc", "needle"),
    [
        ([0.5, 0.1], "got [0.5, 0.1]"),  # next to numbers: Flower's averaging raised TypeError
        (float("inf"), "got inf"),
    ],
)
def test_a_metric_that_is_not_one_number_is_left_out(tmp_path: Path, auc: Any, needle: str) -> None:
    # before: reply_problem checked only the keys and the weight; the list reached Flower's
    # aggregate_metricrecords, which raised and ended the run
    strategy = make_strategy(tmp_path)
    ev = MessageType.EVALUATE
    replies = [
        _reply(1, None, 10, message_type=ev, metrics={"auc": 0.9}),
        _reply(2, None, 30, message_type=ev, metrics={"auc": 0.5}),
        _reply(3, None, 30, message_type=ev, metrics={"auc": auc}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    assert metrics["auc"] == pytest.approx(np.average([0.9, 0.5], weights=[10, 30]))
    assert [r["node"] for r in strategy.history.rejected] == [3]
    assert f"expected metric 'auc' to be one number (not infinite), {needle}" in rejected_reasons(strategy)
    # in training the same: the reply's arrays are not averaged in
    a, b, c = _arrays(1), _arrays(2), _arrays(3)
    bad = _reply(3, c, 40, metrics={**TRAIN_METRICS, "train-loss": auc})
    agg, _ = strategy.aggregate_train(1, [_reply(1, a, 20), bad, _reply(2, b, 60)])
    _assert_average(agg, [a, b], [20, 60])
    assert [(r["stage"], r["node"]) for r in strategy.history.rejected] == [("evaluate", 3), ("train", 3)]


def test_an_undefined_metric_keeps_the_reply(tmp_path: Path) -> None:
    # an honest site's AUC on a one-class split is NaN: its adapters still count
    strategy = make_strategy(tmp_path)
    a, b = _arrays(1), _arrays(2)
    nan = _reply(2, b, 60, metrics={**TRAIN_METRICS, "auc": float("nan")})
    agg, _ = strategy.aggregate_train(1, [_reply(1, a, 20, metrics={**TRAIN_METRICS, "auc": 0.5}), nan])
    _assert_average(agg, [a, b], [20, 60])
    assert strategy.history.rejected == []


def test_lists_of_different_lengths_never_end_the_run(tmp_path: Path) -> None:
    # before: the keys matched, so Flower's aggregate_metricrecords zipped the lists (strict) and raised
    # ValueError, which ended the run
    strategy = make_strategy(tmp_path)
    ev = MessageType.EVALUATE
    curves = {1: [0.9, 0.8], 2: [0.5, 0.4], 3: [0.5]}
    replies = [
        _reply(n, None, 10, message_type=ev, metrics={"auc": 0.5, "curve": c})  # type: ignore[dict-item]
        for n, c in curves.items()
    ]
    assert strategy.aggregate_evaluate(1, replies) is None  # no usable reply: no aggregate, no error
    assert [r["node"] for r in strategy.history.rejected] == [1, 2, 3]
    assert "expected metric 'curve' to be one number (not infinite), got [0.5]" in rejected_reasons(strategy)


# the other stages that read weights and arrays -----------------------------------------------------


def test_a_fisher_reply_is_checked_on_its_decoded_data_and_weight(tmp_path: Path) -> None:
    shape = {"lora.down": SHAPES["lora.down"]}
    good = {"lora.down": np.ones(SHAPES["lora.down"], np.float32)}

    def fisher(record: ArrayRecord, n: float) -> Message:
        ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=4, message_type="query.fisher")
        content = RecordDict({"ewc-fisher": record, "metrics": MetricRecord({"num-examples": n})})
        return Message(content, reply_to=ins)

    assert fisher_problem(fisher(_record(good), 10), shape) is None
    assert "positive whole number" in str(fisher_problem(fisher(_record(good), float("inf")), shape))
    lying = _lying(good, "lora.down", _npy(np.ones((1, 6), np.float32)))
    assert "declares shape (4, 6) but its data has shape (1, 6)" in str(
        fisher_problem(fisher(lying, 10), shape)
    )


def test_flowers_own_error_reply_is_a_missing_reply_of_the_site_it_was_sent_to(tmp_path: Path) -> None:
    """A site that never answers (offline, its upload expired): the SuperLink answers for it from its own
    node id, which must not read as an unenrolled sender but as that site's missing reply."""

    def answer(msg: Message) -> Message:
        msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's Grid does as it sends it
        node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        if node == 3 and rnd == 2:  # Flower's own reply for a message whose answer never arrived
            return create_message_error_unavailable_ins_message(msg.metadata.message_id, msg.metadata.run_id)
        evaluating = msg.metadata.message_type == MessageType.EVALUATE
        return _reply(
            node, None if evaluating else _arrays(node), 20 * node, message_type=msg.metadata.message_type
        )

    strategy = make_strategy(tmp_path, min_nodes=2)
    result = strategy.start(
        grid=_ScriptedGrid([1, 2, 3], answer),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}),
        num_rounds=2,
        evaluate_config=ConfigRecord({"split": "val"}),
    )
    _assert_average(result.arrays, [_arrays(1), _arrays(2)], [20, 40])  # round 2 without site-3
    assert strategy.history.rejected == []
    lost = [(r["round"], r["stage"], r["node"], r["site"], r["status"]) for r in strategy.history.refused]
    assert lost == [(2, "train", 3, "site-3", NO_REPLY), (2, "evaluate", 3, "site-3", NO_REPLY)]
    assert all("Flower error" in r["reason"] for r in strategy.history.refused)
    assert sorted(strategy.history.train[2]) == ["site-1", "site-2"]
