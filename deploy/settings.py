"""The two deployment config files, read and checked before anything starts.

``federation.toml`` (the coordinator, ``fedshift server``)::

    [server]
    address = "0.0.0.0:9092"          # the public HTTPS port: a proxy that forwards only Flower's Fleet API
    # local-port = 9093               # the SuperLink itself, on 127.0.0.1 only (default: a free port)
    state-dir = "state"               # SuperLink database, logs, the federation's run directory
    ca-cert = "certs/ca.crt"
    server-cert = "certs/server.crt"
    server-key = "certs/server.key"

    [hospitals]                       # enrolled sites: name = public SuperNode key
    hospital-a = "certs/nodes/hospital-a.pub"
    hospital-b = { key = "certs/nodes/hospital-b.pub", max-num-examples = 500 }  # a cap on its weight

    [federation]                      # run config of the fedshift ServerApp (kebab-case keys)
    num-server-rounds = 10
    min-nodes = 2

``site.toml`` (a hospital, ``fedshift client``)::

    [connection]
    superlink = "coordinator.example.org:9092"
    ca-cert = "certs/ca.crt"
    private-key = "certs/nodes/hospital-a.key"

    [site]                            # the SuperNode's node config
    site-name = "hospital-a"
    data-path = "/data/hospital-a.npz"
    state-dir = "/var/lib/fedshift/hospital-a"
    dp-epsilon = 8.0

Relative paths are relative to the config file's folder. Every mistake is a
:class:`ConfigError` naming the file, the table and key, and the fix.
"""

from __future__ import annotations

import ipaddress
import math
import numbers
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedshift.client.site import NODE_LOCATION_KEYS, NODE_SETTINGS, SCREENED_KEYS, SITE_KEYS
from fedshift.common.config import FederationConfig, with_recipe
from fedshift.common.errors import ConfigError, FedshiftError
from fedshift.common.settings import check_value, fail, setting_of
from fedshift.deploy.certs import check_site_name

DEFAULT_PORT = 9092
DEFAULT_RUNTIME_PORT = 9094  # flower-supernode's local Runtime API (ClientApp processes connect to it)
DEFAULT_TASK_TIMEOUT = 1800.0  # seconds one ClientApp message may run in the site runner

SERVER_KEYS = {
    "address": 'host:port of the public HTTPS port (Fleet API only), e.g. "0.0.0.0:9092"',
    "local-port": "loopback port of the SuperLink itself (all its APIs); default: a free one",
    "state-dir": "folder for the SuperLink database, logs and the run directory",
    "ca-cert": "the federation's CA certificate (PEM), from fedshift certs",
    "server-cert": "the coordinator's TLS certificate (PEM), from fedshift certs",
    "server-key": "the coordinator's TLS private key (PEM), from fedshift certs",
    "poll-seconds": "how often the run's status is checked (seconds)",
}
CONNECTION_KEYS = {
    "superlink": 'the coordinator\'s host:port, e.g. "coordinator.example.org:9092"',
    "ca-cert": "the federation's CA certificate (PEM) that signed the coordinator's certificate",
    "private-key": "this site's SuperNode key (OpenSSH, from fedshift certs)",
    "runtime-port": "local port of the SuperNode's Runtime API (distinct per SuperNode on one machine)",
    "log-file": "the daemon's log file (default <state-dir>/logs/fedshift-client.log)",
    "enrollment-timeout": "seconds a refused key is retried before the daemon exits with code 3",
    "task-timeout": "seconds one ClientApp message may run in the site runner before it gets an error reply "
    "and the runner restarts",
}
HOSPITAL_KEYS = {
    "key": "the hospital's public SuperNode key (OpenSSH, from fedshift keygen)",
    "max-num-examples": "the largest FedAvg weight (num-examples) this hospital's reply may carry",
}


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file, or a one-line :class:`ConfigError` saying what is wrong with it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"Expected a config file at {path}, but there is none; pass --config PATH"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Expected {path} to be a readable text file, but reading failed ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"Expected {path} to be valid TOML, but it is malformed ({exc}); fix that line "
            '(strings need quotes: key = "value")'
        ) from None


