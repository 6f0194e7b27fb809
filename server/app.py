"""The fedshift ServerApp: one federation, from its starting adapters to ``results.json``.

:func:`run_federation` reads top-down: the starting point, the strategy, the
statistics stage, Flower's round loop, the Fisher consolidation, the final
test evaluation and the final model sent to every site (which writes its bundle).
``app`` is what Flower's tooling loads (``pyproject.toml``);
``make_server_app(overrides)`` fixes run-config values in code (``fedshift simulate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedshift.common.checkpoint import Checkpoint, load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import CheckpointError
from fedshift.common.io import atomic_write_json
from fedshift.common.model import build_model, size_report
from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FINAL_MODEL_QUERY,
    NUM_SITES_KEY,
    SERVER_ROUND_KEY,
    SPLIT_KEY,
    SPLIT_TEST,
    SPLIT_VAL,
)
from fedshift.common.shift_statistics import GLOBAL_KEY, GlobalStatistics
from fedshift.server.ask import ask_sites
from fedshift.server.consolidation import anchor_records, consolidate, initial_arrays
from fedshift.server.enrollment import SiteNames, wait_for_enrolled
from fedshift.server.server_optimizer import ServerOptimizerState, ServerParams, restored_state
from fedshift.server.statistics import collect_statistics, statistics_summary, with_refresh
from fedshift.server.strategy import AdapterFedAvg, RunHistory, metrics_of
from fedshift.server.validation import expected_specs, reply_problem

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"  # in the run directory: the latest round's adapters (and consolidation)


def run_federation(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds and write ``results.json`` into ``cfg.run_dir``.

    With ``resume-from`` set, the federation continues from that checkpoint: its
    adapters are the starting point, its history is kept, and rounds go on from
    its round + 1 (a round that was interrupted runs again in full; the sites
    charge it under the new run id, as the data is used again). The server
    optimizer continues from the checkpoint's moments.
    """
    started = time.time()
    run_dir = Path(cfg.run_dir)
    model = build_model(cfg.model)
    shared = model.shared_state_dict()
    initial, done, history, server_state = starting_point(cfg, shared)
    strategy = make_strategy(cfg, initial, shared, done, history, server_state)
    wait_for_enrolled(grid.get_node_ids, strategy.names, cfg.enrolled_wait)
    statistics = collect_statistics(grid, initial, cfg, str(grid.run.run_id), names=strategy.names)
    arrays = run_rounds(grid, with_refresh(strategy, cfg, statistics), initial, cfg, done)
    consolidated = (
        consolidate(grid, arrays, cfg, run_dir / CHECKPOINT_DIR, strategy.names)
        if cfg.ewc.consolidate
        else None
    )
    final = final_evaluation(grid, arrays, strategy, SPLIT_TEST, cfg.reply_timeout)
    bundles = deliver_final_model(grid, arrays, strategy, cfg.reply_timeout, statistics)
    results = {
        "run_id": str(grid.run.run_id),
        "config": cfg.to_run_config(),
        "size": size_report(model),
        "history": strategy.history.to_dict(),
        "resumed_from_round": done,
        "consolidated": consolidated,
        "final_test": final,
        "bundles": bundles,
        "statistics": statistics_summary(statistics),
        "seconds": time.time() - started,
    }
    atomic_write_json(run_dir / RESULTS_FILE, results)
    logger.info("Federation finished; results in %s", run_dir / RESULTS_FILE)
    return results


def starting_point(
    cfg: FederationConfig, shared: Mapping[str, torch.Tensor]
) -> tuple[ArrayRecord, int, RunHistory | None, ServerOptimizerState | None]:
    """The adapters the first round starts from, the rounds already done, their history and the server
    optimizer's state.

    With ``resume-from``: the checkpoint's adapters, round, history and optimizer
    state; with ``init-checkpoint``: an earlier phase's adapters (a fresh
    optimizer); else the model's own.
    """
    if cfg.resume_from:
        checkpoint = load_resume_point(cfg, shared)
        done = checkpoint.round
        history = RunHistory.from_dict(checkpoint.extra.get("history", {}), up_to_round=done)
        state = restored_state(ServerParams.from_config(cfg.aggregation), checkpoint, cfg.resume_from)
        logger.info("Resuming from %s: %d of %d rounds done", cfg.resume_from, done, cfg.num_rounds)
        arrays = ArrayRecord({k: torch.from_numpy(checkpoint.arrays[k].copy()) for k in shared})
        return arrays, done, history, state
    if cfg.init_checkpoint:
        return initial_arrays(cfg, shared), 0, None, None
    return ArrayRecord(dict(shared)), 0, None, None


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


