"""``fedshift simulate --finetune a,b,c``: fine-tuning choices compared on the same sites in one run.

Every fine-tuning choice federates the same simulated sites (same splits, scanner
profiles, seeds, rounds and learning rate) into its own run directory; the table puts
side by side what a user weighs: test AUC, trainable parameters, bytes each site sends
per round, and training throughput. (The JSON file and its row keys keep their names,
``strategies.json`` and ``strategy``, so earlier results stay readable.)
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from fedshift.common.finetune import check_finetune
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.model import build_model
from fedshift.common.protocol import SAMPLES_PER_SECOND_KEY
from fedshift.simulations.experiment import ExperimentSpec, build_sites, federate
from fedshift.simulations.report import bytes_per_round, mean_metric, render_table
from fedshift.simulations.shift import format_site_table, site_summary

logger = logging.getLogger(__name__)

FINETUNE_FILE = "strategies.json"  # the file name of earlier runs


def _throughput(train_history: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """Median over sites and rounds of the samples/s each site reported."""
    values = [
        float(m[SAMPLES_PER_SECOND_KEY])
        for per_site in train_history.values()
        for m in per_site.values()
        if SAMPLES_PER_SECOND_KEY in m
    ]
    return statistics.median(values) if values else math.nan


def finetune_row(finetune: str, server: Mapping[str, Any], trainable: int, seconds: float) -> dict[str, Any]:
    """What the table shows for one fine-tuning choice, from the server's results of its run."""
    history = server["history"]
    sent = bytes_per_round(history["train"])
    return {
        "strategy": finetune,
        "mean_test_auc": mean_metric(server["final_test"], "auc"),
        "mean_test_accuracy": mean_metric(server["final_test"], "accuracy"),
        "test_auc": {site: m.get("auc") for site, m in sorted(server["final_test"].items())},
        "trainable_params": trainable,
        "shared_params": int(server["size"]["shared_params"]),
        "bytes_per_round": max(sent.values(), default=0.0),
        "samples_per_second": _throughput(history["train"]),
        "seconds": seconds,
    }


def finetune_table(rows: Sequence[Mapping[str, Any]], label: str) -> str:
    head = ["finetune", "mean AUC", "mean acc", "trainable params", "sent/round (bytes)", "samples/s", "time"]
    lines = [head]
    for row in rows:
        lines.append(
            [
                row["strategy"],
                f"{row['mean_test_auc']:.3f}",
                f"{row['mean_test_accuracy']:.3f}",
                f"{row['trainable_params']:,}",
                f"{int(row['bytes_per_round']):,}",
                f"{row['samples_per_second']:.0f}",
                f"{row['seconds']:.0f} s",
            ]
        )
    return render_table(
        f"Fine-tuning choices on {label} (test metrics, mean over sites)", lines, mean_row=False
    )


def compare_finetunes(spec: ExperimentSpec, finetunes: Sequence[str]) -> dict[str, Any]:
    """Federate the same sites once per fine-tuning choice; returns the rows, a table, and writes JSON."""
    for name in finetunes:
        check_finetune(name)
    started = time.time()
    sites, label = build_sites(spec)
    logger.info("Simulated sites:\n%s", format_site_table(sites))
    fed = spec.federation
    rows: list[dict[str, Any]] = []
    for name in finetunes:
        config = replace(fed, model=replace(fed.model, finetune=name))
        if name == "full" and config.privacy.enabled:
            logger.warning(
                "Fine-tuning 'full' with DP: per-sample gradients through every depthwise convolution "
                "make DP-SGD tens of times slower than with adapters"
            )
        model = build_model(config.model)
        trainable = sum(p.numel() for p in model.trainable_parameters())
        logger.info("Fine-tuning %s: %s trainable parameters", name, f"{trainable:,}")
        server, seconds = federate(
            config, sites, spec.out_dir / name, spec.site_epsilons, attacks=spec.attacks
        )
        rows.append(finetune_row(name, server, trainable, seconds))
    report = {
        "data": label,
        "synthetic": sites[0].data.synthetic,
        "sites": [site_summary(s) for s in sites],
        "run_config": fed.to_run_config(),
        "strategies": rows,
        "seconds": time.time() - started,
    }
    atomic_write_json(spec.out_dir / FINETUNE_FILE, as_jsonable(report))
    report["table"] = finetune_table(rows, label)
    return report
