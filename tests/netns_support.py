"""Linux network namespaces for the deployment tests: machines on a bridge, and real network faults.

:class:`Network` makes one namespace per machine (the coordinator, each hospital) and
a switch namespace holding a bridge; every machine has a veth pair to the bridge and
an address of the test range 10.231.0.0/24, which exists only inside these
namespaces (nothing of the host's network is touched). A process runs on a machine
through :meth:`Network.prefix` (``ip netns exec NS``).

Faults, with what the kernel offers (:func:`fault_mechanisms` says which):

- latency with jitter and packet loss: ``tc netem`` on both ends of a hospital's veth
  pair when the kernel has ``sch_netem``; without it, loss is dropped by nftables
  (``numgen random``) on the hospital's interface and latency is added by a
  user-space TCP relay per hospital in the coordinator's namespace, which holds every
  chunk for ``delay ± jitter`` in each direction, in order (TLS and gRPC pass unchanged);
- a partition: nftables drops every packet on the hospital's interface (``ip link set
  down`` without nftables), until :meth:`Network.heal`.

``python -m fedshift.tests.netns_support relay LISTEN TARGET DELAY_FILE`` runs one relay (its
delay and jitter in seconds, "0.1 0.02", reread from DELAY_FILE every 0.2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedshift.deploy.processes import Child

logger = logging.getLogger(__name__)

SUBNET = "10.231.0"  # the machines' addresses: 10.231.0.1 (coordinator), .11, .12, ... (hospitals)
_LOSS_TABLE = "fedshift_loss"
_PARTITION_TABLE = "fedshift_partition"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def netns_unavailable() -> str | None:
    """Why this process cannot make network namespaces, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"fedshift-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Mechanisms:
    """How this kernel makes each fault (``None``: it cannot)."""

    latency: str | None  # "netem" or "relay"
    loss: str | None  # "netem" or "nftables"
    partition: str | None  # "nftables" or "link-down"

    def describe(self) -> str:
        return f"latency by {self.latency}, loss by {self.loss}, partition by {self.partition}"


