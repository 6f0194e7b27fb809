"""``fedshift client``: a hospital's long-lived daemon around one Flower SuperNode.

Before connecting it checks the site config (certificates readable, data
readable with valid labels and the splits the ClientApp uses, privacy budget
set and possible for the data, ledger trustworthy) and refuses with one line
naming the key and the fix. Then it runs ``flower-supernode`` with the site's
private key, the CA and the node config (data path, state directory, budget),
in Flower's ``process`` isolation, and next to it the site runner
(:mod:`fedshift.deploy.site_runner`): the one process that runs ClientApp code
here, the *installed* ``fedshift.client.app:app``, and only for a run whose app
bundle is the coordinator's plain fedshift bundle (any other is refused with an
error reply). Both log into one file and are kept running:

- the SuperNode reconnects by itself when the coordinator restarts (Flower
  retries with backoff);
- if the SuperNode process exits anyway, it is restarted after a pause that
  grows up to :data:`MAX_BACKOFF`;
- a key the coordinator refuses (not enrolled) is retried too, since the
  coordinator may still be enrolling its sites; refused for longer than
  ``[connection] enrollment-timeout`` seconds, it is a configuration problem:
  the daemon stops with exit code 3 and says so;
- if the site runner exits, it is restarted (after the same growing pause); one
  that gave up a hung message (exit :data:`~fedshift.deploy.site_runner.EXIT_TASK_TIMEOUT`)
  is restarted at once;
- SIGTERM (systemd, docker stop) stops the SuperNode and the site runner.

The daemon keeps its own state in ``<state-dir>/daemon.json`` (atomic writes,
read by ``fedshift client --status``): its pid, the SuperNode's and the site
runner's pids, restarts and last exits, and when the coordinator last refused
this site's key.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedshift.client.egress import chain_legacy_egress_log
from fedshift.client.integrity import for_state_dir
from fedshift.client.ledger import chain_legacy_ledger, open_ledger, verify_site
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.common.config import FederationConfig
from fedshift.common.data import MANIFEST_SUFFIXES
from fedshift.common.decode_cache import default_cache_dir, latest_cached_size
from fedshift.common.errors import ConfigError, FedshiftError
from fedshift.common.io import atomic_write_json
from fedshift.common.manifest import check_manifest
from fedshift.common.privacy import check_budget
from fedshift.deploy.flwr_cli import executable, flower_env
from fedshift.deploy.processes import Child
from fedshift.deploy.settings import ClientSettings
from fedshift.deploy.site_runner import EXIT_TASK_TIMEOUT

logger = logging.getLogger(__name__)

NODE_CONFIG_FILE = "node-config.toml"
RUNTIME_SECRET = (
    "runtime-secret"  # in the state dir while the daemon runs: signs the site runner's task claims
)
REQUIRED_SPLITS = ("train", "val", "test")  # trained on, validated on each round, tested at the end
MIN_BACKOFF, MAX_BACKOFF = 2.0, 60.0
# flower-supernode's words when the SuperLink refuses its key (it then exits with code 1)
NOT_ENROLLED = "[code: 2004] Failed to activate SuperNode"
EXIT_NOT_ENROLLED = 3
DAEMON_FILE = "daemon.json"  # in the state dir: the daemon's view of its children (fedshift client --status)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


@dataclass(frozen=True)
class SiteCheck:
    """What the up-front check found."""

    train: int  # training examples
    splits: dict[str, int]  # examples per split
    epsilon: float  # the site's lifetime budget (nan with dp=false)
    spent: float  # epsilon already in the ledger (0 when none)
    data: tuple[str, ...] = ()  # a manifest's findings: files, classes, its split per patient


def check_site(settings: ClientSettings) -> SiteCheck:
    """Everything that can be checked before connecting; :class:`ConfigError` naming key and fix."""
    path = settings.path
    _check_connection_files(settings, path)
    try:
        site = SiteSettings.from_node_config(settings.node_config, FederationConfig())
    except FedshiftError as exc:
        raise ConfigError(f"[site] in {path}: {exc}") from None
    spent = _check_state_dir(site, path)  # first: a manifest's check writes its decode cache there
    splits, notes = _check_site_data(site, path)
    n_train = splits["train"]
    privacy = site.privacy
    _check_privacy(site, n_train, path)
    return SiteCheck(
        train=n_train,
        splits=splits,
        epsilon=privacy.epsilon if privacy.enabled else math.nan,
        spent=spent,
        data=notes,
    )


def _check_connection_files(settings: ClientSettings, path: Path) -> None:
    """The CA certificate is PEM and the node's private key is usable."""
    if settings.ca_cert is not None:
        try:
            x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
        except ValueError:
            raise ConfigError(
                f"Expected [connection] ca-cert in {path} to be a PEM certificate, but {settings.ca_cert} "
                "is not one; copy ca.crt from the coordinator"
            ) from None
    if settings.private_key is not None:
        _check_private_key(settings.private_key, path)


