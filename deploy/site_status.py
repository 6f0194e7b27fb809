"""``fedshift client --config site.toml --status``: what a hospital's daemon is doing, read from its files.

Read-only and safe while the federation runs: it opens the privacy ledger (the
total epsilon spent, against the site's budget, and the last round charged),
``<state-dir>/daemon.json`` (the daemon and its SuperNode, restarts, the last
time the coordinator refused this site's key) and ``<state-dir>/site-runner.json``
(the site runner's health: idle or busy, messages served, the last message and
the last error). A pid in those files that is no longer alive, or that now
belongs to another program, makes that part ``down``: a file left behind by a
killed daemon never reads as running. Nothing is written and no process is
contacted.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedshift.client.ledger import open_ledger
from fedshift.common.errors import FedshiftError
from fedshift.common.privacy_config import PrivacyConfig
from fedshift.deploy.daemon import DAEMON_FILE
from fedshift.deploy.settings import ClientSettings

HEALTH_FILE = "site-runner.json"  # written by fedshift.deploy.site_runner
# what a live process's command line holds, so that a reused pid is not taken for it
DAEMON_CMD, SUPERNODE_CMD, RUNNER_CMD = "fedshift", "flower-supernode", "fedshift.deploy.site_runner"
DIGITS = 6  # epsilon as shown, in the JSON and the text alike


def site_status(settings: ClientSettings) -> dict[str, Any]:
    """The site's status as a JSON-ready dict: ``site``, ``privacy``, ``connection``, ``runner``."""
    state_dir = settings.state_dir
    return {
        "site": settings.site_name,
        "state-dir": str(state_dir),
        "checked": _now(),
        "privacy": _privacy(settings),
        "connection": _connection(_read(state_dir / DAEMON_FILE)),
        "runner": _runner(_read(state_dir / HEALTH_FILE)),
    }


def _privacy(settings: ClientSettings) -> dict[str, Any]:
    node = settings.node_config
    enabled = bool(node.get("dp", True))
    budget = _number(node.get("dp-epsilon"))
    delta = _number(node.get("dp-delta", PrivacyConfig().delta))
    out: dict[str, Any] = {
        "dp": enabled,
        "budget-epsilon": budget,
        "per-run-epsilon": _number(node.get("dp-epsilon-per-run")),
        "delta": delta,
        "spent-epsilon": 0.0,
        "remaining-epsilon": budget,
        "charges": 0,
        "accountant": None,
        "last-charge": None,
        "ledger-error": None,
    }
    try:
        ledger = open_ledger(settings.state_dir)
    except (FedshiftError, OSError, ValueError) as exc:  # untrusted or unreadable: said, not hidden
        out["ledger-error"] = str(exc)
        out["spent-epsilon"] = out["remaining-epsilon"] = None
        return out
    if ledger is None or not ledger.entries:
        return out
    last = ledger.entries[-1]
    spent = round(float(ledger.epsilon(last.delta)), DIGITS)
    out.update(
        {
            "spent-epsilon": spent,
            "remaining-epsilon": None if budget is None else round(max(0.0, budget - spent), DIGITS),
            "charges": len(ledger.entries),
            "accountant": ledger.accountant,
            "last-charge": {
                "run": last.run_id,
                "round": last.round,
                "mechanism": last.mechanism,
                "epsilon-after": last.epsilon,
                "at": last.time,
            },
        }
    )
    return out


def _connection(daemon: dict[str, Any] | None) -> dict[str, Any]:
    if daemon is None:
        return {"daemon": "never started", "daemon-pid": None, "supernode": "down", "supernode-pid": None}
    running = _alive(daemon.get("pid"), DAEMON_CMD)
    found = daemon.get("supernode")
    supernode: dict[str, Any] = found if isinstance(found, dict) else {}
    pid = supernode.get("pid")
    up = running and supernode.get("state") == "up" and _alive(pid, SUPERNODE_CMD)
    return {
        "daemon": "running" if running else "not running",
        "daemon-pid": daemon.get("pid"),
        "daemon-started": daemon.get("started"),
        "supernode": "up" if up else "down",
        "supernode-pid": pid if up else None,
        "supernode-since": supernode.get("since") if up else None,
        "supernode-last-exit": _table(supernode.get("last-exit")),
        "supernode-restarts": daemon.get("supernode-restarts", 0),
        "runner-restarts": daemon.get("runner-restarts", 0),
        "last-not-enrolled": daemon.get("last-not-enrolled"),
        "updated": daemon.get("updated"),
    }


