"""``fedshift simulate --continual``: hospitals join in two phases; how much does the model forget?

Phase A federates the first half of the sites (ordinary scanners, one prevalence)
and ends with a consolidation step: every phase-A site sends its Fisher at the final
adapters (under DP when DP is on), and the server saves anchor and Fisher. In phase
B, new sites with another scanner profile and another prevalence go on from phase
A's adapters, once without EWC and once with EWC towards the consolidated anchor.

Forgetting = the phase-A sites' mean test AUC with phase A's adapters minus the same
with phase B's (each site keeps its own site-local tensors from phase A); phase-B
performance is the phase-B sites' mean test AUC at the end of phase B.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.client.training import device_for, evaluate
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.simulations.experiment import ExperimentSpec, build_sites, federate, site_models
from fedshift.simulations.report import render_table
from fedshift.simulations.shift import (
    DEFAULT_PROFILES,
    ScannerProfile,
    SimulatedSite,
    format_site_table,
    site_summary,
)

logger = logging.getLogger(__name__)

CONTINUAL_FILE = "continual.json"
# phase B's hospitals: bedside portable units, far darker, flatter, blurrier and noisier than anything
# phase A saw (a milder profile, gamma 1.6 / contrast 0.7 / blur 1 / noise 0.08, caused no forgetting)
PHASE_B_PROFILE = ScannerProfile("portable", gamma=2.5, contrast=0.5, blur_sigma=1.5, noise_std=0.12)


def continual_sites(
    spec: ExperimentSpec, prevalence_a: float, prevalence_b: float
) -> tuple[list[SimulatedSite], list[SimulatedSite], str]:
    """Phase-A and phase-B sites from one pool (disjoint images); phase B named site-0.. in its own run."""
    if spec.sites < 2 or spec.sites % 2:
        raise ConfigError(
            f"Expected an even number of --sites >= 2 for --continual (half join in phase B), but got "
            f"{spec.sites}; pass e.g. --sites 4"
        )
    half = spec.sites // 2
    sites, label = build_sites(
        spec,
        prevalences=[prevalence_a] * half + [prevalence_b] * half,
        profiles=[*DEFAULT_PROFILES[:half], *([PHASE_B_PROFILE] * half)],
    )
    phase_b = [replace(s, spec=replace(s.spec, name=f"site-{k}")) for k, s in enumerate(sites[half:])]
    return sites[:half], phase_b, label


def evaluate_sites(
    checkpoint_dir: Path, sites: Sequence[SimulatedSite], sites_root: Path, device: str
) -> dict[str, dict[str, float]]:
    """Test metrics of a checkpoint's adapters at each site, with the site's own local tensors."""
    resolved = device_for(device)
    models = site_models(checkpoint_dir, [s.spec.name for s in sites], sites_root)
    return {
        site.spec.name: evaluate(model, site.data.split("test"), resolved)
        for site, model in zip(sites, models, strict=True)
    }


def _mean_auc(per_site: Mapping[str, Mapping[str, float]]) -> float:
    values = [float(m["auc"]) for m in per_site.values() if not np.isnan(m["auc"])]
    return float(np.mean(values)) if values else float("nan")


def continual_table(summary: Mapping[str, Any], label: str) -> str:
    head = ["phase B run", "A-sites AUC before", "A-sites AUC after", "forgetting", "B-sites AUC"]
    rows = [head]
    before = summary["phase_a_auc_before"]
    for name, run in summary["runs"].items():
        rows.append(
            [
                name,
                f"{before:.3f}",
                f"{run['phase_a_auc_after']:.3f}",
                f"{run['forgetting']:+.3f}",
                f"{run['phase_b_auc']:.3f}",
            ]
        )
    return render_table(f"Continual federation on {label} (mean test AUC)", rows, mean_row=False)


def _phase_b(
    spec: ExperimentSpec,
    config: FederationConfig,
    sites_a: Sequence[SimulatedSite],
    sites_b: Sequence[SimulatedSite],
    root: Path,
    before: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """One phase-B run from phase A's adapters, and what it did to the phase-A sites."""
    server_b, seconds_b = federate(config, sites_b, root, spec.site_epsilons, attacks=spec.attacks)
    phase_a = spec.out_dir / "phase-a"
    after = evaluate_sites(root / "server" / "checkpoint", sites_a, phase_a / "sites", config.device)
    return {
        "phase_a_after": after,
        "phase_a_auc_after": _mean_auc(after),
        "forgetting": _mean_auc(before) - _mean_auc(after),
        "phase_b_test": server_b["final_test"],
        "phase_b_auc": _mean_auc(server_b["final_test"]),
        "ewc_lambda": config.ewc.lam,
        "seconds": seconds_b,
        "run_dir": str(root),
    }


def run_continual(
    spec: ExperimentSpec,
    *,
    prevalence_a: float = 0.3,
    prevalence_b: float = 0.8,
    ewc_lambdas: Sequence[float] = (10.0,),
) -> dict[str, Any]:
    """Phase A (+ consolidation), then phase B without EWC and with EWC at each lambda."""
    if not ewc_lambdas or not all(lam > 0 for lam in ewc_lambdas):
        raise ConfigError(
            f"Expected one or more EWC lambdas > 0 for the continual scenario, but got {list(ewc_lambdas)}; "
            "pass e.g. --ewc-lambda 1,10,100"
        )
    started = time.time()
    sites_a, sites_b, label = continual_sites(spec, prevalence_a, prevalence_b)
    logger.info("Phase A sites:\n%s", format_site_table(sites_a))
    logger.info("Phase B sites:\n%s", format_site_table(sites_b))
    fed: FederationConfig = spec.federation
    out = spec.out_dir
    phase_a = replace(fed, ewc=replace(fed.ewc, lam=0.0, consolidate=True))
    server_a, seconds_a = federate(
        phase_a, sites_a, out / "phase-a", spec.site_epsilons, attacks=spec.attacks
    )
    checkpoint_a = out / "phase-a" / "server" / "checkpoint"
    before = evaluate_sites(checkpoint_a, sites_a, out / "phase-a" / "sites", fed.device)
    variants = {"no EWC": replace(fed, init_checkpoint=str(checkpoint_a), ewc=replace(fed.ewc, lam=0.0))}
    for lam in ewc_lambdas:
        variants[f"EWC lambda={lam:g}"] = replace(
            fed,
            init_checkpoint=str(checkpoint_a),
            ewc=replace(fed.ewc, lam=lam, anchor="consolidated"),
        )
    runs = {
        name: _phase_b(spec, config, sites_a, sites_b, out / f"phase-b-{k}", before)
        for k, (name, config) in enumerate(variants.items())
    }
    summary = {
        "data": label,
        "phase_a_sites": [site_summary(s) for s in sites_a],
        "phase_b_sites": [site_summary(s) for s in sites_b],
        "phase_a_before": before,
        "phase_a_auc_before": _mean_auc(before),
        "phase_a_own_test": server_a["final_test"],
        "consolidated": server_a.get("consolidated"),
        "phase_a_seconds": seconds_a,
        "runs": runs,
        "run_config": fed.to_run_config(),
        "seconds": time.time() - started,
    }
    atomic_write_json(out / CONTINUAL_FILE, as_jsonable(summary))
    summary["table"] = continual_table(summary, label)
    return summary