def _check_site_data(site: SiteSettings, path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Images per split of the site's data, readable and holding every required split, and what a manifest
    check found (every file decoded into the cache; its split at patient level, not yet saved)."""
    data_path = site.data_path
    if not os.access(data_path, os.R_OK) or not data_path.is_file():
        raise ConfigError(
            f"Expected [site] data-path in {path} to be a readable .npz file or .csv/.tsv manifest, but "
            f"{data_path} {'does not exist' if not data_path.exists() else 'cannot be read'}; fix the path "
            "or its permissions (the daemon's user must read it)"
        )
    notes: tuple[str, ...] = ()
    try:
        if data_path.suffix.lower() in MANIFEST_SUFFIXES:
            # at the size of the site's last run (its cache stays warm for the next), else the default
            size = latest_cached_size(default_cache_dir(site.state_dir), data_path) or site.image_size
            found = check_manifest(data_path, image_size=size, state_dir=site.state_dir)
            splits, notes = {k: sum(v) for k, v in found.counts.items()}, tuple(found.lines())
        else:
            splits = {k: len(v) for k, v in load_site_data(site).splits.items()}
    except FedshiftError as exc:
        raise ConfigError(f"[site] data-path in {path}: {exc}") from None
    missing = [s for s in REQUIRED_SPLITS if not splits.get(s)]
    if missing:
        raise ConfigError(
            f"Expected [site] data-path {data_path} to hold the splits {list(REQUIRED_SPLITS)}, but "
            f"{missing} are missing or empty; add <split>_images and <split>_labels (a manifest: rows "
            "whose split column names them, or more patients)"
        )
    return splits, notes


def _check_privacy(site: SiteSettings, n_train: int, path: Path) -> None:
    """The budget fits the training split; warns when one run may spend it all, or when DP is off."""
    privacy = site.privacy
    if privacy.enabled:
        try:
            check_budget(privacy.epsilon, privacy.delta, n_train)
        except FedshiftError as exc:
            raise ConfigError(f"[site] in {path}: {exc}") from None
        if privacy.noise_multiplier == 0 and privacy.run_cap is None:
            logger.warning(
                "%s: neither dp-noise-multiplier nor dp-epsilon-per-run is set in %s: the noise is sized "
                "from the run's num-server-rounds, which the coordinator chooses, so one run (e.g. of a "
                "single round) may spend the whole remaining budget dp-epsilon=%g; set dp-epsilon-per-run "
                "(e.g. dp-epsilon-per-run = 2.0) to cap what one run may spend",
                site.name,
                path,
                privacy.epsilon,
            )
    else:
        logger.warning(
            "%s: dp = false in %s: this site sends adapters WITHOUT differential privacy", site.name, path
        )


def _check_state_dir(site: SiteSettings, path: Path) -> float:
    """Prepare the state directory, verify its chains, and return the epsilon already spent."""
    privacy = site.privacy
    spent = 0.0
    _prepare_state_dir(site.state_dir, path)
    try:
        ledger = open_ledger(site.state_dir)
        logger.info("%s: %s", site.name, verify_site(site.state_dir))  # the ledger's and egress log's chains
        for_state_dir(site.state_dir).install()  # the site's first start: make its integrity key
        chain_legacy_ledger(site.state_dir)  # a version-1 ledger: chained and anchored now, not at a charge
        chain_legacy_egress_log(site.state_dir)  # and an unchained egress log, not at its next line
    except FedshiftError as exc:
        raise ConfigError(f"[site] state-dir in {path}: {exc}") from None
    if ledger is not None and privacy.enabled and ledger.accountant != privacy.accountant:
        raise ConfigError(
            f"Expected [site] dp-accountant in {path} to be {ledger.accountant!r}, the accountant this "
            f"site's privacy ledger is kept with, but got {privacy.accountant!r}; set dp-accountant = "
            f'"{ledger.accountant}" (the accountant is fixed in the ledger; a new ledger would reset the '
            "budget)"
        )
    if ledger is not None and ledger.entries:
        spent = ledger.epsilon(ledger.entries[-1].delta)
    return spent


def _check_private_key(key_path: Path, path: Path) -> None:
    try:
        key = load_ssh_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"Expected [connection] private-key in {path} to be an unencrypted OpenSSH EC private key, but "
            f"{key_path} is not one; use the nodes/<site>.key file from fedshift certs"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"Expected [connection] private-key in {path} to be an EC key (NIST curve), but {key_path} is "
            f"{type(key).__name__}; use the nodes/<site>.key file from fedshift certs"
        )
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s is readable by others (mode %o); run: chmod 600 %s", key_path, mode, key_path)


def _prepare_state_dir(state_dir: Path, path: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"Expected [site] state-dir in {path} to be a writable folder, but {state_dir} is not ({exc}); "
            "create it for the daemon's user"
        ) from None


def write_node_config(settings: ClientSettings) -> Path:
    """The SuperNode's node config as a TOML file (flower-supernode reads ``--node-config *.toml``)."""
    out = settings.state_dir / NODE_CONFIG_FILE
    out.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in sorted(settings.node_config.items())))
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_runtime_secret(settings: ClientSettings) -> Path:
    """A new random secret (0600) with which the site runner signs its task claims, made at each start.

    The SuperNode's Runtime API listens on loopback, where any local process may
    connect: with this secret only the site runner can claim a task (and get the
    token that reads its message and answers it).
    """
    path = settings.state_dir / RUNTIME_SECRET
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def supernode_argv(
    settings: ClientSettings, node_config: Path, insecure: bool, runtime_secret: Path | None = None
) -> list[str]:
    argv = [
        executable("flower-supernode"),
        "--superlink",
        settings.superlink,
        "--node-config",
        str(node_config),
        "--port",
        str(settings.runtime_port),
        # the SuperNode starts no ClientApp itself: the site runner takes its tasks (see site_runner.py)
        "--isolation",
        "process",
        *(["--superexec-auth-secret-file", str(runtime_secret)] if runtime_secret is not None else []),
    ]
    if insecure:
        return [*argv, "--insecure"]
    assert settings.ca_cert is not None and settings.private_key is not None
    return [
        *argv,
        "--root-certificates",
        str(settings.ca_cert),
        "--auth-supernode-private-key",
        str(settings.private_key),
    ]