def fault_mechanisms() -> Mechanisms:
    """Probe, in a throwaway namespace, whether ``tc netem`` and nftables work here."""
    probe = f"fedshift-fault-probe-{os.getpid()}"
    _run("ip", "netns", "add", probe)
    try:
        _run("ip", "-n", probe, "link", "set", "lo", "up")
        inside = ("ip", "netns", "exec", probe)
        tc = (*inside, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
        netem = shutil.which("tc") is not None and _run(*tc, check=False).returncode == 0
        nft = (*inside, "nft", "add", "table", "inet", "probe")
        nftables = shutil.which("nft") is not None and _run(*nft, check=False).returncode == 0
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return Mechanisms(
        latency="netem" if netem else "relay",
        loss="netem" if netem else "nftables" if nftables else None,
        partition="nftables" if nftables else "link-down",
    )


@dataclass
class Machine:
    name: str
    namespace: str
    address: str
    device: str  # its end of the veth pair
    switch_device: str  # the bridge's end


@dataclass
class Network:
    """Namespaces on one bridge; :meth:`close` (also on ``with`` exit) deletes every one of them."""

    switch: str
    log_dir: Path  # the relays' logs
    machines: dict[str, Machine] = field(default_factory=dict)
    mechanisms: Mechanisms | None = None
    relays: dict[str, Child] = field(default_factory=dict)  # hospital -> its relay

    @classmethod
    @contextlib.contextmanager
    def create(cls, names: Sequence[str], log_dir: Path) -> Iterator[Network]:
        """``names[0]`` at 10.231.0.1, the others at .11, .12, ...; all deleted when the block ends."""
        pid = os.getpid()
        net = cls(switch=f"fedshift-sw-{pid}", log_dir=log_dir)
        try:
            _run("ip", "netns", "add", net.switch)
            _run("ip", "-n", net.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", net.switch, "link", "set", "br0", "up")
            for k, name in enumerate(names):
                address = f"{SUBNET}.{1 if k == 0 else 10 + k}"
                machine = Machine(name, f"fedshift-{name}-{pid}", address, f"fs{pid}h{k}", f"fs{pid}s{k}")
                net.machines[name] = machine
                ns, dev, sw = machine.namespace, machine.device, machine.switch_device
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", net.switch, "link", "add", sw, "type", "veth", "peer", "name", dev)
                _run("ip", "-n", net.switch, "link", "set", dev, "netns", ns)
                _run("ip", "-n", net.switch, "link", "set", sw, "master", "br0")
                _run("ip", "-n", net.switch, "link", "set", sw, "up")
                _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            yield net
        finally:
            net.close()

    def stop_relays(self) -> None:
        for relay in self.relays.values():
            relay.stop(timeout=5)
        self.relays.clear()

    def close(self) -> None:
        self.stop_relays()
        for machine in self.machines.values():  # deleting a namespace removes its end of the veth pair
            _run("ip", "netns", "del", machine.namespace, check=False)
        _run("ip", "netns", "del", self.switch, check=False)

    def prefix(self, name: str) -> tuple[str, ...]:
        """The argv prefix that runs a command on machine ``name``."""
        return ("ip", "netns", "exec", self.machines[name].namespace)

    def address(self, name: str) -> str:
        return self.machines[name].address

    def _nft(self, name: str, *rule: str) -> None:
        _run("ip", "netns", "exec", self.machines[name].namespace, "nft", *rule)

    def _nft_table(self, name: str, table: str, out_rule: str, in_rule: str) -> None:
        """A table in ``name``'s namespace applying ``out_rule`` / ``in_rule`` to its veth's packets."""
        dev = self.machines[name].device
        self._nft(name, "add", "table", "inet", table)
        hooks = (("out", "output", "oifname", out_rule), ("in", "input", "iifname", in_rule))
        for chain, hook, match, rule in hooks:
            self._nft(
                name, "add", "chain", "inet", table, chain, f"{{ type filter hook {hook} priority 0; }}"
            )
            self._nft(name, "add", "rule", "inet", table, chain, match, dev, *rule.split())

    def connect(self, name: str, target: str) -> str:
        """The ``host:port`` at which hospital ``name`` reaches the coordinator's public ``target``.

        ``target`` itself with netem; else a relay in the coordinator's namespace, which adds
        nothing until :meth:`degrade`."""
        self.mechanisms = self.mechanisms or fault_mechanisms()
        if self.mechanisms.latency == "netem":
            return target
        host, _, _ = target.rpartition(":")
        listen = f"{host}:{20000 + len(self.relays)}"
        settings = self.log_dir / f"relay-{name}.delay"
        _write_delay(settings, 0.0, 0.0)
        argv = [sys.executable, "-m", "fedshift.tests.netns_support", "relay", listen, target, str(settings)]
        log = self.log_dir / f"relay-{name}.log"
        log.unlink(missing_ok=True)
        self.relays[name] = Child(f"relay-{name}", [*self.prefix(next(iter(self.machines))), *argv], log)
        deadline = time.monotonic() + 30
        while "listening" not in log.read_text(errors="replace"):
            assert self.relays[name].poll() is None, f"the relay exited; see {log}"
            assert time.monotonic() < deadline, f"the relay did not start in 30 s; see {log}"
            time.sleep(0.2)
        return listen

    def degrade(self, name: str, *, delay_ms: int, jitter_ms: int, loss_percent: int) -> None:
        """Latency ± jitter and loss, each way, between hospital ``name`` and the coordinator (after
        :meth:`connect`)."""
        mechanisms = self.mechanisms = self.mechanisms or fault_mechanisms()
        machine = self.machines[name]
        if mechanisms.latency == "netem":
            netem = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_percent}%"]
            for ns, dev in ((machine.namespace, machine.device), (self.switch, machine.switch_device)):
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *netem)
            return
        _write_delay(self.log_dir / f"relay-{name}.delay", delay_ms / 1000, jitter_ms / 1000)
        if mechanisms.loss == "nftables":
            drop = f"numgen random mod 100 < {loss_percent} counter drop"
            self._nft_table(name, _LOSS_TABLE, drop, drop)

    def dropped(self, name: str, *, partition: bool = False) -> int | None:
        """Packets dropped so far at hospital ``name`` by its loss (or ``partition``) rule, both ways;
        ``None`` when that fault does not count them (a partition by link-down)."""
        assert self.mechanisms is not None
        machine = self.machines[name]
        if not partition and self.mechanisms.loss == "netem":
            total = 0
            for ns, dev in ((machine.namespace, machine.device), (self.switch, machine.switch_device)):
                shown = _run("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev).stdout
                total += sum(int(n) for n in re.findall(r"dropped (\d+)", shown))
            return total
        if partition and self.mechanisms.partition != "nftables":
            return None
        table = _PARTITION_TABLE if partition else _LOSS_TABLE
        listed = _run(
            "ip", "netns", "exec", machine.namespace, "nft", "list", "table", "inet", table, check=False
        )
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listed.stdout))

    def partition(self, name: str) -> None:
        """Cut hospital ``name`` off: every packet on its interface is dropped (or the link is down)."""
        mechanisms = self.mechanisms = self.mechanisms or fault_mechanisms()
        if mechanisms.partition == "nftables":
            self._nft_table(name, _PARTITION_TABLE, "counter drop", "counter drop")
        else:
            machine = self.machines[name]
            _run("ip", "-n", machine.namespace, "link", "set", machine.device, "down")

    def heal(self, name: str) -> None:
        """Undo :meth:`partition`."""
        assert self.mechanisms is not None
        if self.mechanisms.partition == "nftables":
            self._nft(name, "delete", "table", "inet", _PARTITION_TABLE)
        else:
            machine = self.machines[name]
            _run("ip", "-n", machine.namespace, "link", "set", machine.device, "up")


