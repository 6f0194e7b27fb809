"""``fedshift status`` (the coordinator) and ``fedshift client --status`` (a hospital).

The fast tests build a coordinator's state directory with Flower's own
SuperLink database code and fedshift's own checkpoint and history classes, and
read it back stopped and (through a Control API client that answers from that
state) live. The slow test runs a real TLS federation, asks ``fedshift status``
while it runs, kills a hospital and measures how soon it shows as offline
against Flower's heartbeat interval.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fedshift.client.ledger import open_ledger
from fedshift.common.checkpoint import save_checkpoint
from fedshift.common.cli import main
from fedshift.common.model import ModelConfig
from fedshift.deploy.flwr_cli import Flwr, write_connection
from fedshift.deploy.settings import ServerSettings
from fedshift.deploy.status import COLUMNS, federation_status, format_status
from fedshift.server.strategy import RunHistory
from fedshift.tests.deploy_support import (
    Federation,
    fedshift,
    flower_processes_under,
    free_port,
    kill_tree,
    toml,
    wait_for,
)

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _iso(moment: float | str) -> str:
    """ISO 8601 UTC to the second, as the status writes every time."""
    if isinstance(moment, str):
        return datetime.fromisoformat(moment).astimezone(UTC).isoformat(timespec="seconds")
    return datetime.fromtimestamp(moment, tz=UTC).isoformat(timespec="seconds")


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# -- the text against the JSON (parsed independently of deploy/status.py's formatting)


def _same(cell: str, value: Any) -> bool:
    if value is None:
        return cell == "-"
    if isinstance(value, float):
        return cell != "-" and float(cell) == pytest.approx(value, rel=1e-3, abs=1e-9)
    return cell == str(value)


def assert_text_matches(text: str, status: dict[str, Any], *, same_moment: bool = True) -> None:
    """Every line of ``fedshift status``'s text holds the JSON's values (``same_moment``: both from one
    snapshot, so the check time too)."""
    lines = text.splitlines()
    head = dict(line.partition(": ")[::2] for line in lines if not line.startswith("  "))
    first = re.fullmatch(r"federation (\S+), checked at (\S+)", lines[0])
    assert first is not None and first[1] == status["config"], lines[0]
    assert not same_moment or first[2] == status["checked-at"]
    assert head["state"] == status["state"]
    coordinator = status["coordinator"]
    if coordinator["running"]:
        assert head["coordinator"] == f"running (SuperLink {coordinator['superlink']})"
    else:
        assert head["coordinator"].startswith(f"not running ({coordinator['error']})")
    run = status["run"]
    if run is None:
        assert head["run"] == "none submitted"
    else:
        found = re.fullmatch(
            r"(\S+) (\S+) \(status from (\S+)\), submitted at (\S+), resumed after round (\S+), "
            r"runs submitted (\d+)",
            head["run"],
        )
        assert found is not None, head["run"]
        keys = ("run-id", "status", "status-from", "submitted-at", "resumed-after-round", "runs-submitted")
        for cell, key in zip(found.groups(), keys, strict=True):
            assert _same(cell, run[key]), (key, cell, run[key])
    rounds = re.fullmatch(r"(\d+) of (\d+) completed, current round (\S+)", head["rounds"])
    assert rounds is not None, head["rounds"]
    for cell, key in zip(rounds.groups(), ("completed-rounds", "num-rounds", "current-round"), strict=True):
        assert _same(cell, status[key]), (key, cell)
    checkpoint = status["checkpoint"]
    if checkpoint is None:
        assert head["checkpoint"] == "none"
    else:
        found = re.fullmatch(r"round (\d+) at (\S+) in (\S+), sites (\S+)", head["checkpoint"])
        assert found is not None, head["checkpoint"]
        assert found.groups()[:3] == (str(checkpoint["round"]), checkpoint["time"], checkpoint["path"])
        assert found[4] == (",".join(checkpoint["sites"]) or "-")
    assert _same(head["results"], status["results"])
    sites = status["sites"]
    summary = re.fullmatch(
        r"(\d+), (\d+) online \(offline: no heartbeat for more than (\S+) s\)", head["sites"]
    )
    assert summary is not None, head["sites"]
    assert int(summary[1]) == len(sites) and int(summary[2]) == sum(s["state"] == "online" for s in sites)
    assert _same(summary[3], status["offline-after-seconds"])
    table = [line.split() for line in lines if line.startswith("  ") and " last refusal: " not in line]
    assert [c.lower() for c in table[0]] == list(COLUMNS)
    assert len(table) - 1 == len(sites)
    for row, site in zip(table[1:], sites, strict=True):
        for cell, key in zip(row, table[0], strict=True):
            assert _same(cell, site[key.lower()]), (site["site"], key, cell, site[key.lower()])
    refusals = [line for line in lines if " last refusal: " in line]
    expected = [s for s in sites if s["last-refusal"] is not None]
    assert len(refusals) == len(expected)
    for line, site in zip(refusals, expected, strict=True):
        r = site["last-refusal"]
        assert (
            line
            == f"  {site['site']} last refusal: round {r['round']} {r['stage']} {r['status']}: {r['reason']}"
        )


# -- a coordinator's state, made with Flower's and fedshift's own code


def _certs(root: Path) -> None:
    assert (
        main(["certs", "--out", str(root / "certs"), "--hosts", "localhost", "--sites", ",".join(SITES)]) == 0
    )


def _federation_toml(root: Path, rounds: int = 3) -> Path:
    server = {
        "address": f"127.0.0.1:{free_port()}",
        "state-dir": "coordinator",
        "ca-cert": "certs/ca.crt",
        "server-cert": "certs/server.crt",
        "server-key": "certs/server.key",
    }
    hospitals = {site: f"certs/nodes/{site}.pub" for site in SITES}
    path = root / "federation.toml"
    path.write_text(
        toml({"server": server, "hospitals": hospitals, "federation": {"num-server-rounds": rounds}})
    )
    return path


def _history() -> RunHistory:
    """Round 1: a and b trained (epsilon 0.5, 0.6), c's evaluate reply was rejected; round 2: a trained
    (epsilon 0.9), b refused (budget)."""

    def privacy(eps: float) -> dict[str, Any]:
        return {"mechanism": "dp-sgd", "epsilon": eps, "delta": 1e-5, "budget-epsilon": 8.0}

    return RunHistory(
        train={1: {"hospital-a": {"auc": 0.6}, "hospital-b": {"auc": 0.7}}, 2: {"hospital-a": {"auc": 0.8}}},
        evaluate={1: {"hospital-a": {"auc": 0.6}, "hospital-b": {"auc": 0.7}}},
        rejected=[{"round": 1, "stage": "evaluate", "node": 3, "site": "hospital-c", "reason": "not finite"}],
        refused=[
            {
                "round": 2,
                "stage": "train",
                "node": 2,
                "site": "hospital-b",
                "status": "budget-exhausted",
                "reason": "the budget is spent",
            }
        ],
        privacy={
            1: {"hospital-a": privacy(0.5), "hospital-b": privacy(0.6)},
            2: {"hospital-a": privacy(0.9)},
        },
    )


@pytest.fixture
def coordinator_state(tmp_path: Path) -> Iterator[tuple[ServerSettings, dict[str, Any]]]:
    """A coordinator that ran 2 of 3 rounds and stopped: superlink.db (Flower's code: a stopped with its
    node online, b stopped cleanly, c vanished, one revoked node), enrolled.json, runs.jsonl, checkpoint."""
    from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
    from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    _certs(tmp_path)
    settings = ServerSettings.load(_federation_toml(tmp_path))
    state_dir = tmp_path / "coordinator"
    state_dir.mkdir()
    db = LinkStateFactory(
        str(state_dir / "superlink.db"), NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    nodes = {site: db.create_node("owner", site, site.encode(), 30.0) for site in (*SITES, "revoked")}
    db.activate_node(nodes["hospital-a"], 30.0)
    db.activate_node(nodes["hospital-b"], 30.0)
    db.deactivate_node(nodes["hospital-b"])  # a clean stop
    db.activate_node(nodes["hospital-c"], 1.0)  # vanishes: Flower marks it offline 2 intervals later
    db.delete_node("owner", nodes["revoked"])
    time.sleep(2.0 * 1.0 + 0.2)
    facts = {int(n.node_id): n for n in db.get_node_info()}
    (state_dir / "enrolled.json").write_text(json.dumps({s: {"node-id": str(nodes[s])} for s in SITES}))
    runs = [
        {
            "time": "2026-01-01T10:00:00+00:00",
            "run-id": 11,
            "resumed-after-round": None,
            "status": "submitted",
        },
        {"time": "2026-01-01T11:00:00+00:00", "run-id": 12, "resumed-after-round": 1, "status": "submitted"},
    ]
    (state_dir / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs) + '{"torn line\n')
    history = _history()
    save_checkpoint(
        settings.run_dir / "checkpoint",
        {"w": np.zeros(3, np.float32)},
        ModelConfig(),
        2,
        extra={"sites": ["hospital-a"], "history": history.to_dict()},
    )
    write_connection(state_dir / "flwr", f"127.0.0.1:{free_port()}", settings.ca_cert)  # nothing listens
    yield settings, {"nodes": nodes, "facts": facts, "history": history}


def test_a_stopped_coordinator_shows_what_its_files_say(
    coordinator_state: tuple[ServerSettings, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, made = coordinator_state
    nodes, facts = made["nodes"], made["facts"]
    status = federation_status(settings)
    assert status["state"] == "stopped"
    assert status["coordinator"]["running"] is False and "does not answer" in status["coordinator"]["error"]
    assert status["run"] == {
        "run-id": "12",
        "status": "submitted",  # it never ended: the coordinator stopped under it
        "status-from": "runs.jsonl",
        "submitted-at": "2026-01-01T11:00:00+00:00",
        "resumed-after-round": 1,
        "runs-submitted": 2,
    }
    assert (status["completed-rounds"], status["num-rounds"], status["current-round"]) == (2, 3, None)
    checkpoint = status["checkpoint"]
    manifest = settings.run_dir / "checkpoint" / "checkpoint.json"
    assert checkpoint == {
        "round": 2,
        "path": str(manifest.parent),
        "time": _iso(manifest.stat().st_mtime),
        "sites": ["hospital-a"],
    }
    by_site = {s["site"]: s for s in status["sites"]}
    assert list(by_site) == list(SITES)  # the revoked node is not listed
    a, b, c = (by_site[s] for s in SITES)
    assert [s["node-id"] for s in (a, b, c)] == [str(nodes[s]) for s in SITES]
    # a: online in the database when the SuperLink went away: offline now, last seen at its last heartbeat
    fa = facts[nodes["hospital-a"]]
    assert (a["state"], a["flower-status"]) == ("offline", "online")
    assert a["last-seen"] == _iso(fa.online_until - HEARTBEAT_PATIENCE * fa.heartbeat_interval)
    assert a["last-seen"] == _iso(fa.last_activated_at)  # it never sent a heartbeat after activating
    fb = facts[nodes["hospital-b"]]
    assert (b["state"], b["flower-status"]) == ("offline", "offline")
    assert (b["last-seen"], b["offline-since"]) == (_iso(fb.last_activated_at), _iso(fb.last_deactivated_at))
    # c: Flower marked it offline 2 intervals (2 s) after its last sign of life, which is last-seen
    fc = facts[nodes["hospital-c"]]
    assert (c["state"], c["flower-status"]) == ("offline", "offline")
    assert c["last-seen"] == _iso(fc.last_activated_at)
    assert c["offline-since"] == _iso(fc.last_deactivated_at) == _iso(_seconds(fc.last_activated_at) + 2.0)
    # what the ServerApp's history says of each site
    assert (a["last-round-answered"], a["epsilon"], a["epsilon-round"], a["budget-epsilon"]) == (
        2,
        0.9,
        2,
        8.0,
    )
    assert (a["refusals"], a["last-refusal"], a["rejected"]) == (0, None, 0)
    assert (b["last-round-answered"], b["epsilon"], b["epsilon-round"], b["refusals"]) == (2, 0.6, 1, 1)
    assert b["last-refusal"] == {
        "round": 2,
        "stage": "train",
        "status": "budget-exhausted",
        "reason": "the budget is spent",
    }
    assert (c["last-round-answered"], c["epsilon"], c["rejected"], c["refusals"]) == (1, None, 1, 0)

    # the command: text and JSON say the same (nothing changes in a stopped federation but the clock)
    config = str(settings.path)
    assert main(["status", "--config", config, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["status", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "what follows is what its state files say" in text
    assert {k: v for k, v in printed.items() if k != "checked-at"} == {
        k: v for k, v in status.items() if k != "checked-at"
    }
    assert_text_matches(text, printed, same_moment=False)


def test_a_live_coordinator_counts_a_missed_heartbeat_as_offline(
    coordinator_state: tuple[ServerSettings, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the Control API (a client answering with NodeInfo and Run records as Flower's does): a
    site is offline once its last heartbeat is more than one interval old, before Flower's own
    status (two intervals) says so."""
    from flwr.proto.control_pb2 import ListNodesResponse, ListRunsResponse  # type: ignore[attr-defined]
    from flwr.proto.node_pb2 import NodeInfo  # type: ignore[attr-defined]
    from flwr.proto.run_pb2 import Run, RunStatus  # type: ignore[attr-defined]
    from flwr.supercore.control import ControlHttpClient

    settings, made = coordinator_state
    nodes = made["nodes"]
    interval = float(HEARTBEAT_DEFAULT_INTERVAL)
    now = time.time()
    beats = {"hospital-a": now - interval + 1, "hospital-b": now - interval - 1}  # 29 s and 31 s ago
    infos = [
        NodeInfo(
            node_id=nodes[site],
            status="online",
            online_until=beat + HEARTBEAT_PATIENCE * interval,
            heartbeat_interval=interval,
        )
        for site, beat in beats.items()
    ]
    infos.append(NodeInfo(node_id=nodes["hospital-c"], status="registered", heartbeat_interval=interval))
    infos.append(NodeInfo(node_id=77, status="online", online_until=now + 60, heartbeat_interval=interval))

    class _Client:
        def ListNodes(self, request: object) -> ListNodesResponse:  # noqa: N802 (Flower's name)
            return ListNodesResponse(nodes_info=infos)

        def ListRuns(self, request: Any) -> ListRunsResponse:  # noqa: N802
            assert request.run_id == 12
            run = Run(run_id=12, status=RunStatus(status="running"), running_at="2026-01-01T11:00:01Z")
            return ListRunsResponse(run_dict={12: run})

        def close(self) -> None:
            pass

    monkeypatch.setattr(ControlHttpClient, "from_server_address", lambda *args, **kwargs: _Client())
    status = federation_status(settings, now=now)
    assert status["state"] == "running" and status["coordinator"]["running"] is True
    assert (status["run"]["status"], status["run"]["status-from"]) == ("running", "superlink")
    assert (status["completed-rounds"], status["current-round"]) == (2, 3)
    by_site = {s["site"]: s for s in status["sites"]}
    a, b, c = (by_site[s] for s in SITES)
    assert (a["state"], a["last-seen"], a["offline-since"]) == ("online", _iso(beats["hospital-a"]), None)
    assert (b["state"], b["flower-status"]) == ("offline", "online")  # Flower counts it 29 s longer
    assert b["last-seen"] == _iso(beats["hospital-b"])
    assert b["offline-since"] == _iso(beats["hospital-b"] + interval)
    assert c["state"] == "never-connected"
    stranger = by_site[None]  # a node no enrollment names (an --insecure federation's) is listed too
    assert (stranger["node-id"], stranger["state"], stranger["epsilon"]) == ("77", "online", None)
    # and a second later, a's heartbeat is 30+ s old too
    assert {s["site"]: s["state"] for s in federation_status(settings, now=now + 2)["sites"]}[
        "hospital-a"
    ] == ("offline")
    assert_text_matches(format_status(status), status)