def _runner(health: dict[str, Any] | None) -> dict[str, Any]:
    if health is None:
        return {"state": "down", "pid": None, "reported-state": None}
    alive = _alive(health.get("pid"), RUNNER_CMD)
    reported = health.get("state")
    out = {
        "state": reported if alive else "down",
        "reported-state": reported,
        "pid": health.get("pid"),
        "started": health.get("started"),
        "messages": health.get("messages", 0),
        "errors": health.get("errors", 0),
        "current": _table(health.get("current")) if alive else None,
        "last-message": _table(health.get("last-message")),
        "last-error": _table(health.get("last-error")),
        "task-timeout": health.get("task-timeout"),
        "fedshift-version": health.get("fedshift-version"),
        "updated": health.get("updated"),
    }
    return out


def format_site_status(status: dict[str, Any]) -> str:
    """The text view of :func:`site_status`: every value shown is the JSON's."""
    p, c, r = status["privacy"], status["connection"], status["runner"]
    lines = [f"site {status['site']} (state-dir {status['state-dir']}), checked {status['checked']}"]
    if p["ledger-error"] is not None:
        lines.append(f"privacy: LEDGER NOT TRUSTED: {p['ledger-error']}")
    elif not p["dp"]:
        lines.append(f"privacy: dp off; {p['charges']} charges in the ledger")
    else:
        lines.append(
            f"privacy: spent epsilon {_fmt(p['spent-epsilon'])} of budget {_fmt(p['budget-epsilon'])} "
            f"(remaining {_fmt(p['remaining-epsilon'])}, delta {_fmt(p['delta'])}, "
            f"per-run cap {_fmt(p['per-run-epsilon'])}), {p['charges']} charges, "
            f"accountant {p['accountant'] or '-'}"
        )
    last = p["last-charge"]
    if last is not None:
        lines.append(
            f"last round charged: run {last['run']} round {last['round']} ({last['mechanism']}, "
            f"epsilon after {_fmt(last['epsilon-after'])}) at {last['at']}"
        )
    else:
        lines.append("last round charged: none")
    if c["daemon"] == "never started":
        lines.append("connection: daemon never started (no daemon.json)")
    else:
        lines.append(
            f"connection: daemon {c['daemon']} (pid {c['daemon-pid']}, started {c['daemon-started']}); "
            f"supernode {c['supernode']}"
            + (f" (pid {c['supernode-pid']} since {c['supernode-since']})" if c["supernode"] == "up" else "")
            + f"; supernode restarts {c['supernode-restarts']}, runner restarts {c['runner-restarts']}"
        )
        if c["supernode-last-exit"]:
            ex = c["supernode-last-exit"]
            lines.append(f"supernode last exit: code {ex.get('code')} at {ex.get('at')}")
        if c["last-not-enrolled"]:
            lines.append(f"last refused as not enrolled: {c['last-not-enrolled']}")
    if r["reported-state"] is None:
        lines.append("runner: down (no site-runner.json)")
    else:
        lines.append(
            f"runner: {r['state']} (pid {r['pid']}, reported {r['reported-state']}, started {r['started']}, "
            f"fedshift {r['fedshift-version']}); {r['messages']} messages, {r['errors']} errors, "
            f"task timeout {_fmt(r['task-timeout'])} s"
        )
        if r["current"]:
            cur = r["current"]
            lines.append(f"runner busy with: run {cur.get('run')} {cur.get('type')} since {cur.get('since')}")
        if r["last-message"]:
            m = r["last-message"]
            lines.append(
                f"last message: run {m.get('run')} {m.get('type')}: {m.get('outcome')} in "
                f"{_fmt(m.get('seconds'))} s at {m.get('finished')}"
            )
        if r["last-error"]:
            e = r["last-error"]
            lines.append(f"last error: run {e.get('run')} {e.get('type')}: {e.get('error')} at {e.get('at')}")
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any] | None:
    """A state file's JSON object; ``None`` when it is absent or unreadable (mid-replace it never is:
    both files are replaced atomically)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _table(value: Any) -> dict[str, Any] | None:
    """A table of a state file, or ``None`` (absent, or not a table: the text never fails on it)."""
    return value if isinstance(value, dict) else None


def _alive(pid: Any, needle: str) -> bool:
    """Whether ``pid`` is a live process whose command line holds ``needle``."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = status.rpartition(")")[2].split()[:1] == ["Z"]
    return not zombie and needle in cmdline


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, float) else str(value)  # as the JSON writes it


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
