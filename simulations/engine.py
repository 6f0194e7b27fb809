"""Run the fedshift apps on Flower's simulation engine (Ray), and leave nothing running."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

import torch
from flwr.clientapp.typing import Mod

from fedshift.client.app import make_client_app
from fedshift.common.config import FederationConfig
from fedshift.common.proctree import descendants, reap
from fedshift.server.app import make_server_app

logger = logging.getLogger(__name__)

RAY_EXIT_TIMEOUT = 20.0  # seconds Ray's processes get to exit after ray.shutdown()


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
        with warnings.catch_warnings():
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
