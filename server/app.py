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

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedshift.common.config import FederationConfig
from fedshift.common.io import atomic_write_json
from fedshift.common.model import build_model, size_report
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from fedshift.server.statistics import collect_statistics, statistics_summary
from fedshift.server.strategy import AdapterFedAvg, site_name
from fedshift.server.validation import expected_specs, reply_problem

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def final_evaluation(
    grid: Grid, arrays: ArrayRecord, strategy: AdapterFedAvg, split: str, timeout: float
) -> dict[str, dict[str, float]]:
    """Ask every connected site to evaluate ``arrays`` on its ``split``; metrics per site."""
    config = ConfigRecord({"split": split, "server-round": strategy.num_rounds})
    messages = [
        Message(
            RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]
    out: dict[str, dict[str, float]] = {}
    for msg in grid.send_and_receive(messages, timeout=timeout):
        problem = reply_problem(msg, strategy.expected, with_arrays=False)
        if problem:
            logger.warning("Final %s evaluation: no result from %s: %s", split, site_name(msg), problem)
            continue
        record = msg.content.metric_records[METRICS_KEY]
        out[site_name(msg)] = {k: float(v) for k, v in record.items() if not isinstance(v, list)}
    return out


def run_federation(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds and write ``results.json`` into ``cfg.run_dir``."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    model = build_model(cfg.model)
    initial = ArrayRecord(model.shared_state_dict())
    strategy = AdapterFedAvg(
        expected=expected_specs(initial),
        checkpoint_dir=run_dir / "checkpoint",
        model_config=cfg.model,
        num_rounds=cfg.num_rounds,
        min_nodes=cfg.min_nodes,
    )
    statistics = collect_statistics(grid, initial, cfg, str(grid.run.run_id))  # issue 5: DP statistics
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.num_rounds,
        evaluate_config=ConfigRecord({"split": "val"}),
    )
    final = final_evaluation(grid, result.arrays, strategy, "test", timeout=3600)
    results = {
        "config": cfg.to_run_config(),
        "size": size_report(model),
        "history": strategy.history.to_dict(),
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
