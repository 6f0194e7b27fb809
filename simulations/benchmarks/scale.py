"""Many sites: seconds per round and memory against the number of sites, deployed and simulated.

    python -m fedshift.simulations.benchmarks.scale [--supernodes 5,10,20] [--rounds 5]
        [--sim-sites 10,50,100] [--sim-rounds 3] [--out scale.json]

**Deployment** (``--supernodes``): for each N, a real federation on loopback, as the runbook sets it
up: ``fedshift certs``, one ``fedshift server`` (SuperLink, TLS, node authentication, the public
port's proxy, the ServerApp) and N ``fedshift client`` daemons (each a SuperNode and its warm site
runner), on the tiny federation of the deployment tests (32 px, 60 training images per site, DP-SGD).
**Simulation** (``--sim-sites``): for each N, the Ray simulation that ``fedshift simulate`` runs
(:func:`fedshift.simulations.experiment.federate`), with small SYNTHETIC sites and DP-SGD.

Per run it measures the seconds between consecutive rounds' checkpoints (a round = training plus its
validation; the first round is timed from the run's start and also holds the start-up), and memory
sampled every ``--sample-seconds`` from ``/proc``: RSS and PSS (shared pages split between the
processes that share them, so sums do not count torch's libraries twice) of the coordinator's
process tree (``fedshift server`` and everything below it), of each hospital's tree, and of the
simulation's (this process and Ray's). Every process a run starts carries a marker in its
environment; after the run the processes still holding it are counted (``leftover``: must be 0) and
killed. The JSON also fits seconds per round and memory against N (``fit``: the slope per site and
how much the per-site cost grows from the smallest to the largest N).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError, FedshiftError

logger = logging.getLogger(__name__)

TAG = "FEDSHIFT_SCALE_RUN"  # environment marker of every process a run starts
SITE_PREFIX = "site-"
SERVER_TIMEOUT = 3600.0  # seconds a deployed federation may take before the run is stopped
MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SWEEP_SIZES = (10, 50, 100, 200, 400)  # sites of the link-state sweep's measurement
MEMORY_MARGIN = 1.08  # on the predicted memory of a larger federation (20 sites: 1.05 x the 10-site one)


# ------------------------------------------------------------------ processes and memory, from /proc


def _read_kib(path: str, keys: Sequence[str]) -> dict[str, int]:
    """``{key: value in KiB}`` of ``key:  N kB`` lines (``/proc/<pid>/status``, ``smaps_rollup``)."""
    found: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    found[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return found


KINDS = (  # a process's kind in the memory breakdown: the first of these its command line holds
    "site_runner",
    "flwr-serverapp",
    "flwr-clientapp",
    "flower-superexec",
    "flower-superlink",
    "flower-supernode",
    "nginx",
    "raylet",
    "gcs_server",
    "ray::",
    "fedshift server",
    "fedshift.deploy.daemon",  # what fedshift client becomes after its check (exec: same pid)
    "fedshift client",
)


ALIASES = {"fedshift.deploy.superlink": "flower-superlink"}  # Flower's SuperLink, as fedshift server runs it


def kind_of(pid: int) -> str:
    command = command_of(pid)
    alias = next((kind for marker, kind in ALIASES.items() if marker in command), None)
    return alias or next((k for k in KINDS if k in command), "other")


def memory_of(pids: Iterable[int]) -> tuple[int, int, dict[str, int]]:
    """Summed RSS and PSS (bytes) of ``pids``, and PSS per process kind; a process that is gone counts 0."""
    rss = pss = 0
    kinds: dict[str, int] = {}
    for pid in pids:
        status = _read_kib(f"/proc/{pid}/status", ("VmRSS",))
        rollup = _read_kib(f"/proc/{pid}/smaps_rollup", ("Pss",))
        own = rollup.get("Pss", status.get("VmRSS", 0)) * 1024  # no smaps_rollup: RSS is the bound
        rss += status.get("VmRSS", 0) * 1024
        pss += own
        if own:
            kind = kind_of(pid)
            kinds[kind] = kinds.get(kind, 0) + own
    return rss, pss, kinds


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` so far, in clock ticks; ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None


def tagged_processes(tag: str) -> list[int]:
    """Live processes (but this one) whose environment holds ``TAG=tag``."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            from fedshift.common.proctree import alive

            if alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def reap_tagged(tag: str, wait: float = 10.0) -> list[str]:
    """The processes still carrying ``tag`` after ``wait`` s (their command lines); then killed."""
    deadline = time.monotonic() + wait
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = tagged_processes(tag)
    commands = [f"{pid}: {command_of(pid)}" for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if commands:
        logger.error("Left behind (now killed): %s", commands)
    return commands


@dataclass
class Peak:
    rss: int = 0
    pss: int = 0
    samples: list[float] = field(default_factory=list)  # PSS in MiB, one per sample
    kinds: dict[str, int] = field(default_factory=dict)  # peak PSS per process kind
    cpu: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # pid -> kind, first, last ticks

    def add(self, rss: int, pss: int, kinds: dict[str, int]) -> None:
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.samples.append(pss / MIB)
        for kind, value in kinds.items():
            self.kinds[kind] = max(self.kinds.get(kind, 0), value)

    def add_cpu(self, pids: Iterable[int]) -> None:
        """Note the CPU ticks of ``pids``; a process seen for the first time counts from then (a
        process started before the run, this one in a simulation, counts only the run's)."""
        for pid in pids:
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            kind, first, last = self.cpu.get(pid, (kind_of(pid), ticks, ticks))
            self.cpu[pid] = (kind, first, max(last, ticks))

    def cpu_s(self, kind: str | None = None) -> float:
        """CPU seconds (user + system) of every process seen (of ``kind``), between its samples."""
        ticks = sum(last - first for k, first, last in self.cpu.values() if kind in (None, k))
        return ticks / CLOCK_TICKS

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_mib": self.rss / MIB,
            "peak_pss_mib": self.pss / MIB,
            "mean_pss_mib": statistics.fmean(self.samples) if self.samples else 0.0,
            "peak_pss_mib_by_process": {k: v / MIB for k, v in sorted(self.kinds.items())},
            "cpu_s": self.cpu_s(),
            "cpu_s_by_process": {
                kind: self.cpu_s(kind) for kind in sorted({k for k, *_ in self.cpu.values()})
            },
        }


