"""``fedshift server``: the coordinator daemon.

It starts Flower's SuperLink (TLS, SuperNode authentication, a database file)
on loopback only, makes the SuperLink's registered node keys exactly the
hospitals' public keys, opens the public port (an nginx proxy that forwards only
the Fleet API: :mod:`fedshift.deploy.proxy`), submits the fedshift ServerApp as
a Flower run, waits for it, and stops every process it started on exit or SIGTERM.

State directory (``[server] state-dir``)::

    superlink.db            # the SuperLink's persistent state (enrolled nodes, runs)
    flwr/config.toml        # FLWR_HOME of the flwr commands the coordinator runs (loopback address)
    enrolled.json           # {site: {"node-id", "key-sha256", "key"[, "max-num-examples"]}}: node id -> site
    proxy/nginx.conf        # the public port's proxy (Fleet API only)
    app/pyproject.toml      # the Flower app submitted (components and run-config defaults)
    run-config.toml         # this federation's run config ([federation] + resume-from)
    runs.jsonl              # one line per submitted run: run id, resumed-from round, status
    logs/superlink.log      # SuperLink (and SuperExec) output
    logs/proxy-*.log        # the public port: every request (client address, path, status), errors
    logs/run-<id>.log       # the ServerApp's log of each run
    run/                    # the run directory: checkpoint/ after every round, results.json at the end

Restarting after a crash (or SIGTERM) with the same config continues the
federation: when ``run/checkpoint`` exists and ``run/results.json`` does not,
the run is resubmitted with ``resume-from`` pointing at the checkpoint, so it
goes on from the last completed round.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fedshift
from fedshift.common.checkpoint import MANIFEST, load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.io import atomic_write_json
from fedshift.deploy.certs import node_public_key, public_key_fingerprint
from fedshift.deploy.flwr_cli import (
    ALREADY_ENROLLED_NOTE,
    CONNECTION,
    Flwr,
    FlwrCommandError,
    flower_env,
    write_connection,
)
from fedshift.deploy.processes import Child, wait_for_port
from fedshift.deploy.proxy import ProxyConfig
from fedshift.deploy.settings import ServerSettings
from fedshift.server.app import RESULTS_FILE

logger = logging.getLogger(__name__)

DATABASE = "superlink.db"
STARTUP_TIMEOUT = 120.0
FINISHED = "finished"
LOOPBACK = "127.0.0.1"  # the SuperLink's own address: its Control and Runtime APIs never leave the machine


class RunFailedError(RuntimeError):
    """The federation's Flower run ended without results (not a config mistake: exit code 1)."""


@dataclass(frozen=True)
class Paths:
    """Where the coordinator keeps its state."""

    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / DATABASE

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def app_dir(self) -> Path:
        return self.state_dir / "app"

    @property
    def run_config(self) -> Path:
        return self.state_dir / "run-config.toml"

    @property
    def runs(self) -> Path:
        return self.state_dir / "runs.jsonl"

    @property
    def enrolled(self) -> Path:
        return self.state_dir / "enrolled.json"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def proxy(self) -> Path:
        return self.state_dir / "proxy"


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def proxy_config(settings: ServerSettings, paths: Paths, local_port: int, insecure: bool) -> ProxyConfig:
    """The public port's proxy: ``[server] address`` -> the SuperLink on ``127.0.0.1:local_port``."""
    tls = (
        {}
        if insecure
        else {
            "ca_cert": settings.ca_cert,
            "server_cert": settings.server_cert,
            "server_key": settings.server_key,
        }
    )
    return ProxyConfig(settings.public_address, local_port, paths.proxy, paths.logs, **tls)


