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
error reply). Both log into one file. After the check, this process hands
over to :mod:`fedshift.deploy.daemon` (``os.execv``: same pid, no torch), which
keeps both children running, restarts them, stops them on SIGTERM and keeps
``<state-dir>/daemon.json`` for ``fedshift client --status``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import stat
import sys
from dataclasses import dataclass
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
from fedshift.common.manifest import check_manifest
from fedshift.common.privacy import check_budget
from fedshift.deploy.daemon import DaemonPlan
from fedshift.deploy.flwr_cli import executable
from fedshift.deploy.settings import ClientSettings

logger = logging.getLogger(__name__)

NODE_CONFIG_FILE = "node-config.toml"
RUNTIME_SECRET = (
    "runtime-secret"  # in the state dir while the daemon runs: signs the site runner's task claims
)
REQUIRED_SPLITS = ("train", "val", "test")  # trained on, validated on each round, tested at the end


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


def daemon_plan(settings: ClientSettings, *, insecure: bool = False) -> DaemonPlan:
    """The SuperNode's and the site runner's command lines (node config and a new runtime secret written)."""
    node_config = write_node_config(settings)
    runtime_secret = write_runtime_secret(settings)
    return DaemonPlan(
        site_name=settings.site_name,
        state_dir=settings.state_dir,
        log_file=settings.log_file,
        enrollment_timeout=float(settings.enrollment_timeout),
        supernode_argv=supernode_argv(settings, node_config, insecure, runtime_secret),
        runner_argv=runner_argv(settings, runtime_secret),
        runtime_secret=runtime_secret,
    )


def run_daemon(settings: ClientSettings, *, insecure: bool = False) -> None:
    """Hand this process over to the supervision (:mod:`fedshift.deploy.daemon`); returns only on failure.

    ``os.execv`` keeps the pid, the open log and the parent (systemd, docker, a
    test), and drops everything the check loaded (torch, Opacus, the data readers).
    """
    if insecure:
        logger.warning(
            "fedshift client --insecure: no TLS and no node authentication; a coordinator with TLS "
            "(the default) refuses this connection. Use only on a closed test network.",
        )
    plan = daemon_plan(settings, insecure=insecure)
    path = plan.write()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, [sys.executable, "-m", "fedshift.deploy.daemon", str(path)])