class Sampler:
    """A thread that samples the memory of named groups of processes every ``interval`` s."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]], interval: float) -> None:
        self.groups, self.interval = groups, interval
        self.peaks: dict[str, Peak] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for name, pids in self.groups().items():
            peak = self.peaks.setdefault(name, Peak())
            peak.add(*memory_of(pids))
            peak.add_cpu(pids)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class RoundClock:
    """A thread noting when each round's checkpoint appears (its manifest's ``round``)."""

    def __init__(self, checkpoint_dir: Path, interval: float = 0.25) -> None:
        self.manifest = checkpoint_dir / "checkpoint.json"
        self.interval = interval
        self.started = time.monotonic()
        self.times: dict[int, float] = {}  # round -> seconds since started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-rounds", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = int(json.loads(self.manifest.read_text())["round"])
            except (OSError, ValueError, KeyError, TypeError):
                done = 0
            if done and done not in self.times:
                self.times[done] = time.monotonic() - self.started
            self._stop.wait(self.interval)

    def __enter__(self) -> RoundClock:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Rounds seen, the first round's seconds (with start-up), the later rounds' seconds each."""
        rounds = sorted(self.times)
        gaps = [self.times[b] - self.times[a] for a, b in itertools.pairwise(rounds)]
        return {
            "rounds_seen": len(rounds),
            "first_round_s": self.times[rounds[0]] if rounds else None,
            "round_s": gaps,
            "s_per_round": statistics.median(gaps) if gaps else None,
        }


# ------------------------------------------------------------------ deployment: N real SuperNodes


def site_names(n: int) -> list[str]:
    return [f"{SITE_PREFIX}{k:03d}" for k in range(n)]


