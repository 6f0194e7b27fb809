"""The hospital daemon's supervision: one ``flower-supernode`` and one site runner, kept running.

``fedshift client`` checks the site (data, budget, ledger: torch, Opacus and the
data readers loaded), writes a :class:`DaemonPlan` (the two children's command
lines, the log, the state directory) and then *replaces itself* with this module
(``os.execv``, same pid, same log and signals for systemd and docker), which
imports no torch: a daemon that only supervises holds about 30 MiB instead of the
~450 MiB the check leaves behind (measured by ``simulations/benchmarks/scale.py``).

- the SuperNode reconnects by itself when the coordinator restarts (Flower
  retries with backoff); if its process exits anyway, it is restarted after a
  pause that grows up to :data:`MAX_BACKOFF`;
- a key the coordinator refuses (not enrolled) is retried too, since the
  coordinator may still be enrolling its sites; refused for longer than
  ``[connection] enrollment-timeout`` seconds, it is a configuration problem:
  the daemon stops with exit code 3 and says so;
- if the site runner exits, it is restarted (after the same growing pause; at
  once after it gave up a hung message, exit :data:`EXIT_TASK_TIMEOUT`);
- SIGTERM (systemd, docker stop) stops the SuperNode and the site runner;
- ``<state-dir>/daemon.json`` (:class:`DaemonState`) says how both children are,
  for ``fedshift client --status``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedshift.common.cli import setup_logging
from fedshift.common.io import atomic_write_json
from fedshift.deploy.flwr_cli import flower_env
from fedshift.deploy.processes import Child, StopRequested, stop_on_signals

# run as ``python -m``, this module is __main__; its log lines still carry its package name
logger = logging.getLogger("fedshift.deploy.daemon" if __name__ == "__main__" else __name__)

MIN_BACKOFF, MAX_BACKOFF = 2.0, 60.0
# flower-supernode's words when the SuperLink refuses its key (it then exits with code 1)
NOT_ENROLLED = "[code: 2004] Failed to activate SuperNode"
EXIT_NOT_ENROLLED = 3
EXIT_TASK_TIMEOUT = 75  # the runner's exit after a hung message: the daemon restarts a clean one at once
DAEMON_FILE = "daemon.json"  # in the state dir: the daemon's view of its children (fedshift client --status)
PLAN_FILE = "daemon-plan.json"  # in the state dir: what fedshift client hands this module
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DaemonPlan:
    """What the daemon runs, decided by ``fedshift client`` after its check (JSON in the state dir)."""

    site_name: str
    state_dir: Path
    log_file: Path
    enrollment_timeout: float
    supernode_argv: list[str]
    runner_argv: list[str]
    runtime_secret: Path | None = None  # removed when the daemon stops

    def write(self) -> Path:
        path = self.state_dir / PLAN_FILE
        atomic_write_json(path, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})
        return path

    @classmethod
    def load(cls, path: Path) -> DaemonPlan:
        d = json.loads(path.read_text())
        paths = {k: Path(d[k]) if d[k] else None for k in ("state_dir", "log_file", "runtime_secret")}
        return cls(**{**d, **paths})


@dataclass
class DaemonState:
    """What ``<state-dir>/daemon.json`` says; written atomically at every change (a failed write is
    logged, never fatal)."""

    path: Path
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=_now)
    supernode: dict[str, Any] = field(default_factory=lambda: {"state": "starting", "pid": None})
    supernode_restarts: int = 0
    runner: dict[str, Any] = field(default_factory=lambda: {"state": "starting", "pid": None})
    runner_restarts: int = 0
    last_not_enrolled: str | None = None  # when the coordinator last refused this site's key

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started": self.started,
            "supernode": self.supernode,
            "supernode-restarts": self.supernode_restarts,
            "runner": self.runner,
            "runner-restarts": self.runner_restarts,
            "last-not-enrolled": self.last_not_enrolled,
            "updated": _now(),
        }

    def write(self) -> None:
        try:
            atomic_write_json(self.path, self.to_dict())
        except OSError as exc:
            logger.warning("Could not write the daemon's state file %s: %s", self.path, exc)


class _Runner:
    """The site runner child, restarted (after a growing pause) whenever it exits."""

    def __init__(self, plan: DaemonPlan, state: DaemonState | None = None) -> None:
        self.plan = plan
        self.state = state
        self.child: Child | None = None
        self.backoff = MIN_BACKOFF
        self.restart_at = 0.0
        self.started = 0.0

    def check(self) -> None:
        """Start the runner if it is not running (and its pause is over)."""
        if self.child is not None:
            code = self.child.poll()
            if code is None:
                return
            self.child.stop()
            self.child = None
            if time.monotonic() - self.started > 10 * MAX_BACKOFF:
                self.backoff = MIN_BACKOFF
            if code == EXIT_TASK_TIMEOUT:  # it answered a hung message with an error: a clean one now
                logger.warning(
                    "The site runner gave up a hung message (over its task timeout) and exited; "
                    "starting a clean one now (log: %s)",
                    self.plan.log_file,
                )
                self.restart_at = time.monotonic()
            else:
                logger.warning(
                    "The site runner exited with code %s; restarting it in %.0f s (log: %s)",
                    code,
                    self.backoff,
                    self.plan.log_file,
                )
                self.restart_at = time.monotonic() + self.backoff
                self.backoff = min(MAX_BACKOFF, self.backoff * 2)
            self._record("down", None, {"last-exit": {"code": code, "at": _now()}})
        if time.monotonic() >= self.restart_at:
            self.started = time.monotonic()
            restart = self.state is not None and self.state.runner.get("last-exit") is not None
            self.child = Child(
                "fedshift site runner",
                self.plan.runner_argv,
                self.plan.log_file,
                env=flower_env(),
                cwd=self.plan.state_dir,
            )
            if self.state is not None and restart:
                self.state.runner_restarts += 1
            self._record("up", self.child.pid)

    def _record(self, state: str, pid: int | None, extra: dict[str, Any] | None = None) -> None:
        if self.state is not None:
            self.state.runner = {**self.state.runner, "state": state, "pid": pid, **(extra or {})}
            self.state.write()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None
            self._record("stopped", None)


def _log_since(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _supervise(plan: DaemonPlan, runner: _Runner, state: DaemonState | None = None) -> int:
    backoff = MIN_BACKOFF
    refused_since: float | None = None
    starts = 0
    while True:
        offset = plan.log_file.stat().st_size if plan.log_file.exists() else 0
        child = Child(
            "flower-supernode", plan.supernode_argv, plan.log_file, env=flower_env(), cwd=plan.state_dir
        )
        started = time.monotonic()
        if state is not None:
            state.supernode_restarts = starts
            state.supernode = {**state.supernode, "state": "up", "pid": child.pid, "since": _now()}
            state.write()
        starts += 1
        try:
            while child.poll() is None:
                runner.check()
                time.sleep(0.5)
        finally:
            code = child.stop()
        not_enrolled = NOT_ENROLLED in _log_since(plan.log_file, offset)
        if state is not None:
            exit_info = {"code": code, "at": _now()}
            state.supernode = {**state.supernode, "state": "down", "pid": None, "last-exit": exit_info}
            if not_enrolled:
                state.last_not_enrolled = _now()
            state.write()
        if not_enrolled:
            refused_since = refused_since if refused_since is not None else started
            waited = time.monotonic() - refused_since
            if waited >= plan.enrollment_timeout:
                logger.error(
                    "The coordinator refused %s's key for %.0f s (not enrolled); ask the coordinator to "
                    "add %s's public key to [hospitals] and restart the server, then start this daemon",
                    plan.site_name,
                    waited,
                    plan.site_name,
                )
                return EXIT_NOT_ENROLLED
            reason = "the coordinator refused this site's key (not enrolled yet?)"
        else:
            refused_since = None
            reason = f"flower-supernode exited with code {code}"
        if time.monotonic() - started > 10 * MAX_BACKOFF:
            backoff = MIN_BACKOFF
        logger.warning("%s; retrying in %.0f s (log: %s)", reason, backoff, plan.log_file)
        time.sleep(backoff)
        backoff = min(MAX_BACKOFF, backoff * 2)


def run(plan: DaemonPlan) -> int:
    """Supervise both children until stopped; the exit code (3: this site's key is not enrolled)."""
    state = DaemonState(plan.state_dir / DAEMON_FILE)
    state.write()
    runner = _Runner(plan, state)
    try:
        return _supervise(plan, runner, state)
    finally:
        runner.stop()
        state.supernode = {**state.supernode, "state": "stopped", "pid": None}
        state.write()
        if plan.runtime_secret is not None:
            plan.runtime_secret.unlink(missing_ok=True)
        (plan.state_dir / PLAN_FILE).unlink(missing_ok=True)


def file_logging(path: Path) -> None:
    """Log to the end of ``path`` too, as every fedshift daemon does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedshift.deploy.daemon",
        description="Supervise a hospital's SuperNode and site runner (fedshift client hands over to this "
        "after its check; not meant to be run by hand).",
    )
    parser.add_argument("plan", type=Path, help=f"the plan fedshift client wrote (<state-dir>/{PLAN_FILE})")
    args = parser.parse_args(argv)
    plan = DaemonPlan.load(args.plan)
    setup_logging(verbose=False)  # as the fedshift command had it: stderr, INFO
    file_logging(plan.log_file)
    try:
        with stop_on_signals():
            return run(plan)
    except StopRequested as stop:
        logger.info("Stopped on %s", stop)
        return 0


if __name__ == "__main__":
    sys.exit(main())