def test_status_of_a_federation_that_never_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _certs(tmp_path)
    capsys.readouterr()
    assert main(["status", "--config", str(_federation_toml(tmp_path)), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "not-started" and status["run"] is None and status["checkpoint"] is None
    assert "fedshift server has not run with this state-dir" in status["coordinator"]["error"]
    assert [(s["site"], s["state"]) for s in status["sites"]] == [(s, "not-enrolled") for s in SITES]
    assert not (tmp_path / "coordinator").exists()  # nothing written


def test_a_bad_status_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.tests.helpers import one_line_error

    one_line_error(
        main(["status", "--config", str(tmp_path / "nowhere.toml")]),
        capsys.readouterr().err,
        "nowhere.toml",
        "--config",
    )


# -- a real federation


def _statuses(settings: ServerSettings) -> dict[str, dict[str, Any]]:
    return {s["site"]: s for s in federation_status(settings)["sites"]}


def _age(iso: str) -> float:
    return time.time() - _seconds(iso)


@pytest.mark.slow
def test_status_of_a_running_federation_and_a_killed_hospital(tmp_path: Path) -> None:
    fed = Federation(tmp_path, rounds=2, min_nodes=2, enrolled=("hospital-a", "hospital-b"))
    settings = ServerSettings.load(tmp_path / "federation.toml")
    try:
        server = fed.start_server()
        clients = {site: fed.start_client(site) for site in ("hospital-a", "hospital-b")}
        seen_online: set[str] = set()
        flapped: list[tuple[str, dict[str, Any]]] = []

        def round_one_done() -> bool:
            """Polled until round 1's checkpoint: once a site is online it must stay online."""
            for site, entry in _statuses(settings).items():
                if entry["state"] == "online":
                    seen_online.add(site)
                elif site in seen_online:
                    flapped.append((site, entry))
            return (fed.run_dir / "checkpoint" / "checkpoint.json").is_file()

        wait_for("round 1's checkpoint", round_one_done, 900, server, *clients.values())
        assert seen_online == {"hospital-a", "hospital-b"} and flapped == []

        live = federation_status(settings)
        assert live["state"] == "running" and live["coordinator"]["running"] is True
        assert live["run"]["status-from"] == "superlink"
        assert live["checkpoint"]["round"] >= 1
        assert live["current-round"] == live["checkpoint"]["round"] + 1 <= 2
        enrolled = json.loads((fed.root / "coordinator" / "enrolled.json").read_text())
        # Flower's own view (flwr supernode list) names the same nodes online
        flower = {n["node-id"]: n["status"] for n in Flwr(fed.root / "coordinator" / "flwr").nodes()}
        for entry in live["sites"]:
            assert entry["node-id"] == enrolled[entry["site"]]["node-id"]
            assert entry["state"] == "online" and flower[entry["node-id"]] == "online"
            assert _age(entry["last-seen"]) <= HEARTBEAT_DEFAULT_INTERVAL
            # the epsilon the site reported with round 1 is the one its own ledger recorded for round 1
            ledger = open_ledger(fed.state_dir(entry["site"]))
            assert ledger is not None
            charged = [
                e for e in ledger.entries if e.mechanism == "dp-sgd" and e.round == entry["epsilon-round"]
            ]
            assert len(charged) == 1 and entry["epsilon"] == pytest.approx(charged[0].epsilon, rel=1e-9)
            assert entry["budget-epsilon"] == 50.0 and entry["last-round-answered"] >= 1
        assert_text_matches(format_status(live), live)

        # kill hospital-b's daemon with its SuperNode and site runner: no goodbye, only missing heartbeats
        lost = "hospital-b"
        kill_tree(clients[lost])
        killed = time.time()
        polls: list[tuple[float, str, str]] = []  # (time, state, Flower's status)
        while True:
            at = time.time()
            entry = {s["site"]: s for s in federation_status(settings, now=at)["sites"]}[lost]
            polls.append((at, entry["state"], entry["flower-status"]))
            if entry["state"] != "online":
                break
            assert at - killed < 3 * HEARTBEAT_DEFAULT_INTERVAL, f"{lost} still online: {polls}"
            time.sleep(1.0)
        detected = polls[-1][0] - killed
        interval = float(HEARTBEAT_DEFAULT_INTERVAL)
        assert entry["state"] == "offline"
        # offline within one heartbeat interval of the kill: no poll after it still said online ...
        assert all(at - killed <= interval + 0.5 for at, state, _ in polls if state == "online"), polls
        assert detected <= interval + 1.0 + (polls[-1][0] - polls[-2][0] if len(polls) > 1 else 0), polls
        # ... because its last heartbeat came before the kill, and offline means one interval without one
        assert _seconds(entry["last-seen"]) <= killed + 1
        assert _seconds(entry["offline-since"]) <= killed + interval + 1
        print(
            f"{lost} killed: offline in fedshift status after {detected:.1f} s (heartbeat interval "
            f"{interval:.0f} s; Flower's own status then: {entry['flower-status']})"
        )
        others = {s["site"]: s["state"] for s in federation_status(settings)["sites"]}
        assert others["hospital-a"] == "online"

        # the hospitals' own view: the ledger's total, and the runner (down for the killed site)
        for site, runner_up in (("hospital-a", True), (lost, False)):
            before = open_ledger(fed.state_dir(site))
            shown = fedshift("client", "--config", f"{site}.toml", "--status", "--json", cwd=fed.root)
            assert shown.returncode == 0, shown.stderr
            after = open_ledger(fed.state_dir(site))
            assert before is not None and after is not None
            site_view = json.loads(shown.stdout)
            totals = {round(ledger.epsilon(ledger.entries[-1].delta), 6) for ledger in (before, after)}
            assert site_view["privacy"]["spent-epsilon"] in totals  # a's round 2 may charge meanwhile
            assert site_view["privacy"]["charges"] >= 1
            assert (site_view["runner"]["state"] != "down") is runner_up, site_view["runner"]
            if runner_up:
                assert site_view["runner"]["messages"] >= 1 and site_view["connection"]["supernode"] == "up"
            text = fedshift("client", "--config", f"{site}.toml", "--status", cwd=fed.root)
            assert text.returncode == 0 and f"site {site}" in text.stdout

        # Flower's own status follows: offline 2 intervals after the last heartbeat, later than ours
        wait_for(
            "Flower to count it offline",
            lambda: _statuses(settings)[lost]["flower-status"] == "offline",
            3 * interval,
            server,
        )
        flower_after = _seconds(_statuses(settings)[lost]["offline-since"]) - killed  # as Flower recorded it
        assert detected < flower_after <= HEARTBEAT_PATIENCE * interval + 1.0
        print(f"{lost}: Flower's own status offline {flower_after:.1f} s after the kill")
    finally:
        fed.stop_all()

    # the coordinator stopped: fedshift status says so and shows what the files say
    shown = fedshift("status", "--config", "federation.toml", "--json", cwd=fed.root)
    text = fedshift("status", "--config", "federation.toml", cwd=fed.root)
    assert shown.returncode == 0 and text.returncode == 0, shown.stderr + text.stderr
    stopped = json.loads(shown.stdout)
    assert stopped["state"] == "stopped" and stopped["coordinator"]["running"] is False
    assert stopped["checkpoint"]["round"] >= 1 and stopped["run"]["run-id"] == live["run"]["run-id"]
    assert {s["site"]: s["state"] for s in stopped["sites"]} == {"hospital-a": "offline", lost: "offline"}
    # Flower marked the killed site offline 2 intervals after its last heartbeat: that heartbeat is last-seen
    gone = next(s for s in stopped["sites"] if s["site"] == lost)
    assert gone["flower-status"] == "offline" and _seconds(gone["last-seen"]) <= killed + 1
    assert _seconds(gone["offline-since"]) - _seconds(gone["last-seen"]) == HEARTBEAT_PATIENCE * interval
    assert_text_matches(text.stdout, stopped, same_moment=False)
    wait_for("no process left", lambda: flower_processes_under(fed.root) == [], 30)