def write_deployment(root: Path, n: int, rounds: int) -> tuple[list[str], dict[str, str]]:
    """Certificates, ``federation.toml`` and one ``<site>.toml`` (and its data) per hospital in ``root``,
    as :class:`fedshift.tests.deploy_support.Federation` writes them; the sites and the environment."""
    from fedshift.tests.deploy_support import TINY_FEDERATION, fedshift, free_port, toml, write_site_data

    root.mkdir(parents=True, exist_ok=True)
    sites = site_names(n)
    made = fedshift("certs", "--out", "certs", "--hosts", "localhost", "--sites", ",".join(sites), cwd=root)
    if made.returncode != 0:
        raise RuntimeError(f"fedshift certs failed: {made.stderr.strip()}")
    port = free_port()
    server = {
        "address": f"127.0.0.1:{port}",
        "state-dir": "coordinator",
        "ca-cert": "certs/ca.crt",
        "server-cert": "certs/server.crt",
        "server-key": "certs/server.key",
        "poll-seconds": 2.0,
    }
    federation = {**TINY_FEDERATION, "num-server-rounds": rounds, "min-nodes": n}
    hospitals = {site: f"certs/nodes/{site}.pub" for site in sites}
    (root / "federation.toml").write_text(
        toml({"server": server, "hospitals": hospitals, "federation": federation})
    )
    for k, site in enumerate(sites):
        write_site_data(root / "data" / f"{site}.npz", seed=k)
        connection = {
            "superlink": f"localhost:{port}",
            "ca-cert": "certs/ca.crt",
            "private-key": f"certs/nodes/{site}.key",
            "runtime-port": free_port(),
            "enrollment-timeout": 600.0,
        }
        values = {
            "site-name": site,
            "data-path": f"data/{site}.npz",
            "state-dir": f"sites/{site}",
            "device": "cpu",
            "dp-epsilon": 50.0,
        }
        (root / f"{site}.toml").write_text(toml({"connection": connection, "site": values}))
    # one torch thread per process: N hospitals share this machine's cores (each would have its own).
    # FEDSHIFT_NUM_THREADS is what counts: configure_threads() sets torch's count over OMP_NUM_THREADS,
    # and 20 sites x 2 spinning OpenMP threads on 2 cores made every round over twice as slow.
    env = {**os.environ, "FEDSHIFT_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return sites, env


COORDINATOR_PHASES = {  # the coordinator's log line that ends each phase of its start
    "superlink_up_s": "SuperLink up at",
    "enrolled_s": "Public port",  # enrollment (one flwr command per site) ends as the public port opens
    "submitted_s": "Submitted the federation",
}


def coordinator_phases(log: Path, started: float) -> dict[str, float | None]:
    """Seconds from ``started`` (a ``time.time()``) to each of :data:`COORDINATOR_PHASES`, read from the
    coordinator's log (``HH:MM:SS`` stamps, this day, UTC or local as the log writes them)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    day = time.localtime(started)
    found: dict[str, float | None] = {}
    for key, words in COORDINATOR_PHASES.items():
        line = next((ln for ln in text.splitlines() if words in ln), "")
        try:
            stamp = time.strptime(line[:8], "%H:%M:%S")
        except ValueError:
            found[key] = None
            continue
        at = time.mktime((*day[:3], stamp.tm_hour, stamp.tm_min, stamp.tm_sec, 0, 0, -1))
        found[key] = at - started
    return found


def run_deployment(root: Path, n: int, rounds: int, sample_seconds: float) -> dict[str, Any]:
    """One deployed federation of ``n`` hospitals and ``rounds`` rounds; its measurements."""
    from fedshift.common.proctree import descendants
    from fedshift.deploy.processes import Child
    from fedshift.tests.deploy_support import FEDSHIFT

    tag = uuid.uuid4().hex
    sites, env = write_deployment(root, n, rounds)
    env[TAG] = tag
    children: list[Child] = []

    def start(name: str, *args: str) -> Child:
        child = Child(name, [*FEDSHIFT, *args], root / "logs" / f"{name}.log", env=env, cwd=root)
        children.append(child)
        return child

    def groups() -> dict[str, list[int]]:
        return {child.name: [child.pid, *descendants(child.pid)] for child in children}

    started, wall = time.monotonic(), time.time()
    code: int | None = None
    clock = RoundClock(root / "coordinator" / "run" / "checkpoint")
    try:
        with Sampler(groups, sample_seconds) as sampler, clock:
            server = start("coordinator", "server", "--config", "federation.toml")
            for site in sites:
                start(site, "client", "--config", f"{site}.toml")
            while (code := server.poll()) is None:
                if time.monotonic() - started > SERVER_TIMEOUT:
                    raise TimeoutError(f"the federation of {n} sites took over {SERVER_TIMEOUT:.0f} s")
                time.sleep(1.0)
    finally:  # all at once: one by one, 21 trees that each may take 20 s to stop would take minutes
        with ThreadPoolExecutor(max_workers=max(1, len(children))) as pool:
            list(pool.map(lambda child: child.stop(timeout=20), children))
    seconds = time.monotonic() - started
    leftover = reap_tagged(tag)
    results_path = root / "coordinator" / "run" / "results.json"
    if code != 0 or not results_path.is_file():
        raise RuntimeError(f"the coordinator exited with {code}; see {root / 'logs' / 'coordinator.log'}")
    history = json.loads(results_path.read_text())["history"]
    coordinator = sampler.peaks["coordinator"].to_dict()
    per_site = [sampler.peaks[s].to_dict() for s in sites]
    return {
        "sites": n,
        "rounds": rounds,
        "rounds_completed": len(history["train"]),
        "sites_per_round": [len(history["train"][r]) for r in sorted(history["train"], key=int)],
        **clock.summary(),
        "seconds": seconds,
        "coordinator_start": coordinator_phases(root / "logs" / "coordinator.log", wall),
        "coordinator": coordinator,
        "site_peak_pss_mib": statistics.fmean(s["peak_pss_mib"] for s in per_site),
        "site_peak_rss_mib": statistics.fmean(s["peak_rss_mib"] for s in per_site),
        "site_peak_pss_mib_by_process": {
            kind: statistics.fmean(s["peak_pss_mib_by_process"].get(kind, 0.0) for s in per_site)
            for kind in sorted({k for s in per_site for k in s["peak_pss_mib_by_process"]})
        },
        "all_sites_peak_pss_mib": sum(s["peak_pss_mib"] for s in per_site),
        "site_cpu_s": statistics.fmean(s["cpu_s"] for s in per_site),  # whole run, start-up included
        "leftover": len(leftover),
        "leftover_processes": leftover,
    }


def available_mib() -> float:
    """``MemAvailable`` of this machine, MiB."""
    return _read_kib("/proc/meminfo", ("MemAvailable",)).get("MemAvailable", 0) / 1024


def memory_shortfall(done: Sequence[dict[str, Any]], n: int) -> dict[str, Any] | None:
    """Why a federation of ``n`` hospitals would not fit in this machine's free memory, or ``None``.

    Predicted from the largest run so far: its coordinator's peak PSS plus ``n`` times its sites' mean
    peak PSS (PSS sums count shared pages once), with ``MEMORY_MARGIN`` on top; the first run is
    not predicted.
    """
    if not done:
        return None
    last = max(done, key=lambda r: r["sites"])
    needed = MEMORY_MARGIN * (last["coordinator"]["peak_pss_mib"] + n * last["site_peak_pss_mib"])
    free = available_mib()
    if needed <= free:
        return None
    return {
        "sites": n,
        "needed_mib": needed,
        "available_mib": free,
        "reason": (
            f"needs about {needed / 1024:.1f} GiB ({MEMORY_MARGIN:g} x (coordinator "
            f"{last['coordinator']['peak_pss_mib']:.0f} MiB + {n} x {last['site_peak_pss_mib']:.0f} MiB "
            f"per site, measured at {last['sites']} sites)), {free / 1024:.1f} GiB available"
        ),
    }


# ------------------------------------------------------------------ simulation: N virtual sites in Ray


@dataclass
class Meter:
    """Calls of one function and the CPU seconds of the thread that made them, while installed."""

    calls: int = 0
    cpu_s: float = 0.0

    @contextlib.contextmanager
    def installed(self, owner: Any, name: str) -> Iterator[Meter]:
        original = getattr(owner, name)

        def metered(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - start
                self.calls += 1

        setattr(owner, name, metered)
        try:
            yield self
        finally:
            setattr(owner, name, original)

    def to_dict(self, rounds: int) -> dict[str, float]:
        return {
            "calls": self.calls,
            "cpu_s": self.cpu_s,
            "cpu_s_per_round": self.cpu_s / max(1, rounds),
            "us_per_call": 1e6 * self.cpu_s / max(1, self.calls),
        }


@contextlib.contextmanager
def sweep_meters() -> Iterator[dict[str, Meter]]:
    """Meters on the simulation's sweep for every node's next message: Flower's own (one
    ``InMemoryLinkState.get_message_ins`` per node, each scanning every stored message) and fedshift's
    (:func:`fedshift.simulations.engine.next_messages`, one pass), whichever the engine uses."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    from fedshift.simulations import engine

    meters = {"flower_get_message_ins": Meter(), "fedshift_next_messages": Meter()}
    with (
        meters["flower_get_message_ins"].installed(InMemoryLinkState, "get_message_ins"),
        meters["fedshift_next_messages"].installed(engine, "next_messages"),
    ):
        yield meters


