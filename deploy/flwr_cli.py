"""The coordinator's use of Flower's own command line (``flwr``) against its local SuperLink.

``flwr`` reads its SuperLink connections from ``$FLWR_HOME/config.toml``. The
coordinator keeps its own ``FLWR_HOME`` in its state directory, with one
connection named :data:`CONNECTION` (address, CA certificate), so what it does is
what an operator types::

    FLWR_HOME=<state-dir>/flwr flwr supernode register certs/nodes/hospital-a.pub fedshift
    FLWR_HOME=<state-dir>/flwr flwr run <state-dir>/app fedshift --run-config <state-dir>/run-config.toml
    FLWR_HOME=<state-dir>/flwr flwr ls fedshift

``flwr run`` (which packs the app bundle) and ``flwr log`` run as ``flwr``
processes, whose ``--format json`` answers are parsed (``flwr`` exits 0 even
when it reports ``"success": false``). Everything else, which the coordinator
asks often (the run's status every ``poll-seconds``), is the same Control API
call those commands make, through Flower's own Control API client over the same
connection, in this process: ``RegisterNode``, ``UnregisterNode``,
``ListNodes`` (with what ``flwr supernode list`` leaves out: each node's public
key and heartbeat facts), ``ListRuns`` and ``StopRun``. A ``flwr`` process costs
about a second of CPU to start; on a small coordinator, polled every few
seconds, that was a large share of a core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedshift.common.errors import FedshiftError

logger = logging.getLogger(__name__)

CONNECTION = "fedshift"
ALREADY_ENROLLED = "Public key already in use"  # flwr's message when a key is registered twice
ALREADY_ENROLLED_NOTE = "already enrolled"
TIMEOUT = 120.0


UNREADABLE_KEY = b""  # a registered key that does not parse as a public key: matches no [hospitals] key


class FlwrCommandError(FedshiftError):
    """A ``flwr`` command failed."""


def _status(run: Any) -> str:
    """A run's status as ``flwr list`` writes it: ``running``, ``finished:completed``, ..."""
    return str(run.status.status) + (f":{run.status.sub_status}" if run.status.sub_status else "")


def _public(exc: Exception) -> str:
    """An error's text, with the SuperLink's public message for an HTTP error (e.g. "Public key
    already in use."), which ``str()`` of httpx's error leaves out."""
    import httpx
    from flwr.supercore.error import FlowerError

    if isinstance(exc, httpx.HTTPStatusError):
        error = FlowerError.from_json(exc.response.text)
        text = error.message if error is not None else exc.response.text[:200]
        return f"{exc.response.status_code}: {text}"
    return str(exc)


