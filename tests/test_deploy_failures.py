"""Failures in a real deployment on loopback: intruders refused, a hospital lost, a coordinator crash."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedshift.common.checkpoint import MANIFEST, load_checkpoint
from fedshift.deploy.flwr_cli import Flwr
from fedshift.tests.deploy_support import SITES, Federation, flower_processes_under, kill_tree, wait_for

pytestmark = pytest.mark.slow


def _teardown(fed: Federation) -> None:
    fed.stop_all()
    deadline = time.monotonic() + 20  # a crashed SuperLink's helpers notice their parent is gone
    while flower_processes_under(fed.root) and time.monotonic() < deadline:
        time.sleep(1)
    assert flower_processes_under(fed.root) == []


@pytest.fixture
def make_federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(**kwargs: Any) -> Federation:
        fed = Federation(tmp_path, **kwargs)
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            _teardown(fed)


def _ledger_rounds(fed: Federation, site: str) -> list[tuple[str, int]]:
    return [(e["run_id"], e["round"]) for e in fed.ledger(site) if e["mechanism"] == "dp-sgd"]


def test_unenrolled_and_plaintext_nodes_are_refused(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation(rounds=1, min_nodes=3)
    server = fed.start_server()
    wait_for("the run to be submitted", lambda: "Submitted" in fed.log(server.name), 180, server)

    # a key the coordinator never enrolled: refused by the SuperLink, the daemon says so and exits 3
    intruder = fed.start_client("intruder")
    wait_for("the intruder to be refused", lambda: intruder.poll() is not None, 120, server)
    assert intruder.proc.returncode == 3
    assert "not enrolled" in fed.log(intruder.name)
    superlink_log = (fed.root / "coordinator" / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log

    # an enrolled site that connects without TLS: the HTTPS port never lets it in
    plaintext = fed.start_client("hospital-a", "--insecure")
    wait_for(
        "the plaintext connection attempts",
        lambda: fed.client_log("hospital-a").count("Connection attempt failed") >= 3,
        120,
        server,
        plaintext,
    )
    assert "SuperNode ID" not in fed.client_log("hospital-a")
    nodes = Flwr(fed.root / "coordinator" / "flwr").nodes()
    assert len(nodes) == len(SITES)  # the three enrolled keys, and no other
    assert {n["status"] for n in nodes} == {"registered"}  # none of them ever came online
    assert fed.egress("hospital-a") == [] and fed.egress("intruder") == []
    assert server.poll() is None  # the coordinator waits for its enrolled sites

    # SIGTERM (systemctl stop, docker stop) to the daemons alone: they stop everything they started
    for daemon in (plaintext, server):
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0, fed.log(daemon.name)
    wait_for("no process left", lambda: flower_processes_under(fed.root) == [], 30)


def test_a_killed_hospital_is_dropped_and_the_others_finish(
    make_federation: Callable[..., Federation],
) -> None:
    fed = make_federation(rounds=2, min_nodes=2)
    server = fed.start_server()
    lost = "hospital-c"
    clients = {site: fed.start_client(site) for site in SITES if site != lost}
    # min-nodes sites are online and the run is going: Flower alone would start round 1 without the
    # third site; the coordinator waits for every enrolled site first (run config enrolled-wait)
    flwr = Flwr(fed.root / "coordinator" / "flwr")
    wait_for(
        "two sites online and the run going",
        lambda: (
            "running" in fed.log(server.name)
            and sum(n["status"] == "online" for n in flwr.nodes()) == len(clients)
        ),
        300,
        server,
        *clients.values(),
    )
    clients[lost] = fed.start_client(lost)
    wait_for(
        f"{lost} to finish round 1",
        lambda: any(e["stage"] == "evaluate" for e in fed.egress(lost)),
        600,
        server,
    )
    kill_tree(clients[lost])  # SIGKILL: the SuperNode and its ClientApp vanish without a goodbye
    killed_at = time.monotonic()
    wait_for(
        "round 2 to be aggregated",
        lambda: all(
            any(e["round"] == 2 and e["stage"] == "evaluate" for e in fed.egress(s)) for s in SITES[:2]
        ),
        900,
        server,
    )
    recovered = time.monotonic() - killed_at
    wait_for("the federation to finish", lambda: server.poll() is not None, 600)
    assert server.proc.returncode == 0, fed.log(server.name)

    results = fed.results()
    train = results["history"]["train"]
    assert sorted(train) == ["1", "2"]
    assert sorted(train["1"]) == list(SITES)
    assert sorted(train["2"]) == ["hospital-a", "hospital-b"]  # the round after the loss ran without it
    assert sorted(results["final_test"]) == ["hospital-a", "hospital-b"]
    # the lost site was charged for round 1, and for round 2 only if it had started training when killed
    charged = [r for _, r in _ledger_rounds(fed, lost)]
    assert charged in ([1], [1, 2])
    for site in ("hospital-a", "hospital-b"):
        assert [r for _, r in _ledger_rounds(fed, site)] == [1, 2]
    print(f"client killed ({lost} charged rounds {charged}): round 2 done {recovered:.0f} s after the kill")


def test_a_restarted_coordinator_resumes_from_the_last_completed_round(
    make_federation: Callable[..., Federation],
) -> None:
    fed = make_federation(rounds=2, min_nodes=3)
    server = fed.start_server()
    clients = {site: fed.start_client(site) for site in SITES}
    manifest = fed.run_dir / "checkpoint" / MANIFEST
    wait_for("the checkpoint of round 1", manifest.is_file, 600, server, *clients.values())
    assert load_checkpoint(fed.run_dir / "checkpoint").round == 1
    kill_tree(server)  # a crash of the whole coordinator: SuperLink, SuperExec, ServerApp
    crashed_at = time.monotonic()

    restarted = fed.start_server()
    resumed = "resuming the federation after round 1"
    wait_for("the resumed run", lambda: resumed in fed.log(restarted.name), 180)
    wait_for(
        "round 2 to reach the sites",
        lambda: all(any(e["round"] == 2 for e in fed.egress(s)) for s in SITES),
        600,
        restarted,
    )
    recovered = time.monotonic() - crashed_at
    wait_for("the federation to finish", lambda: restarted.poll() is not None, 600, *clients.values())
    assert restarted.proc.returncode == 0, fed.log(restarted.name)
    assert all(c.poll() is None for c in clients.values())  # the hospitals' daemons rode it out

    results = fed.results()
    assert results["resumed_from_round"] == 1
    train = results["history"]["train"]
    assert sorted(train) == ["1", "2"]  # no completed round lost
    assert all(sorted(train[r]) == list(SITES) for r in train)
    assert load_checkpoint(fed.run_dir / "checkpoint").round == 2
    runs = [json.loads(line) for line in (fed.root / "coordinator" / "runs.jsonl").read_text().splitlines()]
    submitted = [r for r in runs if r["status"] == "submitted"]
    assert [r["resumed-after-round"] for r in submitted] == [None, 1]
    first, second = (str(r["run-id"]) for r in submitted)
    for site in SITES:
        charged = _ledger_rounds(fed, site)
        assert charged == [(first, 1), (second, 2)]  # every round charged once, round 1 not again
    print(f"coordinator crash: round 2 reached every site {recovered:.0f} s after the crash")