def link_state_with_messages(n: int, per_node: int = 1) -> tuple[Any, list[int]]:
    """Flower's in-memory link state as its simulation sets it up, with ``n`` nodes and ``per_node``
    messages for each pushed through the ServerApp's grid; the state and the node ids."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedshift.common.protocol import CONFIG_KEY, SERVER_ROUND_KEY

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state: Any = factory.state()  # an InMemoryLinkState
    state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation registers it
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = list(_register_nodes(n, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    for k in range(per_node):
        # any content: the sweep only looks at whom a message is for
        content = [RecordDict({CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: k})}) for _ in nodes]
        messages = [
            Message(c, dst_node_id=node, message_type="train") for c, node in zip(content, nodes, strict=True)
        ]
        grid.push_messages(messages)
    return state, nodes


def sweep_cost(sizes: Sequence[int], sweeps: int = 5) -> list[dict[str, float]]:
    """CPU milliseconds of one sweep for every node's next message, Flower's (``get_message_ins`` per
    node) and fedshift's (:func:`fedshift.simulations.engine.next_messages`), N messages stored."""
    from fedshift.simulations.engine import SWEEP_PERIOD, next_messages

    rows = []
    for n in sizes:
        state, nodes = link_state_with_messages(n)
        start = time.thread_time()
        for _ in range(sweeps):
            for node in nodes:
                state.get_message_ins(node_id=node, limit=1)
        flower = (time.thread_time() - start) / sweeps
        state, nodes = link_state_with_messages(n)
        wanted = set(nodes)
        start = time.thread_time()
        for _ in range(sweeps):
            next_messages(state, wanted)
        linear = (time.thread_time() - start) / sweeps
        rows.append(
            {
                "sites": n,
                "flower_ms": 1e3 * flower,
                "fedshift_ms": 1e3 * linear,
                "flower_core_fraction": flower / SWEEP_PERIOD,  # of one core, all the run long
            }
        )
    return rows


