"""``fedshift simulate``: shifted sites from one dataset, a Flower simulation, a baseline, a report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedshift.client.site import SITE_DATA_FILE
from fedshift.common.config import FederationConfig
from fedshift.common.data import load_dataset, save_npz
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.server.app import RESULTS_FILE
from fedshift.simulations.baseline import local_only
from fedshift.simulations.engine import run_flower_simulation
from fedshift.simulations.report import (
    bytes_per_round,
    mean_metric,
    plot_auc_per_round,
    site_table,
)
from fedshift.simulations.shift import (
    SimulatedSite,
    format_site_table,
    plan_sites,
    simulate_sites,
    site_summary,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentSpec:
    """One simulated multi-site experiment."""

    out_dir: Path  # run directory (created)
    data: str | None = None  # .npz or image folder; None = built-in SYNTHETIC chest X-rays
    sites: int = 4  # number of simulated hospitals
    prevalences: tuple[float, ...] | None = None  # explicit per-site prevalence of class 1
    dirichlet_alpha: float | None = None  # or: prevalences drawn from Dirichlet(alpha)
    quantity_skew: float = 0.0  # 0 = equal site sizes; larger = more unequal
    max_per_site: int | None = None  # cap on images per site
    synthetic_n: int = 2000  # images generated when no --data is given
    baseline: bool = True  # also train every site alone
    federation: FederationConfig = field(default_factory=FederationConfig)


def build_sites(spec: ExperimentSpec) -> tuple[list[SimulatedSite], str]:
    """Load the source data and turn it into shifted sites; returns the sites and a data label."""
    dataset = load_dataset(
        spec.data,
        synthetic_n=spec.synthetic_n,
        seed=spec.federation.seed,
        image_size=spec.federation.model.image_size,
    )
    pool = dataset.pooled()
    specs = plan_sites(
        spec.sites,
        prevalences=spec.prevalences,
        dirichlet_alpha=spec.dirichlet_alpha,
        quantity_skew=spec.quantity_skew,
        pool_counts=list(pool.class_counts(dataset.num_classes)),
        max_per_site=spec.max_per_site,
        seed=spec.federation.seed,
    )
    sites = simulate_sites(
        pool,
        specs,
        class_names=dataset.class_names,
        source=dataset.source,
        synthetic=dataset.synthetic,
        seed=spec.federation.seed,
    )
    return sites, dataset.label


def run_experiment(spec: ExperimentSpec) -> dict[str, Any]:
    """Run everything; writes config, results JSON, checkpoint and plot into ``spec.out_dir``."""
    started = time.time()
    out = spec.out_dir
    sites, data_label = build_sites(spec)
    logger.info("Simulated sites:\n%s", format_site_table(sites))
    for site in sites:
        site_dir = out / "sites" / site.spec.name
        site_dir.mkdir(parents=True, exist_ok=True)
        save_npz(site_dir / SITE_DATA_FILE, site.data)
    fed = replace(
        spec.federation,
        run_dir=str(out / "server"),
        sites_root=str(out / "sites"),
        min_nodes=min(spec.federation.min_nodes, len(sites)),
    )
    atomic_write_json(
        out / "config.json",
        as_jsonable(
            {
                "data": spec.data or "synthetic-cxr (SYNTHETIC)",
                "sites": [site_summary(s) for s in sites],
                "run_config": fed.to_run_config(),
                "quantity_skew": spec.quantity_skew,
                "dirichlet_alpha": spec.dirichlet_alpha,
            }
        ),
    )
    t0 = time.time()
    run_flower_simulation(fed, len(sites))
    federated_seconds = time.time() - t0
    results_path = Path(fed.run_dir) / RESULTS_FILE
    if not results_path.is_file():
        raise RuntimeError(f"The Flower simulation ended without writing {results_path}")
    server = json.loads(results_path.read_text())
    local: dict[str, dict[str, float]] | None = None
    t0 = time.time()
    if spec.baseline:
        local = {s.spec.name: local_only(fed, s.spec.name, s.data) for s in sites}
    baseline_seconds = time.time() - t0
    sent = bytes_per_round(server["history"]["train"])
    size = server["size"]
    report = {
        "data": data_label,
        "synthetic": sites[0].data.synthetic,
        "sites": [site_summary(s) for s in sites],
        "federated_test": server["final_test"],
        "local_only_test": local,
        "mean_test_auc": {
            "federated": mean_metric(server["final_test"], "auc"),
            "local_only": mean_metric(local, "auc") if local else None,
        },
        "bytes_per_round": sent,
        "size": size,
        "max_bytes_fraction_of_backbone": max(sent.values(), default=0) / size["backbone_bytes"],
        "history": server["history"],
        "seconds": {
            "federated": federated_seconds,
            "local_only": baseline_seconds,
            "total": time.time() - started,
        },
    }
    atomic_write_json(out / "results.json", as_jsonable(report))
    plot_auc_per_round(
        server["history"]["evaluate"],
        out / "auc_per_round.png",
        title=f"Per-site AUC per round — {data_label}",
        final_test=server["final_test"],
        local=local,
    )
    report["table"] = site_table(server["final_test"], local, sent, data_label)
    return report