def runner_argv(settings: ClientSettings, runtime_secret: Path | None = None) -> list[str]:
    """The site runner: the installed fedshift ClientApp, taking the SuperNode's tasks on loopback."""
    argv = [
        sys.executable,
        "-m",
        "fedshift.deploy.site_runner",
        "--runtime-api-address",
        f"127.0.0.1:{settings.runtime_port}",
        "--state-dir",
        str(settings.state_dir),
    ]
    argv += ["--task-timeout", repr(float(settings.task_timeout))]  # [connection] task-timeout
    return [*argv, "--runtime-secret-file", str(runtime_secret)] if runtime_secret is not None else argv


class _Runner:
    """The site runner child, restarted (after a growing pause) whenever it exits."""

    def __init__(
        self, settings: ClientSettings, runtime_secret: Path | None, state: DaemonState | None = None
    ) -> None:
        self.settings = settings
        self.runtime_secret = runtime_secret
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
                    self.settings.log_file,
                )
                self.restart_at = time.monotonic()
            else:
                logger.warning(
                    "The site runner exited with code %s; restarting it in %.0f s (log: %s)",
                    code,
                    self.backoff,
                    self.settings.log_file,
                )
                self.restart_at = time.monotonic() + self.backoff
                self.backoff = min(MAX_BACKOFF, self.backoff * 2)
            self._record("down", None, {"last-exit": {"code": code, "at": _now()}})
        if time.monotonic() >= self.restart_at:
            self.started = time.monotonic()
            restart = self.state is not None and self.state.runner.get("last-exit") is not None
            self.child = Child(
                "fedshift site runner",
                runner_argv(self.settings, self.runtime_secret),
                self.settings.log_file,
                env=flower_env(),
                cwd=self.settings.state_dir,
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


def run_daemon(settings: ClientSettings, *, insecure: bool = False) -> int:
    """Run the SuperNode until stopped; the exit code (3: this site's key is not enrolled).

    A refused key is retried (the coordinator may still be enrolling its sites
    when the SuperNode first connects) until it has been refused for
    ``enrollment-timeout`` seconds without a break.
    """
    if insecure:
        logger.warning(
            "fedshift client --insecure: no TLS and no node authentication; a coordinator with TLS "
            "(the default) refuses this connection. Use only on a closed test network.",
        )
    node_config = write_node_config(settings)
    runtime_secret = write_runtime_secret(settings)
    argv = supernode_argv(settings, node_config, insecure, runtime_secret)
    state = DaemonState(settings.state_dir / DAEMON_FILE)
    state.write()
    runner = _Runner(settings, runtime_secret, state)
    try:
        return _supervise(settings, argv, runner, state)
    finally:
        runner.stop()
        state.supernode = {**state.supernode, "state": "stopped", "pid": None}
        state.write()
        runtime_secret.unlink(missing_ok=True)


def _supervise(
    settings: ClientSettings, argv: list[str], runner: _Runner, state: DaemonState | None = None
) -> int:
    backoff = MIN_BACKOFF
    refused_since: float | None = None
    starts = 0
    while True:
        offset = settings.log_file.stat().st_size if settings.log_file.exists() else 0
        child = Child("flower-supernode", argv, settings.log_file, env=flower_env(), cwd=settings.state_dir)
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
        not_enrolled = NOT_ENROLLED in _log_since(settings.log_file, offset)
        if state is not None:
            exit_info = {"code": code, "at": _now()}
            state.supernode = {**state.supernode, "state": "down", "pid": None, "last-exit": exit_info}
            if not_enrolled:
                state.last_not_enrolled = _now()
            state.write()
        if not_enrolled:
            refused_since = refused_since if refused_since is not None else started
            waited = time.monotonic() - refused_since
            if waited >= settings.enrollment_timeout:
                logger.error(
                    "The coordinator refused %s's key for %.0f s (not enrolled); ask the coordinator to "
                    "add %s's public key to [hospitals] and restart the server, then start this daemon",
                    settings.site_name,
                    waited,
                    settings.site_name,
                )
                return EXIT_NOT_ENROLLED
            reason = "the coordinator refused this site's key (not enrolled yet?)"
        else:
            refused_since = None
            reason = f"flower-supernode exited with code {code}"
        if time.monotonic() - started > 10 * MAX_BACKOFF:
            backoff = MIN_BACKOFF
        logger.warning("%s; retrying in %.0f s (log: %s)", reason, backoff, settings.log_file)
        time.sleep(backoff)
        backoff = min(MAX_BACKOFF, backoff * 2)