def make_strategy(
    cfg: FederationConfig,
    initial: ArrayRecord,
    shared: Mapping[str, torch.Tensor],
    done: int,
    history: RunHistory | None,
    server_state: ServerOptimizerState | None = None,
) -> AdapterFedAvg:
    """The run's FedAvg: rounds numbered on from ``done``, sites named by the enrollment, the server
    optimizer from ``server_state`` (a fresh one when ``None``)."""
    return AdapterFedAvg(
        expected=expected_specs(initial),
        checkpoint_dir=Path(cfg.run_dir) / CHECKPOINT_DIR,
        model_config=cfg.model,
        num_rounds=cfg.num_rounds,
        min_nodes=cfg.min_nodes,
        first_round=done + 1,
        history=history,
        train_records=anchor_records(cfg, shared),
        names=SiteNames.from_file(cfg.enrollment),  # node id -> site; the names in replies are only claims
        max_num_examples=cfg.max_num_examples,
        aggregation=cfg.aggregation,
        reply_timeout=cfg.reply_timeout,
        server_state=server_state,
    )


def run_rounds(
    grid: Grid, strategy: Strategy, initial: ArrayRecord, cfg: FederationConfig, done: int
) -> ArrayRecord:
    """Flower's round loop for the rounds left; the last aggregate (``initial`` when there is none)."""
    if done >= cfg.num_rounds:
        return initial
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.num_rounds - done,
        timeout=cfg.reply_timeout,
        evaluate_config=ConfigRecord({SPLIT_KEY: SPLIT_VAL}),
    )
    return result.arrays if len(result.arrays) > 0 else initial  # empty when no round aggregated


def final_evaluation(
    grid: Grid, arrays: ArrayRecord, strategy: AdapterFedAvg, split: str, timeout: float
) -> dict[str, dict[str, float]]:
    """Ask every connected site to evaluate ``arrays`` on its ``split``; metrics per site.

    Replies are screened like a round's (enrolled sender, a usable weight, finite
    numbers as metrics), but not recorded in the round history. Nothing is
    averaged, so each site's own keys stay.
    """
    config = ConfigRecord({SPLIT_KEY: split, SERVER_ROUND_KEY: strategy.num_rounds})
    replies = ask_sites(
        grid,
        RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
        MessageType.EVALUATE,
        names=strategy.names,
        timeout=timeout,
        check=lambda msg: reply_problem(
            msg, strategy.expected, with_arrays=False, max_weight=strategy.max_num_examples
        ),
        left_out=f"Final {split} evaluation: no result from",
    )
    return {name: metrics_of(msg) for name, msg in replies}


def final_model_content(
    arrays: ArrayRecord, num_rounds: int, num_sites: int, statistics: GlobalStatistics | None
) -> RecordDict:
    """What the final-model stage sends: the final adapters, and the federation's training prior when the
    run released one (a joining site, which has no labels, estimates its own prior from it)."""
    content = RecordDict(
        {
            ARRAYS_KEY: arrays,
            CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: num_rounds, NUM_SITES_KEY: num_sites}),
        }
    )
    if statistics is not None and statistics.train_prior is not None:
        prior = GlobalStatistics(
            run=statistics.run, sites=statistics.sites, train_prior=statistics.train_prior
        )
        content[GLOBAL_KEY] = ConfigRecord(prior.to_record())
    return content


def deliver_final_model(
    grid: Grid,
    arrays: ArrayRecord,
    strategy: AdapterFedAvg,
    timeout: float,
    statistics: GlobalStatistics | None = None,
) -> list[str]:
    """Send the final global adapters to every connected site, which writes its model bundle; the sites
    that did. A site that fails is logged here, and the federation ends as it would without it."""
    num_sites = len(list(grid.get_node_ids()))
    replies = ask_sites(
        grid,
        final_model_content(arrays, strategy.num_rounds, num_sites, statistics),
        f"{MessageType.QUERY}.{FINAL_MODEL_QUERY}",
        names=strategy.names,
        timeout=timeout,
        check=lambda msg: f"the site reported an error: {msg.error.reason}" if msg.has_error() else None,
        left_out="Final model: no bundle at",
    )
    logger.info("Final model: %d of %d sites wrote their model bundle", len(replies), num_sites)
    return [name for name, _ in replies]


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