def run_simulation(root: Path, n: int, rounds: int, sample_seconds: float) -> dict[str, Any]:
    """One Ray simulation of ``n`` small SYNTHETIC sites (about 60 images each); its measurements."""
    from fedshift.common.config import FederationConfig, PrivacyConfig, TrainConfig
    from fedshift.common.model import ModelConfig
    from fedshift.common.proctree import descendants
    from fedshift.simulations.experiment import ExperimentSpec, build_sites, federate

    fed = FederationConfig(
        num_rounds=rounds,
        min_nodes=n,
        model=ModelConfig(image_size=32),
        train=TrainConfig(local_epochs=1, batch_size=30),
        privacy=PrivacyConfig(enabled=True, epsilon=50.0, delta=1e-5),
    )
    sites, _ = build_sites(ExperimentSpec(out_dir=root, sites=n, synthetic_n=100 * n, federation=fed))
    tag = uuid.uuid4().hex
    previous = os.environ.get(TAG)
    os.environ[TAG] = tag  # Ray's processes inherit it
    me = os.getpid()
    started, cpu = time.monotonic(), time.process_time()
    clock = RoundClock(root / "server" / "checkpoint")
    try:
        with (
            Sampler(lambda: {"simulation": [me, *descendants(me)]}, sample_seconds) as sampler,
            clock,
            sweep_meters() as sweep,
        ):
            results, _ = federate(fed, sites, root, every_site=True)
        driver_cpu = time.process_time() - cpu
    finally:
        if previous is None:
            os.environ.pop(TAG, None)
        else:
            os.environ[TAG] = previous
    seconds = time.monotonic() - started
    leftover = reap_tagged(tag)
    history = results["history"]
    logger.info(
        "Simulation of %d sites: %.0f s, %s s per round, driver CPU %.1f s, of it %.1f s in "
        "sweeps for the nodes' messages (%d calls)",
        n,
        seconds,
        _fmt(clock.summary()["s_per_round"]),
        driver_cpu,
        sum(m.cpu_s for m in sweep.values()),
        sum(m.calls for m in sweep.values()),
    )
    return {
        "sites": n,
        "rounds": rounds,
        "rounds_completed": len(history["train"]),
        "sites_per_round": [len(history["train"][r]) for r in sorted(history["train"], key=int)],
        "train_images_per_site": statistics.fmean(len(s.data.splits["train"]) for s in sites),
        **clock.summary(),
        "seconds": seconds,
        "memory": sampler.peaks["simulation"].to_dict(),
        # this process: the ServerApp and Flower's engine threads (the sites train in Ray's workers)
        "driver_cpu_s": driver_cpu,
        "message_sweep": {name: meter.to_dict(rounds) for name, meter in sweep.items()},
        "leftover": len(leftover),
        "leftover_processes": leftover,
    }


