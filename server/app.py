"""The fedshift ServerApp: FedAvg over adapters, then a final per-site test evaluation.

``app`` is what Flower's tooling loads (``pyproject.toml``: ``[tool.flwr.app.components]``);
``make_server_app(overrides)`` builds the same app with run-config values fixed in
code, which ``fedshift simulate`` uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedshift.common.checkpoint import Checkpoint, load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import CheckpointError
from fedshift.common.io import atomic_write_json
from fedshift.common.model import build_model, size_report
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedshift.server.consolidation import anchor_records, consolidate, initial_arrays
from fedshift.server.enrollment import SiteNames, wait_for_enrolled
from fedshift.server.statistics import initial_statistics, statistics_strategy, statistics_summary
from fedshift.server.strategy import AdapterFedAvg, RunHistory
from fedshift.server.validation import expected_specs, reply_problem

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def final_evaluation(
    grid: Grid, arrays: ArrayRecord, strategy: AdapterFedAvg, split: str, timeout: float
) -> dict[str, dict[str, float]]:
    """Ask every connected site to evaluate ``arrays`` on its ``split``; metrics per site.

    Replies are screened like a round's (:meth:`AdapterFedAvg._accept`'s checks:
    enrolled sender, a usable weight, finite numbers as metrics), but not
    recorded in the round history. Nothing is averaged, so each site's own keys stay.
    """
    config = ConfigRecord({"split": split, "server-round": strategy.num_rounds})
    messages = [
        Message(
            RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]
    checked: list[tuple[str, Message]] = []
    for msg in grid.send_and_receive(messages, timeout=timeout):
        name, problem = strategy.names.resolve(msg)
        if problem is None:
            problem = reply_problem(
                msg, strategy.expected, with_arrays=False, max_weight=strategy.max_num_examples
            )
        if problem:
            logger.warning("Final %s evaluation: no result from %s: %s", split, name, problem)
            continue
        checked.append((name, msg))
    out: dict[str, dict[str, float]] = {}
    for name, msg in checked:
        record = msg.content.metric_records[METRICS_KEY]
        out[name] = {k: float(v) for k, v in record.items() if not isinstance(v, list)}
    return out


def load_resume_point(cfg: FederationConfig, shared: Mapping[str, Any]) -> Checkpoint:
    """The checkpoint named by ``resume-from``, checked against this run's model and rounds."""
    checkpoint = load_checkpoint(cfg.resume_from)
    if checkpoint.model != cfg.model:
        raise CheckpointError(
            f"Expected the checkpoint in {cfg.resume_from!r} to belong to this run's model, but its "
            f"model settings differ ({checkpoint.model} vs {cfg.model}); resume with the run config "
            "the federation started with"
        )
    if sorted(checkpoint.arrays) != sorted(shared):
        raise CheckpointError(
            f"Expected the checkpoint in {cfg.resume_from!r} to hold this model's shared tensors, but "
            "its tensor names differ; resume with the run config the federation started with"
        )
    if checkpoint.round > cfg.num_rounds:
        raise CheckpointError(
            f"Expected the checkpoint's round ({checkpoint.round}) to be at most num-server-rounds "
            f"({cfg.num_rounds}), but it is later; raise num-server-rounds or start a new federation"
        )
    return checkpoint


def run_federation(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds and write ``results.json`` into ``cfg.run_dir``.

    With ``resume-from`` set, the federation continues from that checkpoint: its
    adapters are the starting point, its history is kept, and rounds go on from
    its round + 1 (a round that was interrupted runs again in full; the sites
    charge it under the new run id, as the data is used again).
    """
    started = time.time()
    run_dir = Path(cfg.run_dir)
    model = build_model(cfg.model)
    shared = model.shared_state_dict()
    initial = ArrayRecord(shared)
    done, history = 0, None
    if cfg.resume_from:
        checkpoint = load_resume_point(cfg, shared)
        done = checkpoint.round
        history = RunHistory.from_dict(checkpoint.extra.get("history", {}), up_to_round=done)
        initial = ArrayRecord({k: torch.from_numpy(checkpoint.arrays[k].copy()) for k in shared})
        logger.info("Resuming from %s: %d of %d rounds done", cfg.resume_from, done, cfg.num_rounds)
    elif cfg.init_checkpoint:  # a new phase, starting from an earlier one's adapters
        initial = initial_arrays(cfg, shared)
    strategy = statistics_strategy(cfg)(  # issue 5: AdapterFedAvg, refreshing DP moments if configured
        expected=expected_specs(initial),
        checkpoint_dir=run_dir / "checkpoint",
        model_config=cfg.model,
        num_rounds=cfg.num_rounds,
        min_nodes=cfg.min_nodes,
        first_round=done + 1,
        history=history,
        train_records=anchor_records(cfg, shared),
        names=SiteNames.from_file(cfg.enrollment),  # node id -> site; the names in replies are only claims
        max_num_examples=cfg.max_num_examples,
    )
    wait_for_enrolled(grid.get_node_ids, strategy.names, cfg.enrolled_wait)
    statistics = initial_statistics(strategy, grid, initial, cfg)  # issue 5: DP label counts, moments
    arrays = initial
    if done < cfg.num_rounds:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds - done,
            evaluate_config=ConfigRecord({"split": "val"}),
        )
        if len(result.arrays) > 0:  # empty when no round produced an aggregate
            arrays = result.arrays
    consolidated = (
        consolidate(grid, arrays, cfg, run_dir / "checkpoint", strategy.names)
        if cfg.ewc.consolidate
        else None
    )
    final = final_evaluation(grid, arrays, strategy, "test", timeout=3600)
    results = {
        "config": cfg.to_run_config(),
        "size": size_report(model),
        "history": strategy.history.to_dict(),
        "resumed_from_round": done,
        "consolidated": consolidated,
        "final_test": final,
        "statistics": statistics_summary(statistics),
        "seconds": time.time() - started,
    }
    atomic_write_json(run_dir / RESULTS_FILE, results)
    logger.info("Federation finished; results in %s", run_dir / RESULTS_FILE)
    return results


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` take precedence over ``context.run_config``."""
    fixed = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**context.run_config, **fixed})
        run_federation(grid, cfg)

    return app


app = make_server_app()
