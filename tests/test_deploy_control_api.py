"""Only the coordinator's own machine can use the SuperLink's Control API.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one port. ``fedshift
server`` binds the SuperLink to loopback and puts a proxy on the public address
that forwards only the Fleet API (``deploy/proxy.py``). The federation test
puts the coordinator and an outsider in two network namespaces that it creates
(:class:`fedshift.tests.netns_support.Network`: a bridge, addresses that exist only
inside them); without root or iproute2 both run on loopback, where the public port
is the proxy all the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedshift.common.cli import main
from fedshift.deploy.flwr_cli import executable, write_connection
from fedshift.deploy.processes import Child
from fedshift.tests.deploy_support import (
    FEDSHIFT,
    Federation,
    fedshift,
    flower_processes_under,
    toml,
    wait_for,
)
from fedshift.tests.helpers import one_line_error
from fedshift.tests.netns_support import Network, netns_unavailable

# every API but the Fleet API, and paths that try to reach them through the Fleet prefix
REFUSED_PATHS = (
    "/v1/control/list-runs",
    "/v1/control/register-node",
    "/v1/control/start-run",
    "/v1/control/stream-logs",
    "/v1/runtime/get-nodes",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "/v1//control/list-runs",
    "/health",
    "/docs",
)
# raw HTTPS requests (no client library normalizes the paths): argv host port ca path...; prints
# {path: [status, body]}
_RAW_REQUESTS = r"""
import json, socket, ssl, sys
host, port, ca, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
context = ssl.create_default_context(cafile=ca)
status = {}
for path in paths:
    with socket.create_connection((host, port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n"
            tls.sendall(head.encode() + b"\r\n")
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status[path] = [int(head.split()[1]), body.decode(errors="replace")[:200]]
print(json.dumps(status))
"""


@dataclass(frozen=True)
class Machines:
    """How to run a command on the coordinator's machine and on an outsider's."""

    coordinator: tuple[str, ...]  # argv prefix
    outsider: tuple[str, ...]
    public_host: str  # the address hospitals (and outsiders) use
    outsider_host: str  # the outsider's own address, as the proxy logs it
    kind: str


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    """Two namespaces on one bridge (coordinator, outsider); loopback when that is not possible."""
    reason = netns_unavailable()
    if reason is not None:
        print(f"one machine on loopback ({reason})")
        yield Machines((), (), "localhost", "127.0.0.1", "loopback")
        return
    with Network.create(("coordinator", "outsider"), tmp_path / "test-logs") as net:
        yield Machines(
            net.prefix("coordinator"),
            net.prefix("outsider"),
            net.address("coordinator"),
            net.address("outsider"),
            "netns",
        )


def _flwr(prefix: tuple[str, ...], home: Path, *args: str, cwd: Path) -> dict[str, Any]:
    """``flwr <args> --format json`` on one machine; its JSON answer."""
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    proc = subprocess.run(
        [*prefix, executable("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    start = proc.stdout.find("{")
    assert start >= 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return dict(json.loads(proc.stdout[start:]))


@pytest.mark.slow
def test_the_control_api_answers_only_the_coordinator(tmp_path: Path, machines: Machines) -> None:
    fed = Federation(tmp_path, rounds=1, min_nodes=2)
    root, host, port = tmp_path, machines.public_host, fed.port
    # the hospital makes its key pair at home and sends only the .pub (fedshift keygen)
    made = fedshift("keygen", "--site", "hospital-a", "--out", "hospital-a-keys", cwd=root)
    assert made.returncode == 0, made.stderr
    config = (root / "federation.toml").read_text()
    config = config.replace("certs/nodes/hospital-a.pub", "hospital-a-keys/hospital-a.pub")
    if machines.kind == "netns":  # the coordinator's certificate names its public address
        made = fedshift("certs", "--out", "certs", "--hosts", host, "--force", cwd=root)
        assert made.returncode == 0, made.stderr
        config = config.replace(f'address = "127.0.0.1:{port}"', f'address = "{host}:{port}"')
    (root / "federation.toml").write_text(config)
    site = fed.write_site_config("hospital-a", key="hospital-a")
    site.write_text(
        site.read_text()
        .replace(f'"localhost:{port}"', f'"{host}:{port}"')
        .replace("certs/nodes/hospital-a.key", "hospital-a-keys/hospital-a.key")
    )
    env = {**fed.env, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def start(name: str, prefix: tuple[str, ...], *args: str) -> Child:
        child = Child(
            name, [*prefix, *FEDSHIFT, *args], root / "test-logs" / f"{name}.log", env=env, cwd=root
        )
        fed.daemons.append(child)
        return child

    coordinator_home = root / "coordinator" / "flwr"
    try:
        server = start("server", machines.coordinator, "server", "--config", "federation.toml")
        wait_for("the run to be submitted", lambda: "Submitted" in fed.log("server"), 240, server)
        run_id = json.loads((root / "coordinator" / "runs.jsonl").read_text().splitlines()[-1])["run-id"]

        # an outsider with the federation's CA, at the coordinator's public address: every Control call fails
        outsider_home = root / "outsider-flwr"
        write_connection(outsider_home, f"{host}:{port}", root / "certs" / "ca.crt")
        calls = {
            "ls": ("list", "fedshift"),
            "node register": ("supernode", "register", "certs/nodes/intruder.pub", "fedshift"),
            "start-run": ("run", "coordinator/app", "fedshift"),
            "stop": ("stop", str(run_id), "fedshift"),
            "nodes": ("supernode", "list", "fedshift"),
        }
        for what, args in calls.items():
            answer = _flwr(machines.outsider, outsider_home, *args, cwd=root)
            assert answer["success"] is False, (what, answer)
            assert "403 Forbidden" in answer["error-message"], (what, answer)

        # raw requests: every path but the Fleet API's gets the proxy's 403; a Fleet call reaches Flower
        requests = [host, str(port), "certs/ca.crt", *REFUSED_PATHS, "/v1/fleet/get-run"]
        raw = subprocess.run(
            [*machines.outsider, sys.executable, "-c", _RAW_REQUESTS, *requests],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=120,
            check=True,
        )
        status = json.loads(raw.stdout)
        for path in REFUSED_PATHS:
            assert status[path][0] == 403 and "only the Fleet API" in status[path][1], (path, status[path])
        fleet_status, fleet_body = status["/v1/fleet/get-run"]
        assert fleet_status not in (403, 404, 502) and "only the Fleet API" not in fleet_body, fleet_body

        # what a hospital needs still works from outside: its SuperNode (keygen key) comes online
        client = start("client-hospital-a", machines.outsider, "client", "--config", "hospital-a.toml")
        node_a = json.loads((root / "coordinator" / "enrolled.json").read_text())["hospital-a"]["node-id"]

        def online() -> bool:
            nodes = _flwr(machines.coordinator, coordinator_home, "supernode", "list", "fedshift", cwd=root)
            return any(n["node-id"] == node_a and n["status"] == "online" for n in nodes["nodes"])

        waited = wait_for("hospital-a to come online through the proxy", online, 240, server, client)

        # the coordinator's own machine keeps the Control API (loopback): the run is there, not stopped
        runs = _flwr(machines.coordinator, coordinator_home, "list", "fedshift", cwd=root)
        assert runs["success"] and [r["status"] for r in runs["runs"] if r["run-id"] == str(run_id)] == [
            "running"
        ]
        nodes = _flwr(machines.coordinator, coordinator_home, "supernode", "list", "fedshift", cwd=root)
        assert len(nodes["nodes"]) == 3  # the three enrolled keys: the outsider registered nothing

        # the proxy logged the outsider's refused calls with its address
        access = (root / "coordinator" / "logs" / "proxy-access.log").read_text().splitlines()
        refused = [
            line for line in access if line.startswith(f"{machines.outsider_host} ") and " 403 " in line
        ]
        assert any("/v1/control/list-runs" in line for line in refused)
        assert any("/v1/control/register-node" in line for line in refused)
        print(f"{machines.kind}: outsider refused on {host}:{port}; hospital-a online after {waited:.0f} s")
    finally:
        fed.stop_all()
    assert flower_processes_under(root) == []


def _server_toml(root: Path, address: str) -> Path:
    path = root / "federation.toml"
    path.write_text(toml({"server": {"address": address, "state-dir": "state"}, "federation": {}}))
    return path


@pytest.mark.parametrize("address", ["0.0.0.0:9092", "10.1.2.3:9092", "coordinator.example.org:9092"])
def test_insecure_is_refused_unless_the_server_address_is_loopback(
    tmp_path: Path, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _server_toml(tmp_path, address)
    code = main(["server", "--config", str(path), "--insecure", "--check"])
    one_line_error(
        code, capsys.readouterr().err, "[server] address", "loopback", "--insecure", address.split(":")[0]
    )


@pytest.mark.parametrize("address", ["127.0.0.1:9092", "[::1]:9092", "localhost:9092"])
def test_insecure_on_loopback_is_allowed(
    tmp_path: Path, address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _server_toml(tmp_path, address)
    assert main(["server", "--config", str(path), "--insecure", "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_insecure_client_is_refused_unless_the_coordinator_is_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedshift.tests.deploy_support import write_site_data

    write_site_data(tmp_path / "a.npz", seed=0)
    site = {"site-name": "hospital-a", "data-path": "a.npz", "state-dir": "state", "dp-epsilon": 8.0}
    path = tmp_path / "site.toml"
    path.write_text(toml({"connection": {"superlink": "fl.example.org:9092"}, "site": site}))
    code = main(["client", "--config", str(path), "--insecure", "--check"])
    one_line_error(code, capsys.readouterr().err, "[connection] superlink", "loopback", "fl.example.org")
    path.write_text(toml({"connection": {"superlink": "127.0.0.1:9092"}, "site": site}))
    assert main(["client", "--config", str(path), "--insecure", "--check"]) == 0


def test_a_coordinator_without_nginx_fails_its_check_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedshift.deploy.proxy as proxy

    monkeypatch.setattr(proxy.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxy.os, "access", lambda path, mode: False)
    path = _server_toml(tmp_path, "127.0.0.1:9092")
    code = main(["server", "--config", str(path), "--insecure", "--check"])
    one_line_error(code, capsys.readouterr().err, "nginx", "apt-get install nginx")


def test_the_proxy_forwards_only_fleet_paths_to_loopback(tmp_path: Path) -> None:
    """The generated nginx.conf, checked by nginx itself (``nginx -t``) when it is installed."""
    from fedshift.deploy.proxy import ProxyConfig

    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--hosts", "localhost"]) == 0
    config = ProxyConfig(
        "0.0.0.0:9092",
        9093,
        tmp_path / "proxy",
        tmp_path / "logs",
        certs / "ca.crt",
        certs / "server.crt",
        certs / "server.key",
    )
    text = config.text()
    locations = [line.strip() for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == [
        "location @plaintext { return 444; }",  # plain HTTP on the TLS port: the connection is closed
        "location ~ ^/v1/fleet/([a-z-]+)$ {",
        'location / { return 403 "fedshift: only the Fleet API is served on this port\\n"; }',
    ]
    assert "proxy_pass https://superlink/v1/fleet/$1;" in text  # the upstream path is rebuilt, never passed
    assert "server 127.0.0.1:9093;" in text and "proxy_ssl_verify on;" in text
    if shutil.which("nginx") or Path("/usr/sbin/nginx").is_file():
        config.write()
        checked = subprocess.run(
            [*config.argv(), "-t"], capture_output=True, text=True, timeout=60, check=False
        )
        assert checked.returncode == 0, checked.stderr
