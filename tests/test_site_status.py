"""The hospital's ``--status``: ledger, connection and runner health from the daemon's files, read-only.

The ledger is a real one (real charges, its own epsilon as the reference); the
pids in ``daemon.json`` and ``site-runner.json`` are real processes, alive,
killed, or another program's: a file left behind never reads as running. The
text shows only values the JSON holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedshift.client.ledger import PrivacyLedger
from fedshift.common.io import atomic_write_json
from fedshift.deploy.settings import ClientSettings
from fedshift.deploy.site_status import DAEMON_FILE, HEALTH_FILE, format_site_status, site_status


@pytest.fixture
def settings(tmp_path: Path) -> ClientSettings:
    (tmp_path / "site.toml").write_text(
        '[connection]\nsuperlink = "localhost:9092"\n'
        '[site]\nsite-name = "hospital-a"\ndata-path = "a.npz"\nstate-dir = "state"\n'
        "dp-epsilon = 8.0\ndp-epsilon-per-run = 2.0\n"
    )
    loaded = ClientSettings.load(tmp_path / "site.toml", insecure=True)
    loaded.state_dir.mkdir()
    return loaded


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def _process(started: list[subprocess.Popen[bytes]], *argv: str) -> subprocess.Popen[bytes]:
    """A live process whose command line holds ``argv`` (as the daemon's, the SuperNode's, the runner's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])
    started.append(proc)
    return proc


def _leaves(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return {leaf for v in obj.values() for leaf in _leaves(v)}
    if isinstance(obj, list):
        return {leaf for v in obj for leaf in _leaves(v)}
    return {json.dumps(obj) if isinstance(obj, float) else str(obj)}


def _assert_text_matches_json(status: dict[str, Any]) -> str:
    """Every token of the text that holds a digit (numbers, pids, times, paths) is a value of the JSON."""
    text = format_site_status(status)
    leaves = _leaves(status)
    tokens = [t.rstrip(":") for t in re.split(r"[\s,;()]+", text) if re.search(r"\d", t)]
    assert tokens
    missing = [t for t in tokens if t not in leaves]
    assert missing == [], f"in the text but not the JSON: {missing}\n{text}"
    json.dumps(status)  # and it is JSON
    return text


def test_a_site_that_never_ran(settings: ClientSettings) -> None:
    status = site_status(settings)
    assert status["site"] == "hospital-a"
    privacy = status["privacy"]
    assert (privacy["spent-epsilon"], privacy["charges"], privacy["last-charge"]) == (0.0, 0, None)
    assert (privacy["budget-epsilon"], privacy["per-run-epsilon"], privacy["remaining-epsilon"]) == (
        8.0,
        2.0,
        8.0,
    )
    assert status["connection"]["daemon"] == "never started" and status["runner"]["state"] == "down"
    text = _assert_text_matches_json(status)
    assert "last round charged: none" in text and "daemon never started" in text
    assert sorted(p.name for p in settings.state_dir.iterdir()) == []  # read-only: nothing written


def test_the_ledger_total_and_the_last_round_are_the_ledgers_own(settings: ClientSettings) -> None:
    ledger = PrivacyLedger.at(settings.state_dir)
    for r in (1, 2):
        ledger.charge(
            run_id="5",
            round=r,
            mechanism="dp-sgd",
            noise_multiplier=1.1,
            sample_rate=0.3,
            steps=3,
            delta=1e-5,
        )
    reference = PrivacyLedger.at(settings.state_dir)  # reopened from disk, as another process reads it
    spent = reference.epsilon(1e-5)
    before = {p.name: p.stat().st_mtime_ns for p in settings.state_dir.iterdir()}
    status = site_status(settings)
    privacy = status["privacy"]
    assert privacy["spent-epsilon"] == pytest.approx(spent, abs=1e-6) and 0 < spent < 8
    assert privacy["spent-epsilon"] == pytest.approx(reference.entries[-1].epsilon, abs=1e-6)
    assert privacy["remaining-epsilon"] == pytest.approx(8.0 - spent, abs=2e-6)
    assert privacy["charges"] == 2 and privacy["accountant"] == reference.accountant
    assert privacy["last-charge"]["run"] == "5" and privacy["last-charge"]["round"] == 2
    text = _assert_text_matches_json(status)
    assert f"spent epsilon {json.dumps(privacy['spent-epsilon'])} of budget 8.0" in text
    assert "last round charged: run 5 round 2 (dp-sgd" in text
    assert {p.name: p.stat().st_mtime_ns for p in settings.state_dir.iterdir()} == before  # wrote nothing


def test_an_untrusted_ledger_is_said_not_hidden(settings: ClientSettings) -> None:
    (settings.state_dir / "privacy-ledger.json").write_text("{not json")
    status = site_status(settings)
    assert status["privacy"]["ledger-error"] and status["privacy"]["spent-epsilon"] is None
    assert "LEDGER NOT TRUSTED" in format_site_status(status)


def test_live_pids_are_up_and_dead_or_reused_ones_are_down(
    settings: ClientSettings, processes: list[subprocess.Popen[bytes]]
) -> None:
    daemon = _process(processes, "fedshift", "client")
    supernode = _process(processes, "flower-supernode")
    runner = _process(processes, "-m", "fedshift.deploy.site_runner")
    other = subprocess.Popen(["sleep", "120"])  # a pid now another program's
    processes.append(other)
    state = settings.state_dir
    atomic_write_json(
        state / DAEMON_FILE,
        {
            "pid": daemon.pid,
            "started": "2026-12-02T10:00:00+00:00",
            "supernode": {"state": "up", "pid": supernode.pid, "since": "2026-12-02T10:00:01+00:00"},
            "supernode-restarts": 1,
            "runner": {"state": "up", "pid": runner.pid},
            "runner-restarts": 2,
            "last-not-enrolled": None,
            "updated": "2026-12-02T10:00:02+00:00",
        },
    )
    health = {
        "pid": runner.pid,
        "started": "2026-12-02T10:00:01+00:00",
        "state": "busy",
        "messages": 3,
        "errors": 1,
        "current": {"run": 9, "type": "train", "since": "2026-12-02T10:05:00+00:00"},
        "last-message": {
            "run": 9,
            "type": "evaluate",
            "seconds": 0.412,
            "outcome": "ok",
            "finished": "2026-12-02T10:04:00+00:00",
        },
        "last-error": {"run": 8, "type": "train", "error": "timed-out", "at": "2026-12-02T09:00:00+00:00"},
        "task-timeout": 1800.0,
        "fedshift-version": "0.1.0",
        "updated": "2026-12-02T10:05:00+00:00",
    }
    atomic_write_json(state / HEALTH_FILE, health)
    status = site_status(settings)
    conn, run = status["connection"], status["runner"]
    assert (conn["daemon"], conn["supernode"], conn["supernode-pid"]) == ("running", "up", supernode.pid)
    assert (conn["supernode-restarts"], conn["runner-restarts"]) == (1, 2)
    assert (run["state"], run["pid"], run["messages"], run["errors"]) == ("busy", runner.pid, 3, 1)
    assert run["current"]["type"] == "train"
    text = _assert_text_matches_json(status)
    assert f"runner: busy (pid {runner.pid}" in text and "runner busy with: run 9 train" in text
    assert "last message: run 9 evaluate: ok in 0.412 s" in text

    # the runner killed (its file still says busy), the SuperNode's pid now another program's
    runner.kill()
    runner.wait(timeout=10)
    daemon_state = json.loads((state / DAEMON_FILE).read_text())
    daemon_state["supernode"]["pid"] = other.pid
    atomic_write_json(state / DAEMON_FILE, daemon_state)
    status = site_status(settings)
    assert (status["runner"]["state"], status["runner"]["reported-state"]) == ("down", "busy")
    assert status["runner"]["current"] is None
    assert (status["connection"]["daemon"], status["connection"]["supernode"]) == ("running", "down")
    text = _assert_text_matches_json(status)
    assert "runner: down" in text and "supernode down" in text and "busy with" not in text

    # the daemon killed: nothing it wrote reads as running
    daemon.kill()
    daemon.wait(timeout=10)
    status = site_status(settings)
    assert status["connection"]["daemon"] == "not running" and status["connection"]["supernode"] == "down"
    assert os.path.exists(state / DAEMON_FILE)  # still there, read as stale