def _table(doc: Mapping[str, Any], name: str, path: Path, required: bool = True) -> dict[str, Any]:
    value = doc.get(name)
    if value is None:
        if required:
            raise ConfigError(f"Expected a [{name}] table in {path}, but there is none; add it")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"Expected [{name}] in {path} to be a table, but got {value!r}")
    return value


def _unknown(table: Mapping[str, Any], known: Any, name: str, path: Path) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"Expected keys of [{name}] in {path} among {sorted(known)}, but got unknown key "
            f"{unknown[0]!r}; check the spelling (keys are kebab-case) or remove it"
        )


def _string(table: Mapping[str, Any], key: str, name: str, path: Path, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(
            f"Expected [{name}] {key} in {path}, but it is missing; set it ({_hint(name, key)})"
        )
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"Expected [{name}] {key} in {path} to be a non-empty string, but got {value!r}; "
            f'write it in quotes, e.g. {key} = "..."'
        )
    return value.strip()


def _hint(name: str, key: str) -> str:
    if name == "site":
        return NODE_SETTINGS[key].help if key in NODE_SETTINGS else key
    return {**SERVER_KEYS, **CONNECTION_KEYS, **HOSPITAL_KEYS}.get(key, "see deploy/README.md")


def _path(table: Mapping[str, Any], key: str, name: str, path: Path, default: str | None = None) -> Path:
    value = Path(_string(table, key, name, path, default)).expanduser()
    return value if value.is_absolute() else (path.parent / value).resolve()


def _existing_file(table: Mapping[str, Any], key: str, name: str, path: Path) -> Path:
    file = _path(table, key, name, path)
    if not file.is_file():
        raise ConfigError(
            f"Expected [{name}] {key} in {path} to name an existing file, but {file} does not exist; "
            "create it with fedshift certs or fix the path"
        )
    try:
        file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"Expected [{name}] {key} in {path} to be readable, but reading {file} failed ({exc}); "
            "fix its permissions"
        ) from None
    return file


def split_address(value: str, key: str, name: str, path: Path) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"Expected [{name}] {key} in {path} to be host:port, but got {value!r}; "
            f'e.g. {key} = "coordinator.example.org:{DEFAULT_PORT}"'
        )
    return host, int(port)