def _der_key(node_id: int, pem: bytes) -> bytes:
    """A registered node's PEM public key as DER SubjectPublicKeyInfo; :data:`UNREADABLE_KEY`, with a
    warning, when the SuperLink's database holds something else (enrollment then unregisters the node)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except Exception as exc:  # malformed PEM, an unsupported algorithm: not a key any hospital holds
        logger.warning(
            "Node %d's registered public key cannot be read (%s: %s); treated as a key not in [hospitals]",
            node_id,
            type(exc).__name__,
            exc,
        )
        return UNREADABLE_KEY
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def executable(name: str) -> str:
    """A Flower console script, from this interpreter's environment first, then ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedshiftError(
            f"Expected Flower's {name!r} command to be installed, but it is not on PATH; "
            "install fedshift with pip (it brings flwr)"
        )
    return found


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower processes: ``PATH`` starts with the folder of Flower's scripts.

    The SuperLink and SuperNode start ``flower-superexec``, which starts
    ``flwr-serverapp`` / ``flwr-clientapp``, by name from ``PATH``: in a
    virtualenv that is not activated (systemd, cron) they are otherwise not found.
    """
    scripts = str(Path(executable("flwr")).parent)
    path = os.environ.get("PATH", "")
    if scripts not in path.split(os.pathsep):
        path = os.pathsep.join([scripts, path]) if path else scripts
    return {**os.environ, "PATH": path, **extra}


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with the one connection the coordinator uses."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{address}"',
    ]
    lines += [f"root-certificates = {json.dumps(str(ca_cert))}"] if ca_cert else ["insecure = true"]
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class Flwr:
    """Runs ``flwr`` subcommands against one SuperLink connection."""

    flwr_home: Path

    def call(self, *args: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """``flwr <args> --format json``; the parsed answer, or :class:`FlwrCommandError`."""
        argv = [executable("flwr"), *args, "--format", "json"]
        env = flower_env(FLWR_HOME=str(self.flwr_home), COLUMNS="200", NO_COLOR="1")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise FlwrCommandError(f"'flwr {' '.join(args)}' did not answer within {timeout:.0f} s") from None
        start = proc.stdout.find("{")
        try:
            answer = json.loads(proc.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise FlwrCommandError(
                f"'flwr {' '.join(args)}' failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no output'}"
            )
        if not answer.get("success", False):
            message = str(answer.get("error-message", "unknown error")).replace("\n", " ")
            raise FlwrCommandError(f"'flwr {' '.join(args)}' failed: {message}")
        return answer

    def register(self, public_key: Path, name: str) -> str:
        """Enroll a SuperNode key (``flwr supernode register``'s ``RegisterNode``); its node id, or
        ``"already enrolled"`` when the SuperLink holds the key already."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        from fedshift.deploy.certs import node_public_key  # checked as Flower checks it (ConfigError)

        pem = serialization.load_der_public_key(node_public_key(public_key)).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )  # the form Flower's RegisterNode takes (flwr's public_key_to_bytes)
        try:
            with self._control(f"registering {public_key}") as client:
                res = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
        except FlwrCommandError as exc:
            if ALREADY_ENROLLED in str(exc):
                return ALREADY_ENROLLED_NOTE
            raise
        if not res.node_id:
            raise FlwrCommandError(f"registering {public_key} failed: the SuperLink gave no node id")
        return str(res.node_id)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        with self._control(f"unregistering node {node_id}") as client:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node as ``{"node-id", "status"}`` (what ``flwr supernode list --format json`` shows)."""
        return [{"node-id": str(n.node_id), "status": str(n.status)} for n in self.node_infos()]

    def registered_keys(self) -> dict[int, bytes]:
        """Node id -> public key (DER SubjectPublicKeyInfo) of every node not unregistered;
        :data:`UNREADABLE_KEY` for a key that does not parse (never a hospital's: unregistered)."""
        from flwr.supercore.constant import NodeStatus

        return {
            int(node.node_id): _der_key(int(node.node_id), node.public_key)
            for node in self.node_infos()
            if node.status != NodeStatus.UNREGISTERED
        }

    def node_infos(self) -> list[Any]:
        """Every node the SuperLink holds, as Flower's ``NodeInfo`` (status, heartbeat interval,
        ``online_until``, public key, ...).

        The Control API's ``ListNodes`` (what ``flwr supernode list`` calls, whose
        JSON leaves out the keys and the heartbeat facts), through Flower's client
        with the connection of ``config.toml``.
        """
        from flwr.proto.control_pb2 import ListNodesRequest  # Flower's client, imported only when asked

        with self._control("listing the SuperLink's nodes") as client:
            return list(client.ListNodes(ListNodesRequest()).nodes_info)

    def run_info(self, run_id: int) -> dict[str, str]:
        """A run's ``status`` as ``flwr list`` writes it (``running``, ``finished:completed``, ...) and its
        ``pending-at``, ``running-at``, ``finished-at`` times (ISO, empty when not yet), from ``ListRuns``."""
        from flwr.proto.control_pb2 import ListRunsRequest

        with self._control(f"asking for run {run_id}") as client:
            runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise FlwrCommandError(f"the SuperLink holds no run {run_id}")
        run = runs[run_id]
        return {
            "status": _status(run),
            "pending-at": run.pending_at,
            "running-at": run.running_at,
            "finished-at": run.finished_at,
        }

    @contextlib.contextmanager
    def _control(self, what: str) -> Iterator[Any]:
        """Flower's Control API client on the connection of ``config.toml``; any failure to reach or ask
        it (no config, httpx, TLS, Flower errors) is one :class:`FlwrCommandError` (Flower's client times
        a call out after 30 s)."""
        try:
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

            config = tomllib.loads((self.flwr_home / "config.toml").read_text())
            connection = config["superlink"][CONNECTION]
            ca = connection.get("root-certificates")
            client = ControlHttpClient.from_server_address(
                connection["address"],
                insecure=bool(connection.get("insecure", False)),
                root_certificates=Path(ca).read_bytes() if ca else None,
                interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            )
        except Exception as exc:
            raise FlwrCommandError(f"{what} failed ({type(exc).__name__}: {exc})") from None
        try:
            yield client
        except FlwrCommandError:
            raise
        except Exception as exc:  # httpx, TLS and Flower errors alike: one message
            raise FlwrCommandError(f"{what} failed ({type(exc).__name__}: {_public(exc)})") from None
        finally:
            client.close()

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """Start the app in ``app_dir`` with the run config file; the run id."""
        answer = self.call("run", str(app_dir), CONNECTION, "--run-config", str(run_config))
        return int(answer["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        """Every run as ``{"run-id", "status"}`` (``flwr list``'s ``ListRuns``)."""
        from flwr.proto.control_pb2 import ListRunsRequest

        with self._control("listing the runs") as client:
            runs = client.ListRuns(ListRunsRequest()).run_dict
        return [{"run-id": int(run_id), "status": _status(run)} for run_id, run in runs.items()]

    def run_status(self, run_id: int) -> str:
        """``pending``, ``starting``, ``running``, ``finished:completed``, ``finished:failed``, ..."""
        return self.run_info(run_id)["status"]

    def stop(self, run_id: int) -> None:
        """``flwr stop``'s ``StopRun``."""
        from flwr.proto.control_pb2 import StopRunRequest

        with self._control(f"stopping run {run_id}") as client:
            if not client.StopRun(StopRunRequest(run_id=run_id)).success:
                raise FlwrCommandError(f"stopping run {run_id} failed: the SuperLink refused")

    def logs(self, run_id: int, timeout: float = 60.0) -> str:
        """The ServerApp's log of a run (plain text)."""
        argv = [executable("flwr"), "log", str(run_id), CONNECTION, "--show"]
        env = flower_env(FLWR_HOME=str(self.flwr_home), COLUMNS="200", NO_COLOR="1")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout
