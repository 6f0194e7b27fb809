"""Run the fedshift apps on Flower's simulation engine (Ray), and leave nothing running."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from queue import Queue
from typing import Any

import torch
from flwr.clientapp.typing import Mod

from fedshift.client.app import make_client_app
from fedshift.common.config import FederationConfig
from fedshift.common.proctree import descendants, reap
from fedshift.server.app import make_server_app

logger = logging.getLogger(__name__)

RAY_EXIT_TIMEOUT = 20.0  # seconds Ray's processes get to exit after ray.shutdown()
SWEEP_PERIOD = 0.1  # seconds between two sweeps for the nodes' next messages (Flower's own period)


def next_messages(state: Any, nodes: set[int]) -> list[Any]:
    """Each node's next undelivered message in Flower's ``InMemoryLinkState``, marked delivered: one pass.

    What Flower's ``get_message_ins(node, limit=1)`` gives for every node in turn (the first stored
    undelivered message for that node, checked for expiry and federation first), but from one pass over
    the stored messages instead of one pass per node (O(N + M), not O(N * M)). A node whose first
    message fails the check gets its next one at the next sweep.
    """
    from flwr.supercore.date import now

    with state.lock:
        first: dict[int, str] = {}
        for msg_id, msg in state.message_ins_store.items():
            dst = msg.metadata.dst_node_id
            if dst in nodes and dst not in first and msg.metadata.delivered_at == "":
                first[dst] = msg_id
        if not first:
            return []
        state._check_stored_messages(set(first.values()))  # drops expired or out-of-federation ones
        found = [m for i in first.values() if (m := state.message_ins_store.get(i)) is not None]
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
    return found


def _sweep_into_queue(
    state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` with :func:`next_messages` as its sweep."""
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for msg in next_messages(state, nodes):
            queue.put(msg)
        f_stop.wait(SWEEP_PERIOD)


@contextlib.contextmanager
def linear_message_sweep() -> Iterator[None]:
    """Flower's simulation engine with a message sweep linear in the number of sites, while it lasts.

    Flower 1.41's engine asks its in-memory link state for every node's next message every 0.1 s, and
    each ask scans every stored message: O(N^2) per sweep, 22 ms at 100 sites (a fifth of a core for
    the whole run, under the state's lock), 0.35 s at 400 (longer than its period). This swaps in
    :func:`_sweep_into_queue` when the engine and link state are the ones it was written for, and
    leaves Flower's own otherwise.
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = vce_api.add_messages_to_queue
    usable = all(
        hasattr(InMemoryLinkState, name) for name in ("_check_stored_messages", "get_message_ins")
    ) and callable(original)

    def sweep(state: Any, queue: Queue[Any], nodes: Mapping[int, int], f_stop: threading.Event) -> None:
        if isinstance(state, InMemoryLinkState) and hasattr(state, "message_ins_store"):
            _sweep_into_queue(state, queue, nodes, f_stop)
        else:
            original(state, queue, dict(nodes), f_stop)

    if usable:
        vce_api.add_messages_to_queue = sweep  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def backend_config(num_sites: int) -> dict[str, dict[str, int | float | bool | str]]:
    """Ray resources: on a CPU machine sites take turns with all cores; on a GPU they share it."""
    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    client: dict[str, int | float | bool | str] = {"num_cpus": cpus, "num_gpus": 0.0}
    if gpus:
        client = {"num_cpus": max(1, cpus // min(num_sites, 4)), "num_gpus": 1.0 / min(num_sites, 4)}
    return {
        "client_resources": client,
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": False,
        },
    }


def run_flower_simulation(cfg: FederationConfig, num_sites: int, client_mods: Sequence[Mod] = ()) -> None:
    """Run the ServerApp and ``num_sites`` virtual SuperNodes with ClientApps to completion.

    ``client_mods`` wrap every ClientApp (e.g. to inject faults in tests).
    """
    from flwr.simulation import run_simulation

    overrides = cfg.to_run_config()
    # Quiet Ray's and Flower's start-up chatter unless the user asked for debug logs.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    before = set(descendants(os.getpid()))
    if not logger.isEnabledFor(logging.DEBUG):
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), linear_message_sweep():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=make_server_app(overrides),
                client_app=make_client_app(overrides, client_mods),
                num_supernodes=num_sites,
                backend_config=backend_config(num_sites),  # type: ignore[arg-type]
            )
    finally:
        flwr_logger.setLevel(previous)
        import ray

        # Ray's raylet, GCS and worker processes: ray.shutdown() signals them but does not wait,
        # and a ClientAppActor can linger for seconds after it. Wait for each, kill stragglers.
        started = set(descendants(os.getpid())) - before
        if ray.is_initialized():
            ray.shutdown()
        started |= set(descendants(os.getpid())) - before  # a worker Ray started while shutting down
        reap(started, RAY_EXIT_TIMEOUT, "Ray")