# ------------------------------------------------------------------ growth against N


def fit(rows: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]) -> dict[str, Any]:
    """Least squares ``value = a + b * N`` over the rows, and how the cost of one more site grows.

    ``marginal_growth`` is the slope between the two largest N over the slope between the two smallest
    (three sizes or more): about 1 when the cost is linear in N, (N3 - N1) / (N2 - N0)-ish above 1 when
    it is quadratic (2.5 for N = 10, 50, 100), meaningless when the slopes are about 0 (a flat cost).
    """
    points = sorted((float(r["sites"]), v) for r in rows if (v := value(r)) is not None)
    if len({x for x, _ in points}) < 2:
        return {"points": points}
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in itertools.pairwise(points) if x1 > x0]
    growth = slopes[-1] / slopes[0] if len(slopes) >= 2 and slopes[0] > 0 else None
    return {
        "points": points,
        "intercept": my - b * mx,
        "per_site": b,
        "marginal_per_site": slopes,
        "marginal_growth": growth,
    }


def fits(
    rows: Sequence[dict[str, Any]],
    memory: Callable[[dict[str, Any]], float],
    cpu: Callable[[dict[str, Any]], float],
) -> dict[str, Any]:
    """Seconds per round, peak memory and CPU seconds of the run against N."""
    return {
        "s_per_round": fit(rows, lambda r: r["s_per_round"]),
        "peak_pss_mib": fit(rows, memory),
        "cpu_s": fit(rows, cpu),
    }


# ------------------------------------------------------------------ the command