def _port(table: Mapping[str, Any], key: str, name: str, path: Path, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"Expected [{name}] {key} in {path} to be a port number, but got {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1); names are never resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_loopback_for_insecure(host: str, key: str, name: str, path: Path) -> None:
    """``--insecure`` (no TLS, no node authentication) only where nothing leaves the machine."""
    if not is_loopback(host):
        raise ConfigError(
            f"Expected [{name}] {key} in {path} to be a loopback address (127.0.0.1, ::1 or localhost) "
            f"with --insecure, but got {host!r}; without TLS and node authentication nothing may leave "
            "this machine: drop --insecure (use TLS, see fedshift certs) or use a loopback address"
        )


@dataclass(frozen=True)
class ServerSettings:
    """The coordinator: where the SuperLink listens, its certificates, the enrolled sites, the run config."""

    path: Path  # the federation.toml these came from
    host: str  # bind address of the public port (the Fleet-only proxy)
    port: int  # the public port: hospitals reach the Fleet API here, and nothing else
    state_dir: Path  # SuperLink database, logs, run directory
    ca_cert: Path | None  # None only with --insecure
    server_cert: Path | None
    server_key: Path | None
    hospitals: dict[str, Path]  # site name -> public key (OpenSSH)
    run_config: dict[str, Any]  # [federation], checked by FederationConfig.from_run_config
    poll_seconds: float  # status poll interval
    local_port: int | None = None  # the SuperLink's own port on 127.0.0.1; None: a free one at each start
    weight_caps: dict[str, int] = field(default_factory=dict)  # site -> its max-num-examples, where set

    @property
    def run_dir(self) -> Path:
        return Path(str(self.run_config["run-dir"]))

    @property
    def public_address(self) -> str:
        """``host:port`` of the public port (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def load(cls, path: Path, *, insecure: bool = False) -> ServerSettings:
        path = path.expanduser().resolve()
        doc = read_toml(path)
        _unknown(doc, ("server", "hospitals", "federation"), "top level", path)
        server = _table(doc, "server", path)
        _unknown(server, SERVER_KEYS, "server", path)
        host, port = split_address(
            _string(server, "address", "server", path, f"0.0.0.0:{DEFAULT_PORT}"), "address", "server", path
        )
        if insecure:
            require_loopback_for_insecure(host, "address", "server", path)
        local_port = _port(server, "local-port", "server", path, port) if "local-port" in server else None
        if local_port == port:
            raise ConfigError(
                f"Expected [server] local-port in {path} to differ from the port of address ({port}), but "
                "both are the same; pick another local-port or leave it out"
            )
        state_dir = _path(server, "state-dir", "server", path, "state")
        poll = server.get("poll-seconds", 30.0)
        if not isinstance(poll, numbers.Real) or isinstance(poll, bool) or not 0 < float(poll) <= 600:
            raise ConfigError(f"Expected [server] poll-seconds in {path} to be in (0, 600], but got {poll!r}")
        if insecure:
            ca = cert = key = None
        else:
            ca, cert, key = (
                _existing_file(server, k, "server", path) for k in ("ca-cert", "server-cert", "server-key")
            )
        hospitals, weight_caps = {}, {}
        for site, entry in _table(doc, "hospitals", path, required=not insecure).items():
            hospitals[site], cap = _hospital(site, entry, path)
            if cap is not None:
                weight_caps[site] = cap
        if not insecure and not hospitals:
            raise ConfigError(
                f"Expected at least one enrolled site in [hospitals] of {path}, but got none; "
                'add e.g. hospital-a = "certs/nodes/hospital-a.pub"'
            )
        # a hospital trains with DP-SGD unless its own site.toml sets dp = false: the DP-aware recipe
        federation = with_recipe(_table(doc, "federation", path, required=False), private=True)
        run_dir = federation.get("run-dir", str(state_dir / "run"))
        federation["run-dir"] = str(_path({"run-dir": run_dir}, "run-dir", "federation", path))
        try:
            FederationConfig.from_run_config(federation)
        except FedshiftError as exc:
            raise ConfigError(f"[federation] in {path}: {exc}") from None
        settings = (path, host, port, state_dir, ca, cert, key, hospitals, federation, float(poll))
        return cls(*settings, local_port, weight_caps)


def _hospital(site: str, entry: Any, path: Path) -> tuple[Path, int | None]:
    """One ``[hospitals]`` entry: ``"key.pub"`` or ``{ key = "key.pub", max-num-examples = 500 }``."""
    try:
        check_site_name(site)
    except ConfigError as exc:
        raise ConfigError(f"[hospitals] in {path}: {exc}") from None
    if not isinstance(entry, dict):
        return _existing_file({site: entry}, site, "hospitals", path), None
    name = f"hospitals.{site}"
    _unknown(entry, HOSPITAL_KEYS, name, path)
    key = _existing_file(entry, "key", name, path)
    if "max-num-examples" not in entry:
        return key, None
    declared = setting_of(FederationConfig, "max-num-examples")
    try:
        cap = check_value(declared, entry["max-num-examples"], f"[{name}] in {path}")
    except FedshiftError as exc:
        raise ConfigError(str(exc)) from None
    return key, int(cap)


@dataclass(frozen=True)
class ClientSettings:
    """A hospital: how to reach the coordinator, and its node config (data, state, privacy budget)."""

    path: Path  # the site.toml these came from
    superlink: str  # host:port of the coordinator
    ca_cert: Path | None  # None only with --insecure
    private_key: Path | None  # None only with --insecure
    runtime_port: int
    log_file: Path
    node_config: dict[str, Any]  # [site] with absolute paths: data-path, state-dir, site-name, dp-*, ...
    enrollment_timeout: float = 600.0  # seconds a refused key is retried before giving up
    task_timeout: float = DEFAULT_TASK_TIMEOUT  # seconds one message may run in the site runner

    @property
    def state_dir(self) -> Path:
        return Path(str(self.node_config["state-dir"]))

    @property
    def data_path(self) -> Path:
        return Path(str(self.node_config["data-path"]))

    @property
    def site_name(self) -> str:
        return str(self.node_config["site-name"])

    @classmethod
    def load(cls, path: Path, *, insecure: bool = False) -> ClientSettings:
        path = path.expanduser().resolve()
        doc = read_toml(path)
        _unknown(doc, ("connection", "site"), "top level", path)
        conn = _table(doc, "connection", path)
        _unknown(conn, CONNECTION_KEYS, "connection", path)
        superlink = _string(conn, "superlink", "connection", path)
        superlink_host, _ = split_address(superlink, "superlink", "connection", path)
        if insecure:
            require_loopback_for_insecure(superlink_host, "superlink", "connection", path)
        if insecure:
            ca = key = None
        else:
            ca = _existing_file(conn, "ca-cert", "connection", path)
            key = _existing_file(conn, "private-key", "connection", path)
        site = dict(_table(doc, "site", path))
        _unknown(site, {*NODE_LOCATION_KEYS, *SITE_KEYS}, "site", path)
        site["data-path"] = str(_path(site, "data-path", "site", path))
        site["state-dir"] = str(_path(site, "state-dir", "site", path, str(Path(site["data-path"]).parent)))
        if "integrity-key" in site:  # the HMAC key of the ledger and egress log (default: beside state-dir)
            site["integrity-key"] = str(_path(site, "integrity-key", "site", path))
        name = _string(site, "site-name", "site", path, Path(site["data-path"]).stem)
        try:
            site["site-name"] = check_site_name(name)
        except ConfigError as exc:
            raise ConfigError(f"[site] site-name in {path}: {exc}") from None
        _check_privacy_values(site, path)
        for name_key, example in (("egress-metrics", '["auc", "n"]'), ("eval-splits", '["val", "test"]')):
            names = site.get(name_key)
            if isinstance(names, list) and all(isinstance(m, str) for m in names):
                site[name_key] = ",".join(names)  # the node config holds a comma-separated string
            elif names is not None and not isinstance(names, str):
                raise ConfigError(
                    f"Expected [site] {name_key} in {path} to list names, but got {names!r}; "
                    f"e.g. {name_key} = {example}"
                )
        state_dir = Path(site["state-dir"])
        log_file = _path(
            conn, "log-file", "connection", path, str(state_dir / "logs" / "fedshift-client.log")
        )
        runtime_port = _port(conn, "runtime-port", "connection", path, DEFAULT_RUNTIME_PORT)
        timeout = conn.get("enrollment-timeout", 600.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise ConfigError(
                f"Expected [connection] enrollment-timeout in {path} to be a number of seconds >= 0, "
                f"but got {timeout!r}; e.g. enrollment-timeout = 600"
            )
        task_timeout = conn.get("task-timeout", DEFAULT_TASK_TIMEOUT)
        if (
            isinstance(task_timeout, bool)
            or not isinstance(task_timeout, int | float)
            or not 0 < task_timeout < math.inf
        ):
            raise ConfigError(
                f"Expected [connection] task-timeout in {path} to be a number of seconds > 0, but got "
                f"{task_timeout!r}; e.g. task-timeout = {DEFAULT_TASK_TIMEOUT:g} (the longest a training "
                "round may take here)"
            )
        return cls(
            path, superlink, ca, key, runtime_port, log_file, site, float(timeout), float(task_timeout)
        )


def _check_privacy_values(site: Mapping[str, Any], path: Path) -> None:
    """The [site] privacy keys checked against their run-config declarations (TOML has real numbers)."""
    for key in sorted(SCREENED_KEYS & set(site)):
        declared, value, source = setting_of(FederationConfig, key), site[key], f"{path} [site]"
        try:
            check_value(declared, value, source)
        except FedshiftError:
            quoted = isinstance(value, str) and declared.kind is not str
            raw = "true" if declared.kind is bool else declared.example()
            fix = f"write it without quotes, e.g. {key} = {raw}" if quoted else ""
            raise ConfigError(str(fail(declared, value, source, fix))) from None
    # dp-secure-rng = false is refused by the ClientApp's own rule (deployed_privacy), which
    # check_site runs at the daemon's start