def superlink_argv(settings: ServerSettings, paths: Paths, local_port: int, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line: every API on ``127.0.0.1:local_port``, nowhere else.

    Run through :mod:`fedshift.deploy.superlink` (Flower's SuperLink with a longer SQLite lock wait)."""
    argv = [
        sys.executable,
        "-m",
        "fedshift.deploy.superlink",
        "--host",
        LOOPBACK,
        "--port",
        str(local_port),
        "--database",
        str(paths.database),
        # the app's code is installed with fedshift: never `uv sync` at run time (hospitals are offline)
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*argv, "--insecure"]
    assert settings.ca_cert and settings.server_cert and settings.server_key
    return [
        *argv,
        "--ssl-ca-certfile",
        str(settings.ca_cert),
        "--ssl-certfile",
        str(settings.server_cert),
        "--ssl-keyfile",
        str(settings.server_key),
        "--enable-supernode-auth",
    ]


def write_app(app_dir: Path) -> None:
    """A Flower app folder holding only ``pyproject.toml``: the code is the installed fedshift.

    Its run-config defaults are ``FederationConfig()``'s, so every key the
    ServerApp knows may be overridden with ``--run-config``.
    """
    defaults = FederationConfig().to_run_config()
    lines = [
        "[project]",
        'name = "fedshift"',
        f'version = "{fedshift.__version__}"',  # hospitals refuse a bundle of another fedshift version
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedshift"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedshift.server.app:app"',
        'clientapp = "fedshift.client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in defaults.items()),
    ]
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def resume_point(run_dir: Path) -> int | None:
    """The round of the checkpoint to continue from; ``None`` for a fresh federation.

    :class:`ConfigError` when the federation in ``run_dir`` has already finished.
    """
    if (run_dir / RESULTS_FILE).exists():
        raise ConfigError(
            f"Expected no finished federation in {run_dir}, but {RESULTS_FILE} is there; move that "
            "folder away (or set another [server] state-dir) to start a new federation"
        )
    if not (run_dir / "checkpoint" / MANIFEST).is_file():
        return None
    return load_checkpoint(run_dir / "checkpoint").round


def write_run_config(
    path: Path, settings: ServerSettings, resume_round: int | None, enrollment: Path | None
) -> None:
    """The run config of a submission: ``[federation]``, ``resume-from`` and ``enrollment``.

    ``enrollment`` names ``enrolled.json``, from which the ServerApp maps the
    node id Flower authenticated to a site (never the name a reply claims);
    empty with ``--insecure``, where nothing is enrolled.
    """
    values = dict(settings.run_config)
    values["resume-from"] = str(settings.run_dir / "checkpoint") if resume_round is not None else ""
    values["enrollment"] = str(enrollment) if enrollment is not None else ""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _record(paths: Paths, entry: dict[str, object]) -> None:
    with paths.runs.open("a") as f:
        f.write(json.dumps({"time": datetime.now(UTC).isoformat(timespec="seconds"), **entry}) + "\n")


class Coordinator:
    """The SuperLink, the enrollment and one federation run, stopped whole in :meth:`close`."""

    def __init__(self, settings: ServerSettings, *, insecure: bool = False) -> None:
        self.settings = settings
        self.insecure = insecure
        self.paths = Paths(settings.state_dir)
        self.flwr = Flwr(self.paths.flwr_home)
        self.superlink: Child | None = None
        self.proxy: Child | None = None
        self.local_port = settings.local_port or free_loopback_port()
        self.run_id: int | None = None

    @property
    def local_address(self) -> str:
        """The SuperLink's own address (loopback): the coordinator's flwr commands and helpers use it."""
        return f"{LOOPBACK}:{self.local_port}"

    def start(self) -> None:
        """Start the SuperLink on loopback; wait until its Control API answers (public port still shut)."""
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(exist_ok=True)
        if self.insecure:
            logger.warning(
                "fedshift server --insecure: the SuperLink runs WITHOUT TLS and WITHOUT SuperNode "
                "authentication; adapters and metrics travel in plaintext and any local process may "
                "join (allowed only because every address is loopback).",
            )
        write_connection(self.paths.flwr_home, self.local_address, self.settings.ca_cert)
        write_app(self.paths.app_dir)
        self.superlink = Child(
            "flower-superlink",
            superlink_argv(self.settings, self.paths, self.local_port, self.insecure),
            self.paths.logs / "superlink.log",
            env=flower_env(),
            cwd=self.paths.state_dir,
        )
        wait_for_port(LOOPBACK, self.local_port, STARTUP_TIMEOUT, self.superlink)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:  # the port opens before the Control API serves
            try:
                self.flwr.runs()
                break
            except FlwrCommandError:
                if time.monotonic() > deadline or self.superlink.poll() is not None:
                    raise
                time.sleep(1.0)
        logger.info("SuperLink up at %s (state in %s)", self.local_address, self.paths.database)

    def open(self) -> None:
        """Open the public port: the proxy that forwards only the Fleet API to the loopback SuperLink."""
        config = proxy_config(self.settings, self.paths, self.local_port, self.insecure)
        config.write()
        log = self.paths.logs / "proxy.log"
        self.proxy = Child("fleet-proxy", config.argv(), log, cwd=self.paths.state_dir)
        host = {"0.0.0.0": LOOPBACK, "::": "::1"}.get(self.settings.host, self.settings.host)
        wait_for_port(host, self.settings.port, STARTUP_TIMEOUT, self.proxy)
        logger.info(
            "Public port %s open: Fleet API only (proxy errors in %s)",
            self.settings.public_address,
            config.error_log,
        )

    def enroll(self) -> dict[str, dict[str, str]]:
        """Make the SuperLink's registered node keys exactly ``[hospitals]``; ``enrolled.json``.

        Every node the SuperLink holds as registered is checked, not only
        those fedshift registered: a node whose key is not in ``[hospitals]``
        (a site removed, a key replaced, or a key someone else registered) is
        unregistered. A configured key the SuperLink holds already keeps its
        node id; a new one is registered. ``enrolled.json`` gets the node id
        the SuperLink really holds for each site.
        """
        if self.insecure:
            logger.warning("Insecure mode: SuperNode authentication is off, nothing to enroll")
            return {}
        hospitals = self.settings.hospitals
        wanted = {site: node_public_key(key) for site, key in sorted(hospitals.items())}
        owners: dict[bytes, str] = {}
        for site, key in wanted.items():
            if key in owners:
                raise ConfigError(
                    f"Expected one key per site in [hospitals] of {self.settings.path}, but "
                    f"{owners[key]} and {site} have the same public key; give each hospital its own key "
                    "(fedshift keygen)"
                )
            owners[key] = site
        known = {
            int(entry["node-id"]): site
            for site, entry in _read_json(self.paths.enrolled).items()
            if isinstance(entry, dict) and str(entry.get("node-id", "")).isdigit()
        }
        registered = self.flwr.registered_keys()
        for node_id, key in sorted(registered.items()):
            if key not in owners:
                logger.warning(
                    "Unregistering node %d (%s): its key is not in [hospitals]",
                    node_id,
                    f"was {known[node_id]}" if node_id in known else "registered outside this enrollment",
                )
                self.flwr.unregister(node_id)
        holder = {key: node_id for node_id, key in registered.items() if key in owners}
        enrolled: dict[str, dict[str, str]] = {}
        for site, key in wanted.items():
            path = hospitals[site]
            if key in holder:
                node_id = str(holder[key])
            else:
                node_id = self.flwr.register(path, site)
                if node_id == ALREADY_ENROLLED_NOTE:  # held by a node that was unregistered: revoked for good
                    raise ConfigError(
                        f"Expected [hospitals] {site} ({path}) to be a new or an enrolled key, but the "
                        "SuperLink holds it as revoked (unregistered earlier), and a revoked key cannot join "
                        "again; the hospital makes a new key pair (fedshift keygen) and sends its .pub"
                    )
            fingerprint = public_key_fingerprint(path)
            enrolled[site] = {"node-id": node_id, "key-sha256": fingerprint, "key": str(path)}
            if site in self.settings.weight_caps:  # [hospitals] max-num-examples, read by the ServerApp
                enrolled[site]["max-num-examples"] = str(self.settings.weight_caps[site])
            logger.info("Enrolled %s (%s): node %s", site, path.name, node_id)
        atomic_write_json(self.paths.enrolled, enrolled)
        return enrolled

    def stop_stale_runs(self) -> None:
        """Stop runs the SuperLink's database still holds as unfinished (from before a crash)."""
        for run in self.flwr.runs():
            status = str(run.get("status", ""))
            if not status.startswith(FINISHED):
                run_id = int(run["run-id"])
                logger.warning("Stopping run %d left %s by an earlier coordinator", run_id, status)
                try:
                    self.flwr.stop(run_id)
                except FlwrCommandError as exc:
                    logger.warning("Could not stop run %d: %s", run_id, exc)

    def submit(self) -> int:
        """Submit the federation (resumed from the checkpoint when there is one); the run id."""
        resume_round = resume_point(self.settings.run_dir)
        enrollment = None if self.insecure else self.paths.enrolled
        write_run_config(self.paths.run_config, self.settings, resume_round, enrollment)
        self.run_id = self.flwr.submit(self.paths.app_dir, self.paths.run_config)
        if resume_round is None:
            logger.info("Submitted the federation as run %d", self.run_id)
        else:
            logger.info("Submitted run %d, resuming the federation after round %d", self.run_id, resume_round)
        _record(
            self.paths, {"run-id": self.run_id, "resumed-after-round": resume_round, "status": "submitted"}
        )
        return self.run_id

    def wait(self) -> Path:
        """Wait for the run to finish; ``results.json``, or :class:`RunFailedError`.

        The SuperLink is watched every second; the run's status (a ``flwr``
        command) every ``poll-seconds``, and every second once ``results.json``
        is written (the ServerApp's last act).
        """
        assert self.run_id is not None and self.superlink is not None
        results = self.settings.run_dir / RESULTS_FILE
        status, last_poll = "", -math.inf
        while not status.startswith(FINISHED):
            if self.superlink.poll() is not None:
                raise RunFailedError(
                    f"the SuperLink exited with code {self.superlink.proc.returncode} during run "
                    f"{self.run_id}; see {self.superlink.log_path}"
                )
            if results.is_file() or time.monotonic() - last_poll >= self.settings.poll_seconds:
                last_poll = time.monotonic()
                try:
                    new = self.flwr.run_status(self.run_id)
                except FlwrCommandError as exc:
                    logger.warning("Run %d: status unknown (%s)", self.run_id, exc)
                    new = status
                if new != status:
                    logger.info("Run %d: %s", self.run_id, new)
                    status = new
            if not status.startswith(FINISHED):
                time.sleep(1.0)
        log_path = self.paths.logs / f"run-{self.run_id}.log"
        log_path.write_text(self.flwr.logs(self.run_id))
        _record(self.paths, {"run-id": self.run_id, "status": status})
        if status != f"{FINISHED}:completed" or not results.is_file():
            raise RunFailedError(
                f"run {self.run_id} ended {status!r} without {RESULTS_FILE}; see {log_path}; "
                "start the server again to resume from the last completed round"
            )
        logger.info("Federation finished: results in %s, ServerApp log in %s", results, log_path)
        return results

    def close(self) -> None:
        """Stop the public port's proxy, then the SuperLink and everything it started."""
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None


def serve(settings: ServerSettings, *, insecure: bool = False) -> Path:
    """The whole coordinator: start, enroll, submit (or resume), wait; everything stopped on the way out."""
    resume_point(settings.run_dir)  # a finished federation is refused before anything starts
    coordinator = Coordinator(settings, insecure=insecure)
    try:
        coordinator.start()
        coordinator.enroll()
        coordinator.stop_stale_runs()
        coordinator.open()  # hospitals get in only once the enrollment is exact and no stale run is left
        coordinator.submit()
        return coordinator.wait()
    finally:
        coordinator.close()


__all__ = ["CONNECTION", "Coordinator", "RunFailedError", "serve"]
