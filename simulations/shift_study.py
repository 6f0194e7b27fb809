"""``fedshift shift-study``: label-shift correction and domain alignment, measured per site in one run.

The same shifted sites (one prevalence and one scanner profile each) are
federated twice with the real ClientApp and ServerApp on Flower's simulation
engine:

* run **plain**: the shared model (LoRA and head; each site keeps only its
  input adapter); its final evaluation at every site also reports (b) the
  label-shift-corrected predictions and the **oracle** (corrected with the test
  split's true prior). Both are post-hoc corrections of the same global model at
  each site, so they cost no training;
* run **aligned**: domain alignment without a loss: FedBN-style site-local
  norm affines (and the site-local input adapter); its evaluation gives (c) and,
  corrected, (d). Site-local norms also learn each site's prior locally, so
  there the correction starts from the site's own training prior;
* run **aligned+loss** (when ``align-weight > 0``): the same plus the
  feature-alignment loss towards the global DP moments: (c+loss), (d+loss).

Every run holds a statistics stage (DP label counts, and moments in the
aligned+loss run) charged to each site's ledger. The report has, per site and for each of
(a) plain, (b) + label-shift correction, (c) + alignment, (d) both and the
oracle: accuracy, balanced accuracy, log loss, ECE and AUC; the site's
estimated prior with its bootstrap interval (read from the site's own
``label-shift.json``, a simulation privilege); a per-site alignment score; and an
audit of every site's egress log against its ledger. It writes
``shift_study.json`` and ``shift_study.png`` and prints the table.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.client.alignment import feature_matrix
from fedshift.client.correction import CORRECTION_FILE
from fedshift.client.egress import (
    BOOKKEEPING,
    DP_STATISTICS,
    METRIC,
    UNPROTECTED,
    read_egress_log,
)
from fedshift.client.ledger import open_ledger
from fedshift.client.training import configure_threads, resolve_device
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.protocol import (
    ACCURACY_KEY,
    AUC_KEY,
    BALANCED_ACCURACY_KEY,
    ECE_KEY,
    LOG_LOSS_KEY,
    MECHANISM_DP_SGD,
)
from fedshift.simulations.analysis import subspace_alignment
from fedshift.simulations.experiment import (
    ExperimentSpec,
    build_sites,
    federate,
    ledger_epsilons,
    site_models,
)
from fedshift.simulations.shift import (
    SimulatedSite,
    format_site_table,
    site_summary,
)

logger = logging.getLogger(__name__)

METRICS = (ACCURACY_KEY, BALANCED_ACCURACY_KEY, LOG_LOSS_KEY, ECE_KEY, AUC_KEY)
LABELS = {
    ACCURACY_KEY: "acc",
    BALANCED_ACCURACY_KEY: "bal.acc",
    LOG_LOSS_KEY: "logloss",
    ECE_KEY: "ECE",
    AUC_KEY: "AUC",
}
# variant -> (run, metric prefix in the site's evaluation reply)
VARIANTS: dict[str, tuple[str, str]] = {
    "a": ("plain", ""),
    "b": ("plain", "ls-"),
    "c": ("aligned", ""),
    "d": ("aligned", "ls-"),
    "c+loss": ("aligned+loss", ""),
    "d+loss": ("aligned+loss", "ls-"),
    "oracle": ("plain", "oracle-"),
    "a+cal": ("plain", "cal-"),
    "a+tta": ("plain", "tta-"),
    "c+tta": ("aligned", "tta-"),
}
VARIANT_NAMES = {
    "a": "(a) plain federated",
    "b": "(b) + label-shift correction",
    "c": "(c) + domain alignment (site-local norms)",
    "d": "(d) both",
    "c+loss": "(c) + the feature-alignment loss",
    "d+loss": "(d) + the feature-alignment loss",
    "oracle": "oracle: (a) corrected with the true prior",
    "a+cal": "(a) calibrated only (no prior correction)",
    "a+tta": "(a) + test-time norm statistics",
    "c+tta": "(c) + test-time norm statistics",
}
TABLE_VARIANTS = ("a", "b", "c", "d", "c+loss", "oracle")  # c+loss only with align-weight > 0
ALLOWED_MECHANISMS = frozenset({MECHANISM_DP_SGD, UNPROTECTED, METRIC, BOOKKEEPING, *DP_STATISTICS.values()})


@dataclass(frozen=True)
class StudySpec(ExperimentSpec):
    """One shift study: an experiment with one site per prevalence (``sites`` follows them)."""

    data: str | None = None  # MedMNIST-layout .npz (e.g. ../shared/data/pneumoniamnist.npz)
    prevalences: tuple[float, ...] | None = (0.05, 0.1, 0.5, 0.9, 0.95)  # one site each
    max_per_site: int | None = 600  # images per site (fewer if the pool runs out) before the 60/20/20 split
    far: float = 0.3  # a site is "far" when |its prevalence - the global prior| >= this

    def __post_init__(self) -> None:
        if self.prevalences is None or len(self.prevalences) < 2:
            raise ConfigError(f"Expected at least 2 prevalences, but got {list(self.prevalences or ())}")
        object.__setattr__(self, "sites", len(self.prevalences))


def variant_metrics(
    final_test: Mapping[str, Mapping[str, float]], prefix: str
) -> dict[str, dict[str, float]]:
    """Per site: the five metrics of one variant (``prefix`` of the evaluation reply's keys)."""
    out = {}
    for site, metrics in final_test.items():
        out[site] = {m: float(metrics.get(f"{prefix}{m}", math.nan)) for m in METRICS}
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def alignment_scores(root: Path, sites: Sequence[SimulatedSite], k: int = 5) -> dict[str, float]:
    """Per site: subspace alignment of its test features with the pooled test features of the others.

    Features come from the run's final global adapters and each site's own local
    state (input adapter, norm affines), as the site would compute them.
    """
    configure_threads()
    device = resolve_device("cpu")
    names = [s.spec.name for s in sites]
    models = site_models(root / "server" / "checkpoint", names, root / "sites")
    features: dict[str, np.ndarray] = {
        site.spec.name: feature_matrix(model, site.data.split("test").images, device)
        for site, model in zip(sites, models, strict=True)
    }
    out = {}
    for name, own in features.items():
        others = np.concatenate([f for n, f in features.items() if n != name])
        out[name] = subspace_alignment(own, others, k=min(k, own.shape[0] - 1))
    return out


def egress_audit(root: Path) -> dict[str, Any]:
    """Every item every site sent, by mechanism; DP statistics without a ledger charge; anything else."""
    mechanisms: dict[str, int] = {}
    uncharged: list[str] = []
    unexpected: list[str] = []
    blocked: list[str] = []
    for site_dir in sorted(p for p in (root / "sites").iterdir() if p.is_dir()):
        ledger = open_ledger(site_dir)
        for entry in read_egress_log(site_dir):
            blocked += [f"{site_dir.name}: {b}" for b in entry["blocked"]]
            for item in entry["items"]:
                mech = str(item["mechanism"])
                mechanisms[mech] = mechanisms.get(mech, 0) + 1
                if mech not in ALLOWED_MECHANISMS:
                    unexpected.append(f"{site_dir.name}: {item['record']}.{item['key']} ({mech})")
                if mech in DP_STATISTICS.values() and (
                    ledger is None or ledger.find(entry["run"], entry["round"], mech) is None
                ):
                    uncharged.append(
                        f"{site_dir.name}: {item['record']}.{item['key']} round {entry['round']}"
                    )
    return {"mechanisms": mechanisms, "uncharged": uncharged, "unexpected": unexpected, "blocked": blocked}


def _site_priors(root: Path, sites: Sequence[SimulatedSite]) -> dict[str, dict[str, Any]]:
    out = {}
    for site in sites:
        path = root / "sites" / site.spec.name / CORRECTION_FILE
        if path.is_file():
            kept = json.loads(path.read_text())
            interval = kept.get("interval")
            out[site.spec.name] = {
                "estimate": kept["estimate"][1] if kept.get("estimate") else None,
                "applied": kept["prior"][1],
                "interval": [interval[0][1], interval[1][1]] if interval else None,
                "fallback": kept["fallback"],
                "reason": kept["reason"],
            }
    return out


def study_configs(fed: FederationConfig) -> dict[str, FederationConfig]:
    """The study's runs: (a) plain, (c) aligned and, with an alignment weight, (c+loss).

    (a) is the shared model: no site-local norm affines (they would learn each site's prior and
    scanner locally); (c) adds FedBN-style local norms; (c+loss) also the feature-alignment loss.
    """
    no_loss = replace(fed.shift, align_weight=0.0)
    configs = {
        "plain": replace(fed, model=replace(fed.model, local_norm=False), shift=no_loss),
        "aligned": replace(fed, model=replace(fed.model, local_norm=True), shift=no_loss),
    }
    if fed.shift.align:
        configs["aligned+loss"] = replace(fed, model=replace(fed.model, local_norm=True))
    return configs


def run_study(spec: StudySpec) -> dict[str, Any]:
    """Both federations, the per-site table, the claims, JSON and plot in ``spec.out_dir``."""
    started = time.time()
    out = spec.out_dir
    sites, _ = build_sites(spec)
    logger.info("Simulated sites:\n%s", format_site_table(sites))
    configs = study_configs(spec.federation)
    fed = configs.get("aligned+loss", configs["aligned"])
    budgets = spec.site_epsilons if fed.privacy.enabled else None
    runs: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name, cfg in configs.items():
        runs[name], seconds[name] = federate(
            cfg, sites, out / name, budgets, every_site=True, attacks=spec.attacks
        )
    names = [s.spec.name for s in sites]
    prevalence = {s.spec.name: float(site_summary(s)["prevalence"] or 0.0) for s in sites}  # type: ignore[arg-type]
    measures = _measures(spec, runs, names, prevalence)
    report = {
        "data": spec.data,
        "sites": [site_summary(s) for s in sites],
        "global_train_prior": measures["global_train_prior"],
        "run_config": fed.to_run_config(),
        "variants": VARIANT_NAMES,
        "per_site": measures["per_site"],
        "mean": measures["mean"],
        "far_sites_mean_accuracy": measures["far_sites_mean_accuracy"],
        "site_priors": {run: _site_priors(out / run, sites) for run in runs},
        "alignment_score": {run: alignment_scores(out / run, sites) for run in runs},
        "claims": measures["claims"],
        "egress": {run: egress_audit(out / run) for run in runs},
        "ledger_epsilon": {
            run: ledger_epsilons(out / run / "sites", fed.privacy.delta, names) for run in runs
        },
        "seconds": {**seconds, "total": time.time() - started},
    }
    report["table"] = format_table(report, names, prevalence)
    atomic_write_json(out / "shift_study.json", as_jsonable(report))
    plot_study(report, names, prevalence, out / "shift_study.png")
    return report


def _measures(
    spec: StudySpec,
    runs: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    prevalence: Mapping[str, float],
) -> dict[str, Any]:
    """Per variant and site the five metrics, their means over sites, the far sites and the claims."""
    per_variant = {
        v: variant_metrics(runs[run]["final_test"], prefix)
        for v, (run, prefix) in VARIANTS.items()
        if run in runs
    }
    prior = runs["plain"].get("statistics") or {}
    global_prior = float(prior["train_prior"][1]) if prior.get("train_prior") else math.nan
    far = [n for n in names if abs(prevalence[n] - global_prior) >= spec.far]
    means = {v: {m: _mean([per_variant[v][n][m] for n in names]) for m in METRICS} for v in per_variant}
    far_acc = {v: _mean([per_variant[v][n][ACCURACY_KEY] for n in far]) for v in per_variant}
    claims = {
        "mean_log_loss": {"a": means["a"][LOG_LOSS_KEY], "b": means["b"][LOG_LOSS_KEY]},
        "label_shift_lowers_mean_log_loss": means["b"][LOG_LOSS_KEY] < means["a"][LOG_LOSS_KEY],
        "far_sites": far,
        "far_accuracy": {
            n: {"a": per_variant["a"][n][ACCURACY_KEY], "b": per_variant["b"][n][ACCURACY_KEY]} for n in far
        },
        "label_shift_raises_far_accuracy": bool(far)
        and all(per_variant["b"][n][ACCURACY_KEY] >= per_variant["a"][n][ACCURACY_KEY] for n in far)
        and far_acc["b"] > far_acc["a"],
        "mean_auc": {v: means[v]["auc"] for v in ("a", "c", "b", "d", "c+loss") if v in means},
        "alignment_keeps_mean_auc": means["c"]["auc"] >= means["a"]["auc"],
        "tta_mean_auc": {v: means[v]["auc"] for v in ("a", "a+tta", "c", "c+tta")},
    }
    return {
        "global_train_prior": global_prior,
        "per_site": per_variant,
        "mean": means,
        "far_sites_mean_accuracy": far_acc,
        "claims": claims,
    }


def summarize_seeds(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The claims over several studies (one per seed: other images, noise and initialisation).

    Per claim the value of every seed and the mean; for the alignment claim the
    paired per-seed difference (c) - (a) of the mean AUC with its standard error,
    since one study's test splits hold a few dozen images per site.
    """
    seeds = sorted(reports)

    def per_seed(fn: Any) -> list[float]:
        return [float(fn(reports[s])) for s in seeds]

    far = reports[seeds[0]]["claims"]["far_sites"]
    auc_diff = np.array(per_seed(lambda r: r["mean"]["c"]["auc"] - r["mean"]["a"]["auc"]))
    se = float(auc_diff.std(ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else math.nan
    out: dict[str, Any] = {
        "seeds": seeds,
        "mean_log_loss": {
            v: per_seed(lambda r, v=v: r["mean"][v][LOG_LOSS_KEY]) for v in ("a", "b", "c", "d")
        },
        "far_accuracy": {
            site: {
                v: per_seed(lambda r, v=v, site=site: r["per_site"][v][site][ACCURACY_KEY])
                for v in ("a", "b")
            }
            for site in far
        },
        "mean_auc": {
            v: per_seed(lambda r, v=v: r["mean"][v]["auc"])
            for v in ("a", "c", "c+loss", "a+tta", "c+tta")
            if all(v in r["mean"] for r in reports.values())
        },
        "auc_difference_c_minus_a": {"mean": float(auc_diff.mean()), "standard_error": se},
    }
    return out


def format_seed_summary(summary: Mapping[str, Any]) -> str:
    """The claims over seeds: every seed's value and the mean."""

    def row(label: str, values: Sequence[float]) -> str:
        cells = " ".join(f"{v:7.3f}" for v in values)
        return f"{label:<34} {cells}   mean {float(np.mean(values)):.3f}"

    seeds = summary["seeds"]
    lines = [f"Over seeds {seeds} (one column per seed):"]
    for v, name in (
        ("a", "(a) plain"),
        ("b", "(b) + correction"),
        ("c", "(c) + alignment"),
        ("d", "(d) both"),
    ):
        lines.append(row(f"mean log loss {name}", summary["mean_log_loss"][v]))
    for site, acc in summary["far_accuracy"].items():
        lines.append(row(f"accuracy at far {site} (a)", acc["a"]))
        lines.append(row(f"accuracy at far {site} (b)", acc["b"]))
    for v, values in summary["mean_auc"].items():
        lines.append(row(f"mean AUC ({v})", values))
    diff = summary["auc_difference_c_minus_a"]
    lines.append(f"mean AUC (c) - (a): {diff['mean']:+.4f} (standard error {diff['standard_error']:.4f})")
    return "\n".join(lines)


def format_table(report: Mapping[str, Any], names: Sequence[str], prevalence: Mapping[str, float]) -> str:
    """Per site and variant: the five metrics; the site's prevalence, estimate and alignment score."""
    per = report["per_site"]
    priors = report["site_priors"]["plain"]
    head = ["site", "prev", "est.", "variant", *(LABELS[m] for m in METRICS), "align"]
    rows = [head]
    variants = [v for v in TABLE_VARIANTS if v in per]
    for n in [*names, "mean"]:
        for v in variants:
            metrics = report["mean"][v] if n == "mean" else per[v][n]
            run = VARIANTS[v][0]
            score = report["alignment_score"][run].get(n) if n != "mean" else None
            est = priors.get(n, {}).get("estimate") if n != "mean" else None
            rows.append(
                [
                    n if v == "a" else "",
                    f"{prevalence[n]:.2f}" if n != "mean" and v == "a" else "",
                    f"{est:.2f}" if est is not None and v == "b" else "",
                    v,
                    *(_fmt(metrics[m]) for m in METRICS),
                    f"{score:.3f}" if score is not None and v in ("a", "c", "c+loss") else "",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = "; ".join(f"{v} = {VARIANT_NAMES[v]}" for v in variants)
    return "\n".join([f"Per-site test results ({legend}); est. = the site's EM prior estimate", *lines])


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_study(
    report: Mapping[str, Any], names: Sequence[str], prevalence: Mapping[str, float], path: Path
) -> Path:
    """Grouped bars per site (x: sites by prevalence) for log loss, accuracy and AUC of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    variants = [v for v in TABLE_VARIANTS if v in report["per_site"]]
    width = 0.8 / len(variants)
    x = np.arange(len(names))
    for ax, metric in zip(axes, (LOG_LOSS_KEY, ACCURACY_KEY, AUC_KEY), strict=True):
        for i, v in enumerate(variants):
            values = [report["per_site"][v][n][metric] for n in names]
            ax.bar(x + (i - (len(variants) - 1) / 2) * width, values, width, label=VARIANT_NAMES[v])
        ax.set_xticks(x, [f"{n}\np={prevalence[n]:.2f}" for n in names], fontsize=8)
        ax.set_title(LABELS[metric])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Label-shift correction and domain alignment per site "
        f"(global prior {report['global_train_prior']:.2f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