# -- the relay (a process of its own, in the coordinator's namespace)


def _write_delay(path: Path, delay: float, jitter: float) -> None:
    """Set a relay's delay and jitter (seconds): it rereads ``path`` every 0.2 s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(f"{delay} {jitter}\n")
    path.with_suffix(".tmp").replace(path)


class _Delay:
    """The relay's current delay and jitter, from its settings file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.delay, self.jitter = 0.0, 0.0
        self.read()

    def read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            delay, jitter = (float(v) for v in self.path.read_text().split())
            if (delay, jitter) != (self.delay, self.jitter):
                logger.info("delay now %g ± %g s", delay, jitter)
            self.delay, self.jitter = delay, jitter

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.read()

    def draw(self) -> float:
        return self.delay + random.uniform(-self.jitter, self.jitter)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: _Delay) -> None:
    """Forward ``reader`` to ``writer``, each chunk held for one draw of ``delay``, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    last = 0.0
    try:
        while True:
            chunk = await reader.read(65536)
            last = max(last, loop.time() + delay.draw())  # a TCP stream: never reordered
            queue.put_nowait((last, chunk))
            if not chunk:
                break
        await sender
    finally:
        sender.cancel()


async def _relay(listen: str, target: str, settings: Path) -> None:
    to_host, _, to_port = target.rpartition(":")
    delay = _Delay(settings)

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            client_w.close()
            return
        with contextlib.suppress(OSError):
            await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay))
        for w in (server_w, client_w):
            w.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(connection, host, int(port))
    logger.info("listening on %s, forwarding to %s (delay from %s)", listen, target, settings)
    follow = asyncio.create_task(delay.follow())
    async with server:
        await server.serve_forever()
    follow.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "relay":
        sys.exit("usage: python -m fedshift.tests.netns_support relay LISTEN TARGET DELAY_FILE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(_relay(sys.argv[2], sys.argv[3], Path(sys.argv[4])))
