"""A real federation on loopback for the deployment tests: certificates, configs, data and daemons.

Everything is made with the commands of ``deploy/README.md`` (``fedshift certs``,
``fedshift server --config``, ``fedshift client --config``), run as real
processes; :class:`Federation` stops every process tree it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.common.data import Dataset, load_npz, make_synthetic_cxr, save_npz
from fedshift.deploy.processes import Child, descendants
from fedshift.simulations.manifest_export import export_manifest

SITES = ("hospital-a", "hospital-b", "hospital-c")
_SCRIPT = Path(sys.executable).parent / "fedshift"  # the console script the runbook uses
FEDSHIFT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fedshift.common.cli"]
# tiny and fast: 32 px images, 60 training images per site, 2 DP-SGD steps per round
TINY_FEDERATION = {
    "image-size": 32,
    "batch-size": 30,
    "local-epochs": 1,
    "device": "cpu",
    "seed": 0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fedshift(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One ``fedshift`` command, as a user types it (in ``cwd``)."""
    return subprocess.run(
        [*FEDSHIFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_site_data(path: Path, seed: int, n: int = 90) -> None:
    pooled = make_synthetic_cxr(n, prevalence=0.5, size=28, seed=seed).split("train")
    idx = np.arange(n)
    splits = {
        "train": pooled.subset(idx[: n - 30]),
        "val": pooled.subset(idx[n - 30 : n - 15]),
        "test": pooled.subset(idx[n - 15 :]),
    }
    save_npz(path, Dataset(splits, ("normal", "lesion"), "synthetic-cxr", True))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def write_site_toml(root: Path, *, ca_cert: Path, private_key: Path, superlink: str, **site: Any) -> Path:
    """``root/site.toml`` for hospital-a, its data at ``root/a.npz``; ``site`` sets [site] keys."""
    write_site_data(root / "a.npz", seed=0)
    values = {"site-name": "hospital-a", "data-path": "a.npz", "state-dir": "state", "dp-epsilon": 8.0}
    values.update(site)
    connection = {"superlink": superlink, "ca-cert": str(ca_cert), "private-key": str(private_key)}
    path = root / "site.toml"
    path.write_text(toml({"connection": connection, "site": values}))
    return path


class Federation:
    """A coordinator and hospitals in one folder (``root``), as the runbook sets them up."""

    def __init__(
        self,
        root: Path,
        *,
        rounds: int,
        min_nodes: int,
        enrolled: tuple[str, ...] = SITES,
        manifest_sites: tuple[str, ...] = (),
        run_config: dict[str, Any] | None = None,
        site_values: dict[str, Any] | None = None,
        public_host: str | None = None,
        prefixes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``manifest_sites``: hospitals whose data-path is a CSV manifest of DICOM files (two images per
        patient, no split column: the site splits it at patient level) instead of an ``.npz``.
        ``run_config``: more keys of the coordinator's ``[federation]`` table; ``site_values``: of every
        hospital's ``[site]`` table. ``public_host``: the coordinator's address for the hospitals (in its
        certificate, ``[server] address`` and every ``[connection] superlink``; default loopback).
        ``prefixes``: an argv prefix for the processes of ``"server"`` or of a site (e.g. ``ip netns
        exec NS``: :class:`fedshift.tests.netns_support.Network`)."""
        self.root = root
        self.manifest_sites = manifest_sites
        self.port = free_port()
        self.public_host = public_host
        self.prefixes = {name: tuple(prefix) for name, prefix in (prefixes or {}).items()}
        self.daemons: list[Child] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        made = fedshift(
            "certs",
            "--out",
            "certs",
            "--hosts",
            public_host or "localhost",
            "--sites",
            ",".join((*SITES, "intruder")),
            cwd=root,
        )
        assert made.returncode == 0, made.stderr
        hospitals = {site: f"certs/nodes/{site}.pub" for site in enrolled}
        federation = {
            **TINY_FEDERATION,
            "num-server-rounds": rounds,
            "min-nodes": min_nodes,
            **(run_config or {}),
        }
        server = {
            "address": f"{public_host or '127.0.0.1'}:{self.port}",
            "state-dir": "coordinator",
            "ca-cert": "certs/ca.crt",
            "server-cert": "certs/server.crt",
            "server-key": "certs/server.key",
            "poll-seconds": 2.0,
        }
        (root / "federation.toml").write_text(
            toml({"server": server, "hospitals": hospitals, "federation": federation})
        )
        for k, site in enumerate((*SITES, "intruder")):
            write_site_data(root / "data" / f"{site}.npz", seed=k)
            if site in manifest_sites:
                pooled = load_npz(root / "data" / f"{site}.npz")
                export_manifest(pooled, root / "data" / site, images_per_patient=2, with_split=False)
            self.write_site_config(site, key=site, **(site_values or {}))

    @property
    def superlink(self) -> str:
        """The coordinator's public ``host:port``, as the hospitals reach it."""
        return f"{self.public_host or 'localhost'}:{self.port}"

    def write_site_config(
        self, site: str, *, key: str, superlink: str | None = None, **site_values: Any
    ) -> Path:
        """``site.toml`` for ``site`` (with ``key``'s private key); ``superlink``: another address than
        :attr:`superlink` (a relay's)."""
        connection = {
            "superlink": superlink or self.superlink,
            "ca-cert": "certs/ca.crt",
            "private-key": f"certs/nodes/{key}.key",
            "runtime-port": free_port(),
            # an intruder gives up soon; an enrolled site may connect before the coordinator enrolled it
            "enrollment-timeout": 20.0 if key == "intruder" else 300.0,
        }
        values = {
            "site-name": site,
            "data-path": f"data/{site}/manifest.csv" if site in self.manifest_sites else f"data/{site}.npz",
            "state-dir": f"sites/{site}",
            "device": "cpu",
            "dp-epsilon": 50.0,
            **site_values,
        }
        path = self.root / f"{site}.toml"
        path.write_text(toml({"connection": connection, "site": values}))
        return path

    # -- processes

    def start(self, name: str, *args: str, prefix: Sequence[str] = ()) -> Child:
        argv = [*prefix, *FEDSHIFT, *args]
        child = Child(name, argv, self.root / "test-logs" / f"{name}.log", env=self.env, cwd=self.root)
        self.daemons.append(child)
        return child

    def start_server(self) -> Child:
        name = f"server-{len(self.daemons)}"
        return self.start(
            name, "server", "--config", "federation.toml", prefix=self.prefixes.get("server", ())
        )

    def start_client(self, site: str, *extra: str) -> Child:
        args = ("client", "--config", f"{site}.toml", *extra)
        return self.start(f"client-{site}", *args, prefix=self.prefixes.get(site, ()))

    def stop_all(self) -> None:
        for child in reversed(self.daemons):
            child.stop(timeout=20)

    # -- what the daemons left on disk

    @property
    def run_dir(self) -> Path:
        return self.root / "coordinator" / "run"

    def state_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def egress(self, site: str) -> list[dict[str, Any]]:
        path = self.state_dir(site) / "egress-log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def ledger(self, site: str) -> list[dict[str, Any]]:
        path = self.state_dir(site) / "privacy-ledger.json"
        return list(json.loads(path.read_text())["entries"]) if path.exists() else []

    def results(self) -> dict[str, Any]:
        return dict(json.loads((self.run_dir / "results.json").read_text()))

    def client_log(self, site: str) -> str:
        """The site daemon's log file (its own lines and the SuperNode's)."""
        path = self.state_dir(site) / "logs" / "fedshift-client.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self, name: str) -> str:
        path = self.root / "test-logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def wait_for(what: str, condition: Callable[[], bool], timeout: float, *watch: Child) -> float:
    """Seconds until ``condition()`` holds; fails on timeout or when a watched daemon exits."""
    start = time.monotonic()
    while not condition():
        for child in watch:
            code = child.poll()
            assert code is None, (
                f"{child.name} exited with {code} while waiting for {what}; see {child.log_path}"
            )
        assert time.monotonic() - start < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(1.0)
    return time.monotonic() - start


def kill_tree(child: Child) -> None:
    """SIGKILL a daemon and everything below it at once: a crash, not a clean stop."""
    tree = [child.pid, *descendants(child.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.proc.wait(timeout=10)


def flower_processes_under(root: Path) -> list[str]:
    """Flower/fedshift processes whose command line or working directory mentions ``root``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if (str(root) in cmd or cwd.startswith(str(root))) and (
            "flwr" in cmd or "flower" in cmd or "fedshift" in cmd
        ):
            found.append(f"{proc.name}: {cmd[:120]}")
    return found
