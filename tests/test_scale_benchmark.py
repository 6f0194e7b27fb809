"""The many-sites benchmark: its growth fit, its leftover-process check, its options, and (slow) one
smallest real run: 2 deployed SuperNodes x 1 round and 3 simulated sites x 2 rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedshift.simulations.benchmarks.scale import (
    MEMORY_MARGIN,
    TAG,
    available_mib,
    coordinator_phases,
    fit,
    link_state_with_messages,
    main,
    memory_shortfall,
    reap_tagged,
    tagged_processes,
)
from fedshift.tests.helpers import one_line_error


def test_fit_finds_linear_and_quadratic_growth() -> None:
    linear = [{"sites": n, "v": 5.0 + 2.0 * n} for n in (10, 50, 100)]
    got = fit(linear, lambda r: r["v"])
    assert got["intercept"] == pytest.approx(5.0)
    assert got["per_site"] == pytest.approx(2.0)
    assert got["marginal_per_site"] == pytest.approx([2.0, 2.0])
    assert got["marginal_growth"] == pytest.approx(1.0)
    # a cost of n^2: one more site costs 60 between 10 and 50 sites, 150 between 50 and 100
    quadratic = [{"sites": n, "v": float(n * n)} for n in (100, 10, 50)]
    got = fit(quadratic, lambda r: r["v"])
    assert got["marginal_per_site"] == pytest.approx([60.0, 150.0])
    assert got["marginal_growth"] == pytest.approx(2.5)
    assert fit(linear[:2], lambda r: r["v"])["marginal_growth"] is None  # two sizes: one slope
    # one size (or a missing value) gives no line
    assert "per_site" not in fit([{"sites": 3, "v": 1.0}], lambda r: r["v"])
    assert "per_site" not in fit([{"sites": 3, "v": 1.0}, {"sites": 5, "v": None}], lambda r: r["v"])


def test_a_federation_that_would_not_fit_in_memory_is_predicted_from_the_largest_run() -> None:
    free = available_mib()
    assert free > 0
    small = {"sites": 2, "coordinator": {"peak_pss_mib": 1000.0}, "site_peak_pss_mib": 1.0}
    large = {"sites": 5, "coordinator": {"peak_pss_mib": 1000.0}, "site_peak_pss_mib": free / 10}
    assert memory_shortfall([], 1000) is None  # nothing measured yet: the first run is made
    assert memory_shortfall([small], 20) is None  # 1000 MiB + 20 MiB
    # from the 5-site run: 1000 MiB + 20 x free / 10 = over twice what is free
    short = memory_shortfall([large, small], 20)
    assert short is not None and short["sites"] == 20
    assert short["needed_mib"] == pytest.approx(MEMORY_MARGIN * (1000.0 + 2 * free), rel=1e-6)
    assert "per site, measured at 5 sites" in short["reason"] and "GiB available" in short["reason"]


def test_the_coordinators_start_is_timed_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "coordinator.log"
    log.write_text(
        "10:00:17 INFO    fedshift.deploy.server: SuperLink up at 127.0.0.1:5\n"
        "10:00:18 INFO    fedshift.deploy.server: Enrolled site-000 (site-000.pub): node 1\n"
        "10:00:31 INFO    fedshift.deploy.server: Public port 127.0.0.1:9 open: Fleet API only\n"
        "10:00:32 INFO    fedshift.deploy.server: Submitted the federation as run 7\n"
    )
    started = time.mktime((2026, 12, 2, 10, 0, 0, 0, 0, -1))
    assert coordinator_phases(log, started) == {
        "superlink_up_s": 17.0,
        "enrolled_s": 31.0,
        "submitted_s": 32.0,
    }
    assert coordinator_phases(tmp_path / "none.log", started) == dict.fromkeys(
        ("superlink_up_s", "enrolled_s", "submitted_s")
    )


def test_leftover_processes_are_found_by_their_marker_and_killed() -> None:
    tag = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, TAG: tag}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # no marker
    try:
        assert tagged_processes(tag) == [child.pid]
        left = reap_tagged(tag, wait=0.5)
        assert len(left) == 1 and left[0].startswith(f"{child.pid}: ")
        assert child.wait(timeout=10) != 0  # killed
        assert tagged_processes(tag) == []
        assert other.poll() is None  # a process without the marker is left alone
        assert reap_tagged(tag, wait=0.1) == []
    finally:
        for proc in (child, other):
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--supernodes", "two"], "--supernodes"),
        (["--sim-sites", "-3"], "--sim-sites"),
        (["--rounds", "0"], "--rounds"),
        (["--sample-seconds", "0"], "--sample-seconds"),
    ],
)
def test_bad_options_end_in_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([*argv, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o.json")])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_smallest_real_run_counts_rounds_memory_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scale.json"
    argv = ["--supernodes", "2", "--rounds", "1", "--sim-sites", "3", "--sim-rounds", "2"]
    assert main([*argv, "--work", str(tmp_path / "runs"), "--out", str(out), "--sample-seconds", "0.5"]) == 0
    report = json.loads(out.read_text())
    assert "deployment" in capsys.readouterr().out  # the table

    [deployed] = report["deployment"]
    assert (deployed["sites"], deployed["rounds_completed"], deployed["rounds_seen"]) == (2, 1, 1)
    assert deployed["sites_per_round"] == [2]
    assert deployed["first_round_s"] > 0 and deployed["s_per_round"] is None  # one round: no interval
    assert 0 < deployed["first_round_s"] < deployed["seconds"]
    coordinator = deployed["coordinator"]
    # the ServerApp imports torch: well over 100 MiB; PSS never above RSS
    assert 100 < coordinator["peak_pss_mib"] <= coordinator["peak_rss_mib"]
    assert coordinator["peak_pss_mib_by_process"]["flower-superlink"] > 10
    assert coordinator["peak_pss_mib_by_process"]["flwr-serverapp"] > 100
    assert 100 < deployed["site_peak_pss_mib"] <= deployed["site_peak_rss_mib"]
    assert deployed["site_peak_pss_mib_by_process"]["site_runner"] > 100
    assert deployed["all_sites_peak_pss_mib"] == pytest.approx(2 * deployed["site_peak_pss_mib"])
    assert deployed["leftover"] == 0 and deployed["leftover_processes"] == []
    start = deployed["coordinator_start"]
    assert 0 < start["superlink_up_s"] <= start["enrolled_s"] <= start["submitted_s"] < deployed["seconds"]
    assert coordinator["cpu_s"] > 1 and deployed["site_cpu_s"] > 1  # torch's import alone is more

    [simulated] = report["simulation"]
    assert (simulated["sites"], simulated["rounds_completed"], simulated["rounds_seen"]) == (3, 2, 2)
    assert simulated["sites_per_round"] == [3, 3]
    assert len(simulated["round_s"]) == 1 and simulated["s_per_round"] == simulated["round_s"][0] > 0
    assert simulated["first_round_s"] + simulated["s_per_round"] < simulated["seconds"]
    assert 100 < simulated["memory"]["peak_pss_mib"] <= simulated["memory"]["peak_rss_mib"]
    assert simulated["memory"]["cpu_s"] > 1
    # the engine swept for the sites' messages with fedshift's one-pass sweep, never Flower's per-node one
    sweep = simulated["message_sweep"]
    assert sweep["fedshift_next_messages"]["calls"] > 10 and sweep["flower_get_message_ins"]["calls"] == 0
    assert [row["sites"] for row in report["link_state_sweep"]] == [10, 50, 100, 200, 400]
    assert simulated["leftover"] == 0
    assert report["leftover"] == 0
    # one size each: no line fitted
    assert "per_site" not in report["fit"]["simulation"]["s_per_round"]


# ------------------------------------------------------------------ the server's duplicate check (a set)


@pytest.mark.usefixtures("task_identity")
def test_a_second_reply_of_a_site_is_left_out_and_one_after_a_rejected_first_is_kept(tmp_path: Path) -> None:
    """AdapterFedAvg finds a site's second reply by a set of the accepted names (not a scan of the accepted
    replies per reply, which was O(N^2) in the sites): among 100 sites, the second reply of site-7 is left
    out; site-9's first reply is rejected (NaN), so its second one is the one averaged."""
    import numpy as np

    from fedshift.tests.test_strategy import _arrays, _reply, make_strategy

    strategy = make_strategy(tmp_path)
    arrays = {node: _arrays(node) for node in range(1, 101)}
    nan = {k: np.full_like(v, np.nan) for k, v in arrays[9].items()}
    replies = [_reply(9, nan, 10)] + [_reply(node, arrays[node], node) for node in range(1, 101)]
    replies.insert(50, _reply(7, _arrays(1000), 1))  # a second reply from site-7, after its first
    aggregate, _ = strategy.aggregate_train(1, replies)
    assert aggregate is not None
    assert sorted(strategy.history.train[1]) == sorted(f"site-{n}" for n in range(1, 101))
    rejected = [(r["site"], r["reason"]) for r in strategy.history.rejected]
    assert [site for site, _ in rejected] == ["site-9", "site-7"]
    assert rejected[1][1] == "a second reply from site-7 in this round"
    weights = np.arange(1, 101, dtype=np.float64)
    for key in arrays[1]:
        expected = np.average(np.stack([arrays[n][key] for n in range(1, 101)]), axis=0, weights=weights)
        np.testing.assert_allclose(aggregate[key].numpy(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the simulation's message sweep


def _contents(messages: list[Any]) -> list[tuple[int, int]]:
    """(the node a message is for, its index k among that node's messages)."""
    from fedshift.common.protocol import CONFIG_KEY, SERVER_ROUND_KEY

    return [(int(m.metadata.dst_node_id), int(m.content[CONFIG_KEY][SERVER_ROUND_KEY])) for m in messages]


@pytest.mark.usefixtures("task_identity")
def test_the_one_pass_sweep_gives_what_flowers_per_node_asks_give() -> None:
    """Against Flower's own ``get_message_ins`` on a twin link state: every node's first undelivered
    message, marked delivered, then its second, then nothing."""
    from fedshift.simulations.engine import next_messages

    ours, nodes = link_state_with_messages(30, per_node=2)
    flowers, twin_nodes = link_state_with_messages(30, per_node=2)
    wanted = set(nodes[:20])  # nodes of another simulation in the same state are not swept
    for k in (0, 1):
        got = next_messages(ours, wanted)
        expected = [m for node in twin_nodes[:20] for m in flowers.get_message_ins(node_id=node, limit=1)]
        assert sorted((nodes.index(n), j) for n, j in _contents(got)) == sorted(
            (twin_nodes.index(n), j) for n, j in _contents(expected)
        )
        assert {j for _, j in _contents(got)} == {k} and len(got) == 20
        assert all(m.metadata.delivered_at != "" for m in got)
    assert next_messages(ours, wanted) == []
    assert len(next_messages(ours, set(nodes[20:]))) == 10  # the other nodes' messages are still there
    # an expired message is dropped by Flower's own check, not handed out
    state, [node] = link_state_with_messages(1)
    [msg] = state.message_ins_store.values()
    msg.metadata.__dict__["_ttl"] = 0.0
    if msg.metadata.created_at + msg.metadata.ttl > time.time():  # pragma: no cover (Flower moved ttl)
        pytest.skip("cannot expire a message in this Flower version")
    assert next_messages(state, {node}) == [] and state.message_ins_store == {}


class _CountingStore(dict):  # type: ignore[type-arg]
    """A link state's message store that counts the stored messages each sweep looks at."""

    looked_at = 0

    def keys(self) -> Any:
        type(self).looked_at += len(self)
        return super().keys()

    def items(self) -> Any:
        type(self).looked_at += len(self)
        return super().items()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("n", [20, 80])
def test_the_sweep_looks_at_each_message_once_where_flowers_looks_n_times(n: int) -> None:
    """One sweep for every node's next message, counted (not timed: the times are the benchmark's):
    Flower's asks once per node and each ask walks every stored message (N x N); ours walks them once."""
    from fedshift.simulations.engine import next_messages

    ours, nodes = link_state_with_messages(n)
    flowers, twin_nodes = link_state_with_messages(n)
    for state in (ours, flowers):
        state.message_ins_store = _CountingStore(state.message_ins_store)
    _CountingStore.looked_at = 0
    assert len(next_messages(ours, set(nodes))) == n
    assert _CountingStore.looked_at == n
    _CountingStore.looked_at = 0
    assert sum(len(flowers.get_message_ins(node_id=node, limit=1)) for node in twin_nodes) == n
    assert _CountingStore.looked_at == n * n


def test_the_linear_sweep_is_installed_only_while_a_simulation_runs() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    from fedshift.simulations.engine import linear_message_sweep

    original = vce_api.add_messages_to_queue
    with linear_message_sweep():
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original
