"""``fedshift status``: what a coordinator's federation is doing, read from the state it already keeps.

Nothing is written and nothing is stopped; it works while a run is live and
after the coordinator stopped. The sources, all under ``[server] state-dir``:

- ``runs.jsonl``: every run submitted; the last one is the federation's current run, and how a run
  ended once it did;
- the SuperLink, when it answers on loopback (``flwr/config.toml``, written by ``fedshift server``):
  the run's status (``ListRuns``, as ``flwr list``) and every node's state and heartbeat facts
  (``ListNodes``, as ``flwr supernode list``);
- ``superlink.db`` (opened read-only) when it does not: the nodes as the SuperLink last recorded them;
- ``enrolled.json``: each site's node id;
- ``run/checkpoint/checkpoint.json``: the last completed round and the ServerApp's history up to it
  (per round and site: the accepted replies, the privacy record each site sent with its update,
  refusals, rejected replies); ``run/results.json`` once the federation finished.

**Online and offline.** A SuperNode sends a heartbeat every 17.5-22.5 s
(Flower's heartbeat interval is 30 s: it waits ``(30 - 5) * U(0.7, 0.9)``), and
Flower counts it online until ``HEARTBEAT_PATIENCE`` (2) intervals after its
last one (``online_until``). A site is ``offline`` here as soon as its last
heartbeat is more than **one** interval old, so a hospital that dies shows as
offline at most one heartbeat interval (30 s) after its last heartbeat, and so
after the kill; Flower's own status (``flower-status``) follows up to one more
interval later. ``last-seen`` is that last heartbeat while Flower counts the
node online; once Flower has it offline, Flower keeps only the time it stopped
counting it (``offline-since``: the moment of a clean stop, or two intervals
after the last heartbeat), and ``last-seen`` is that time less two intervals
(but not before it came online): exact for a hospital that vanished, early for
one that stopped cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_MAX_INTERVAL, HEARTBEAT_PATIENCE

from fedshift.common.checkpoint import MANIFEST
from fedshift.common.config import FederationConfig
from fedshift.common.protocol import STATUS_FIELD
from fedshift.deploy.flwr_cli import CONNECTION, Flwr, FlwrCommandError
from fedshift.deploy.server import Paths
from fedshift.deploy.settings import ServerSettings
from fedshift.server.app import RESULTS_FILE

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = float(HEARTBEAT_DEFAULT_INTERVAL)  # what every SuperNode announces (30 s)
MAX_INTERVAL = float(HEARTBEAT_MAX_INTERVAL)  # the most the Fleet API accepts (a simulation's is infinite)
ONLINE, OFFLINE = "online", "offline"
NEVER_CONNECTED = "never-connected"  # registered, never online
UNREGISTERED = "unregistered"  # revoked, or a node id the SuperLink does not hold
NOT_ENROLLED = "not-enrolled"  # in [hospitals] but not yet in enrolled.json: enrolled at the next start
LISTED = frozenset({"registered", ONLINE, OFFLINE})  # a node not enrolled is listed in these states
_UINT64 = 2**64


def _iso(value: float | str | None) -> str | None:
    """A Unix time or an ISO string as ISO 8601 UTC to the second; ``None`` for nothing."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
        moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    else:
        moment = datetime.fromtimestamp(float(value), tz=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class NodeFacts:
    """What the SuperLink records of one node (``NodeInfo`` / the ``node`` table)."""

    status: str  # registered, online, offline, unregistered
    last_activated_at: str
    last_deactivated_at: str
    online_until: float | None  # Unix time Flower counts it online until
    heartbeat_interval: float | None

    @classmethod
    def from_info(cls, info: Any) -> NodeFacts:
        return cls(
            status=str(info.status),
            last_activated_at=str(info.last_activated_at),
            last_deactivated_at=str(info.last_deactivated_at),
            online_until=float(info.online_until) if info.HasField("online_until") else None,
            heartbeat_interval=float(info.heartbeat_interval) if info.heartbeat_interval else None,
        )

    def connection(self, now: float, live: bool) -> dict[str, Any]:
        """``state``, ``flower-status``, ``last-seen``, ``offline-since``, ``heartbeat-interval``.

        ``live``: the SuperLink is up (when it is not, no node can be connected).
        """
        interval = self.heartbeat_interval or HEARTBEAT_INTERVAL
        out: dict[str, Any] = {
            "flower-status": self.status,
            "heartbeat-interval": self.heartbeat_interval,
            "last-seen": None,
            "offline-since": None,
        }
        if self.status == "registered":
            return {**out, "state": NEVER_CONNECTED}
        if self.status not in (ONLINE, OFFLINE):
            return {**out, "state": UNREGISTERED}
        if self.status == ONLINE and (self.online_until is None or interval > MAX_INTERVAL):
            # no heartbeat facts (a simulation's node): Flower's word
            return {**out, "last-seen": _iso(self.last_activated_at), "state": ONLINE if live else OFFLINE}
        if self.status == ONLINE and self.online_until is not None:
            heartbeat = self.online_until - HEARTBEAT_PATIENCE * interval  # Flower adds 2 intervals to it
            out["last-seen"] = _iso(heartbeat)
            if live and now - heartbeat <= interval:
                return {**out, "state": ONLINE}
            # a missed heartbeat (Flower still counts it), or a SuperLink that stopped with it online
            out["offline-since"] = _iso(heartbeat + interval) if live else None
            return {**out, "state": OFFLINE}
        out["last-seen"] = self._alive_at(interval)
        out["offline-since"] = _iso(self.last_deactivated_at)
        return {**out, "state": OFFLINE}

    def _alive_at(self, interval: float) -> str | None:
        """The latest moment a node Flower has offline is known to have been alive.

        Flower keeps only when it marked the node offline: at a clean stop, or
        ``HEARTBEAT_PATIENCE`` intervals after a vanished node's last heartbeat,
        which it cannot tell apart. That time less the two intervals is that
        last heartbeat for a vanished node (exact) and a moment it was still
        online for one that stopped (early by up to two intervals); never before
        it came online.
        """
        moments = []
        with contextlib.suppress(ValueError):
            moments.append(datetime.fromisoformat(self.last_activated_at).timestamp())
        with contextlib.suppress(ValueError):
            offline = datetime.fromisoformat(self.last_deactivated_at).timestamp()
            moments.append(offline - HEARTBEAT_PATIENCE * interval)
        return _iso(max(moments)) if moments else None


def nodes_from_database(database: Path) -> dict[int, NodeFacts]:
    """Every node in the SuperLink's database, opened read-only (node ids as Flower shows them)."""
    uri = f"{database.resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
        rows = db.execute(
            "SELECT node_id, status, last_activated_at, last_deactivated_at, online_until, "
            "heartbeat_interval FROM node"
        ).fetchall()
    return {
        int(node_id) % _UINT64: NodeFacts(  # the database holds them as signed 64-bit integers
            str(status or ""),
            str(activated or ""),
            str(deactivated or ""),
            float(until) if until is not None else None,
            float(interval) if interval else None,
        )
        for node_id, status, activated, deactivated, until, interval in rows
        if node_id is not None
    }


def site_history(history: Mapping[str, Any], site: str) -> dict[str, Any]:
    """One site's facts in the ServerApp's history (``RunHistory.to_dict``)."""
    answered: list[int] = []
    for stage in ("train", "evaluate", "privacy"):
        answered += [int(r) for r, sites in history.get(stage, {}).items() if site in sites]
    refused = [e for e in history.get("refused", []) if e.get("site") == site]
    rejected = [e for e in history.get("rejected", []) if e.get("site") == site]
    answered += [int(e["round"]) for e in (*refused, *rejected)]
    reports = sorted(
        (int(r), dict(sites[site]))
        for r, sites in history.get("privacy", {}).items()
        if site in sites and sites[site].get("epsilon") is not None
    )
    last = reports[-1] if reports else None
    out: dict[str, Any] = {
        "last-round-answered": max(answered) if answered else None,
        "epsilon": float(last[1]["epsilon"]) if last else None,
        "epsilon-round": last[0] if last else None,
        "budget-epsilon": float(last[1]["budget-epsilon"]) if last and "budget-epsilon" in last[1] else None,
        "refusals": len(refused),
        "last-refusal": None,
        "rejected": len(rejected),
    }
    if refused:
        latest = max(refused, key=lambda e: int(e["round"]))
        out["last-refusal"] = {
            "round": int(latest["round"]),
            "stage": str(latest.get("stage", "")),
            "status": str(latest.get(STATUS_FIELD, "")),
            "reason": str(latest.get("reason", "")),
        }
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _runs(path: Path) -> list[dict[str, Any]]:
    """``runs.jsonl``'s lines (a torn or foreign line is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    runs = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "run-id" in entry:
                runs.append(entry)
    return runs


def _run(runs: list[dict[str, Any]], flwr: Flwr | None) -> dict[str, Any] | None:
    """The federation's current run: the last submitted, its status from the SuperLink when it answers,
    else how ``runs.jsonl`` says it ended (``submitted``: it had not ended when the coordinator stopped)."""
    submitted = [r for r in runs if r.get("status") == "submitted"]
    if not submitted:
        return None
    latest = submitted[-1]
    run_id = str(latest["run-id"])
    ended = [r for r in runs if str(r["run-id"]) == run_id and r.get("status") != "submitted"]
    run: dict[str, Any] = {
        "run-id": run_id,
        "status": str(ended[-1]["status"]) if ended else "submitted",
        "status-from": "runs.jsonl",
        "submitted-at": latest.get("time"),
        "resumed-after-round": latest.get("resumed-after-round"),
        "runs-submitted": len(submitted),
    }
    if flwr is not None:
        try:
            info = flwr.run_info(int(run_id))
        except (FlwrCommandError, ValueError) as exc:
            logger.warning("Run %s: no status from the SuperLink (%s)", run_id, exc)
        else:
            run.update({"status": info["status"], "status-from": "superlink"})
    return run


def _state(run: Mapping[str, Any] | None, live: bool, finished: bool, started: bool) -> str:
    """``finished``, ``not-started``, ``stopped`` (no coordinator), ``starting``, ``running``, ``failed``."""
    if finished:
        return "finished"
    if not started:
        return "not-started"
    if not live:
        return "stopped"
    status = str(run["status"]) if run is not None else ""
    if status == "running":
        return "running"
    if status.startswith("finished:"):
        return {"finished:completed": "finished", "finished:stopped": "stopped"}.get(status, "failed")
    return "starting"  # no run submitted yet (enrolling), or Flower's pending / starting


def _checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoint"
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or "round" not in manifest:
        return None
    return {
        "round": int(manifest["round"]),
        "path": str(path),
        "time": _iso((path / MANIFEST).stat().st_mtime),
        "sites": list(manifest.get("extra", {}).get("sites", [])),
        "history": dict(manifest.get("extra", {}).get("history", {})),
    }


def _superlink_address(paths: Paths) -> str | None:
    config = paths.flwr_home / "config.toml"
    with contextlib.suppress(OSError, ValueError, KeyError):
        import tomllib

        return str(tomllib.loads(config.read_text())["superlink"][CONNECTION]["address"])
    return None


def federation_status(settings: ServerSettings, now: float | None = None) -> dict[str, Any]:
    """Everything ``fedshift status`` shows, as JSON-able data (read-only; see the module's docstring)."""
    checked = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, tz=UTC)
    paths = Paths(settings.state_dir)
    flwr = Flwr(paths.flwr_home)
    coordinator: dict[str, Any] = {"running": False, "superlink": _superlink_address(paths), "error": None}
    infos: dict[int, NodeFacts] = {}
    try:
        infos = {int(i.node_id): NodeFacts.from_info(i) for i in flwr.node_infos()}
        coordinator["running"] = True
    except FlwrCommandError as exc:
        coordinator["error"] = (
            f"the SuperLink at {coordinator['superlink']} does not answer: {exc}"
            if coordinator["superlink"]
            else f"fedshift server has not run with this state-dir: no {paths.flwr_home / 'config.toml'}"
        )
        if paths.database.is_file():
            try:
                infos = nodes_from_database(paths.database)
            except sqlite3.Error as db_exc:
                coordinator["error"] += f"; {paths.database} unreadable ({db_exc})"
    live = bool(coordinator["running"])
    run = _run(_runs(paths.runs), flwr if live else None)
    results_path = settings.run_dir / RESULTS_FILE
    results = _read_json(results_path) if results_path.is_file() else None
    checkpoint = _checkpoint(settings.run_dir)
    history = (results or {}).get("history") or (checkpoint or {}).get("history") or {}
    num_rounds = FederationConfig.from_run_config(settings.run_config).num_rounds
    completed = checkpoint["round"] if checkpoint else 0
    state = _state(run, live, results is not None, paths.state_dir.is_dir())
    current = completed + 1 if state == "running" and completed < num_rounds else None
    if checkpoint is not None:
        checkpoint.pop("history")
    return {
        "config": str(settings.path),
        "checked-at": _iso(checked.timestamp()),
        "state": state,
        "coordinator": coordinator,
        "run": run,
        "num-rounds": num_rounds,
        "completed-rounds": completed,
        "current-round": current,
        "checkpoint": checkpoint,
        "results": str(results_path) if results is not None else None,
        "offline-after-seconds": HEARTBEAT_INTERVAL,
        "sites": _sites(settings, paths, infos, history, checked.timestamp(), live),
    }


def _sites(
    settings: ServerSettings,
    paths: Paths,
    infos: Mapping[int, NodeFacts],
    history: Mapping[str, Any],
    now: float,
    live: bool,
) -> list[dict[str, Any]]:
    """Every enrolled site (``enrolled.json``, then ``[hospitals]`` sites not enrolled yet), then any
    other node the SuperLink holds (an ``--insecure`` federation's, which enrolls nothing)."""
    enrolled = _read_json(paths.enrolled)
    node_of: dict[str, int | None] = {}
    if isinstance(enrolled, dict):
        for name, record in sorted(enrolled.items()):
            text = str(record.get("node-id", "")) if isinstance(record, dict) else ""
            node_of[name] = int(text) if text.isdigit() else None
    for name in sorted(settings.hospitals):
        node_of.setdefault(name, None)
    named = {n for n in node_of.values() if n is not None}
    rows: list[tuple[str | None, int | None]] = [*node_of.items()]
    rows += [(None, n) for n, facts in sorted(infos.items()) if n not in named and facts.status in LISTED]
    unknown = {"flower-status": None, "heartbeat-interval": None, "last-seen": None, "offline-since": None}
    sites = []
    for site, node in rows:
        entry: dict[str, Any] = {"site": site, "node-id": str(node) if node is not None else None}
        if node is None:
            entry.update(unknown, state=NOT_ENROLLED)
        elif node in infos:
            entry.update(infos[node].connection(now, live))
        else:  # the SuperLink holds no such node (an enrolled.json of another SuperLink database)
            entry.update(unknown, state=UNREGISTERED)
        entry.update(site_history(history, site or ""))
        sites.append(entry)
    return sites


# -- text

COLUMNS = (
    "site",
    "node-id",
    "state",
    "flower-status",
    "last-seen",
    "offline-since",
    "last-round-answered",
    "epsilon",
    "budget-epsilon",
    "refusals",
    "rejected",
)


def cell(value: Any) -> str:
    """A value as the text shows it: ``-`` for none, 4 significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(status: Mapping[str, Any]) -> str:
    """The text of ``fedshift status``: every value in it is also in :func:`federation_status`'s JSON."""
    coordinator = status["coordinator"]
    lines = [f"federation {status['config']}, checked at {status['checked-at']}", f"state: {status['state']}"]
    if coordinator["running"]:
        lines.append(f"coordinator: running (SuperLink {coordinator['superlink']})")
    else:
        lines.append(
            f"coordinator: not running ({coordinator['error']}); what follows is what its state files say"
        )
    run = status["run"]
    if run is None:
        lines.append("run: none submitted")
    else:
        lines.append(
            f"run: {run['run-id']} {run['status']} (status from {run['status-from']}), submitted at "
            f"{cell(run['submitted-at'])}, resumed after round {cell(run['resumed-after-round'])}, "
            f"runs submitted {run['runs-submitted']}"
        )
    lines.append(
        f"rounds: {status['completed-rounds']} of {status['num-rounds']} completed, current round "
        f"{cell(status['current-round'])}"
    )
    checkpoint = status["checkpoint"]
    if checkpoint is None:
        lines.append("checkpoint: none")
    else:
        lines.append(
            f"checkpoint: round {checkpoint['round']} at {checkpoint['time']} in {checkpoint['path']}, "
            f"sites {','.join(checkpoint['sites']) or '-'}"
        )
    lines.append(f"results: {cell(status['results'])}")
    sites = status["sites"]
    online = sum(s["state"] == ONLINE for s in sites)
    lines.append(
        f"sites: {len(sites)}, {online} online (offline: no heartbeat for more than "
        f"{cell(status['offline-after-seconds'])} s)"
    )
    if sites:
        lines += _table([[c.upper() for c in COLUMNS], *([cell(s[c]) for c in COLUMNS] for s in sites)])
    for s in sites:
        refusal = s["last-refusal"]
        if refusal is not None:
            lines.append(
                f"  {cell(s['site'])} last refusal: round {refusal['round']} {refusal['stage']} "
                f"{refusal['status']}: {refusal['reason']}"
            )
    return "\n".join(lines)