def _sizes(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if text.strip() in ("", "0"):
        return ()
    if not values or min(values) < 1:
        raise ConfigError(
            f"Expected {option} to be comma-separated site counts >= 1 (or 0 to skip), but got {text!r}; "
            "pass e.g. 5,10,20"
        )
    return tuple(sorted(set(values)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedshift.simulations.benchmarks.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--supernodes", default="5,10,20", help="deployed federations' sizes (0: none)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each deployed federation")
    parser.add_argument("--sim-sites", default="10,50,100", help="simulated federations' sizes (0: none)")
    parser.add_argument("--sim-rounds", type=int, default=3, help="rounds of each simulated federation")
    parser.add_argument("--sample-seconds", type=float, default=1.0, help="memory sampling period")
    parser.add_argument("--work", type=Path, default=Path("scale-runs"), help="folder for the runs")
    parser.add_argument("--out", type=Path, default=Path("scale.json"))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _check(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    supernodes, sim_sites = _sizes(args.supernodes, "--supernodes"), _sizes(args.sim_sites, "--sim-sites")
    for name in ("rounds", "sim_rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(
                f"Expected --{name.replace('_', '-')} to be a whole number >= 1, "
                f"but got {getattr(args, name)}"
            )
    if args.sample_seconds <= 0:
        raise ConfigError(f"Expected --sample-seconds > 0, but got {args.sample_seconds}")
    if args.work.exists() and any(args.work.iterdir()):
        raise ConfigError(
            f"Expected --work to be a new or empty folder, but {args.work} holds files; pick another"
        )
    return supernodes, sim_sites


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'run':<11} {'N':>4} {'rounds':>6} {'s/round':>8} {'1st s':>7} {'coord/sim PSS MiB':>18} "
        f"{'site PSS MiB':>13} {'left':>5}"
    ]
    for row in report["deployment"]:
        lines.append(
            f"{'deployment':<11} {row['sites']:>4} {row['rounds_completed']:>6} "
            f"{_fmt(row['s_per_round']):>8} {_fmt(row['first_round_s']):>7} "
            f"{row['coordinator']['peak_pss_mib']:>18.0f} "
            f"{row['site_peak_pss_mib']:>13.0f} {row['leftover']:>5}"
        )
    for row in report["simulation"]:
        lines.append(
            f"{'simulation':<11} {row['sites']:>4} {row['rounds_completed']:>6} "
            f"{_fmt(row['s_per_round']):>8} {_fmt(row['first_round_s']):>7} "
            f"{row['memory']['peak_pss_mib']:>18.0f} {'-':>13} "
            f"{row['leftover']:>5}"
        )
    for row in report["deployment_skipped"]:
        lines.append(f"{'deployment':<11} {row['sites']:>4} skipped: {row['reason']}")
    for row in report["link_state_sweep"]:
        lines.append(
            f"one sweep for every site's next message, {row['sites']} sites: Flower {row['flower_ms']:.2f} "
            f"ms ({100 * row['flower_core_fraction']:.0f}% of a core), fedshift {row['fedshift_ms']:.2f} ms"
        )
    for kind, fitted in report["fit"].items():
        for what, f in fitted.items():
            if "per_site" in f:
                lines.append(
                    f"{kind} {what}: {f['intercept']:.2f} + {f['per_site']:.3f} * N; one more site costs "
                    f"x{_fmt(f['marginal_growth'], '.2f')} at the largest N of what it does at the "
                    "smallest (1 = linear)"
                )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedshift.client.training import configure_threads

    supernodes, sim_sites = _check(args)
    configure_threads()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deployment: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n in supernodes:
        too_big = memory_shortfall(deployment, n)
        if too_big is not None:
            logger.warning("Deployment: %d SuperNodes would not fit: %s", n, too_big["reason"])
            skipped.append(too_big)
            continue
        logger.info("Deployment: %d SuperNodes x %d rounds", n, args.rounds)
        deployment.append(run_deployment(args.work / f"deploy-{n}", n, args.rounds, args.sample_seconds))
    simulation = []
    sweep = sweep_cost(SWEEP_SIZES) if sim_sites else []
    for n in sim_sites:
        logger.info("Simulation: %d sites x %d rounds", n, args.sim_rounds)
        simulation.append(run_simulation(args.work / f"sim-{n}", n, args.sim_rounds, args.sample_seconds))
    report = {
        "deployment": deployment,
        "deployment_skipped": skipped,
        "simulation": simulation,
        "link_state_sweep": sweep,
        "fit": {
            # the coordinator's memory and CPU (the sites' own grow with N by construction)
            "deployment": fits(
                deployment,
                lambda r: r["coordinator"]["peak_pss_mib"],
                lambda r: r["coordinator"]["cpu_s"],
            ),
            # the whole simulation's: this process (ServerApp, Flower's engine) and Ray's workers
            "simulation": fits(
                simulation, lambda r: r["memory"]["peak_pss_mib"], lambda r: r["memory"]["cpu_s"]
            ),
        },
        "leftover": sum(r["leftover"] for r in (*deployment, *simulation)),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "seconds": time.time() - started,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"Time: {report['seconds']:.0f} s. JSON: {args.out}; runs in {args.work}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a mistake in the options ends in one line on stderr and exit code 2."""
    from fedshift.common.cli import setup_logging
    from fedshift.deploy.processes import StopRequested, stop_on_signals

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with stop_on_signals():  # SIGTERM too stops every process a run started (its finally)
            run(args)
    except FedshiftError as exc:
        print(f"scale: error: {exc}", file=sys.stderr)
        return 2
    except StopRequested as stop:
        logger.warning("Stopped by %s; every process the runs started was stopped", stop)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
