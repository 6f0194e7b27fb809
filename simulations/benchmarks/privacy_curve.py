"""The privacy-utility curve: mean per-site test AUC of the same shifted sites at each privacy budget.

    python -m fedshift.simulations.benchmarks.privacy_curve [--data PATH] --sites 5 \\
        --epsilons 1,2,4,8,inf --seeds 0,1,2 --out DIR [any other simulate option]

For every seed the same shifted sites (the seed sets them) are federated by ``fedshift simulate``'s
runner, :func:`~fedshift.simulations.experiment.run_experiment`: once without DP (``--no-dp``: the
non-DP recipe) with the local-only baseline (``<out>/seed-S/no-dp``; it is the curve's ``inf`` point),
and once with DP-SGD at each finite budget (the DP-aware recipe, ``fedshift.common.config.DP_RECIPE``;
``<out>/seed-S/epsilon-E``, without the runner's own no-DP reference and baseline, which the curve
already has). The options are simulate's, with its defaults. Writes ``privacy_curve.json`` (per
budget and seed: the mean per-site test AUC, each site's AUC and its ledger epsilon; the no-DP and
local-only values per seed; mean and sd over seeds) and ``privacy_curve.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.common.errors import ConfigError, FedshiftError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.protocol import AUC_KEY
from fedshift.simulations.options import HelpFormatter, add_experiment_arguments, ints
from fedshift.simulations.report import render_table

logger = logging.getLogger(__name__)

CURVE_FILE = "privacy_curve.json"
PLOT_FILE = "privacy_curve.png"
NO_DP = "inf"  # the curve's key of the run without DP
_EPSILONS_EXAMPLE = "1,2,4,8,inf"


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``--epsilons 1,2,4,8,inf``: distinct budgets > 0 (``inf`` = without DP), sorted ascending."""
    if not text.strip():
        raise ConfigError(
            f"Expected --epsilons to list at least one budget, such as {_EPSILONS_EXAMPLE}, but got {text!r}"
        )
    values: list[float] = []
    for part in text.split(","):
        word = part.strip()
        try:
            value = float(word)
        except ValueError:
            value = math.nan
        if math.isnan(value) or value <= 0:
            raise ConfigError(
                f"Expected --epsilons to be comma-separated budgets > 0 or inf, such as {_EPSILONS_EXAMPLE}, "
                f"but got {word!r} in {text!r}"
            )
        if value in values:
            raise ConfigError(
                f"Expected --epsilons to list each budget once, but got {word!r} twice in {text!r}; drop one"
            )
        values.append(value)
    return tuple(sorted(values))


def epsilon_key(epsilon: float) -> str:
    """The curve's key of a budget: ``"8"``, ``"0.5"``, or ``"inf"`` (without DP)."""
    return NO_DP if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class SeedResult:
    """One run of one seed: its mean per-site test AUC, each site's, and each site's ledger epsilon."""

    mean_auc: float
    site_auc: dict[str, float]
    ledger_epsilon: dict[str, float]  # empty without DP
    run_dir: str


def seed_result(report: Mapping[str, Any], run_dir: Path, group: str = "federated") -> SeedResult:
    """The curve's numbers of one ``run_experiment`` report: ``group`` federated or local_only."""
    per_site = report["federated_test"] if group == "federated" else report["local_only_test"] or {}
    return SeedResult(
        mean_auc=float(report["mean_test_auc"][group]),
        site_auc={site: float(m.get(AUC_KEY, math.nan)) for site, m in sorted(per_site.items())},
        ledger_epsilon=(
            {k: float(v) for k, v in report["privacy"]["ledger_epsilon"].items()}
            if group == "federated"
            else {}
        ),
        run_dir=str(run_dir),
    )


def summarise(per_seed: Mapping[int, SeedResult]) -> dict[str, Any]:
    """Every seed's result, and over seeds: mean and sample sd (ddof 1; nan with one seed) of the mean
    AUC, and the largest epsilon any site's ledger reports (None without DP)."""
    aucs = np.array([per_seed[s].mean_auc for s in sorted(per_seed)], dtype=np.float64)
    spent = [e for r in per_seed.values() for e in r.ledger_epsilon.values()]
    return {
        "per_seed": {str(s): asdict(per_seed[s]) for s in sorted(per_seed)},
        "mean_auc": float(aucs.mean()) if len(aucs) else math.nan,
        "sd_auc": float(aucs.std(ddof=1)) if len(aucs) > 1 else math.nan,
        "ledger_epsilon_max": max(spent) if spent else None,
    }


def curve_report(
    points: Mapping[float, Mapping[int, SeedResult]],
    no_dp: Mapping[int, SeedResult],
    local: Mapping[int, SeedResult],
    **facts: Any,
) -> dict[str, Any]:
    """The JSON of the curve: per budget (``inf``: the no-DP run), the no-DP and local-only values."""
    epsilons = sorted(points)
    return {
        **facts,
        "epsilons": [None if math.isinf(e) else e for e in epsilons],  # None: without DP
        "curve": {
            epsilon_key(e): {"epsilon": None if math.isinf(e) else e, "dp": not math.isinf(e)}
            | summarise(points[e])
            for e in epsilons
        },
        "no_dp": summarise(no_dp),
        "local_only": summarise(local),
    }


def format_table(report: Mapping[str, Any]) -> str:
    """eps | mean AUC of each seed | mean | sd | the largest ledger epsilon; then no DP and local-only."""
    seeds = [str(s) for s in report["seeds"]]
    head = ["epsilon", *(f"AUC s{s}" for s in seeds), "mean", "sd", "ledger eps max"]

    def row(label: str, point: Mapping[str, Any]) -> list[str]:
        per_seed = point["per_seed"]
        spent = point["ledger_epsilon_max"]
        return [
            label,
            *(_fmt(per_seed[s]["mean_auc"]) if s in per_seed else "-" for s in seeds),
            _fmt(point["mean_auc"]),
            _fmt(point["sd_auc"]),
            "-" if spent is None else f"{spent:.3f}",
        ]

    rows = [head]
    for key, point in report["curve"].items():
        rows.append(row("inf (no DP)" if key == NO_DP else key, point))
    if NO_DP not in report["curve"]:
        rows.append(row("no DP", report["no_dp"]))
    rows.append(row("local-only", report["local_only"]))
    title = (
        f"Mean per-site test AUC by privacy budget, {report['data']}, {len(report['sites'])} sites "
        f"(delta={report['delta']:g}, accountant {report['accountant']}; sd over seeds)"
    )
    return render_table(title, rows)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_curve(report: Mapping[str, Any], path: Path) -> Path:
    """Mean per-site test AUC against epsilon (log x axis, error bars: sd over seeds); no-DP and
    local-only as horizontal lines with their sd as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = {float(p["epsilon"]): p for p in report["curve"].values() if p["epsilon"] is not None}
    xs = sorted(finite)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if xs:
        ys = [_num(finite[x]["mean_auc"]) for x in xs]
        errs = [_num(finite[x]["sd_auc"], 0.0) for x in xs]
        ax.errorbar(
            xs, ys, yerr=errs, marker="o", capsize=4, color="C0", label="federated with DP (mean ± sd)"
        )
    lines = (("no_dp", "federated without DP", "--", "C1"), ("local_only", "local-only", ":", "C2"))
    for key, name, style, colour in lines:
        mean, sd = _num(report[key]["mean_auc"]), _num(report[key]["sd_auc"], 0.0)
        ax.axhline(mean, linestyle=style, color=colour, label=f"{name} ({_fmt(mean)})")
        if sd > 0:
            ax.axhspan(mean - sd, mean + sd, color=colour, alpha=0.12)
    ax.set_xscale("log")
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    ax.set_xlabel("privacy budget epsilon per site (log scale)")
    ax.set_ylabel("mean per-site test AUC")
    ax.set_title(f"Privacy-utility curve — {report['data']} (delta={report['delta']:g})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value: float | None, missing: float = math.nan) -> float:
    return missing if value is None or math.isnan(value) else float(value)


def write_curve(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """``privacy_curve.json`` and ``privacy_curve.png`` in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CURVE_FILE, as_jsonable(report))
    return out / CURVE_FILE, plot_curve(report, out / PLOT_FILE)


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written; every option's default once."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedshift.simulations.benchmarks.privacy_curve",
        description=__doc__,
        formatter_class=_Formatter,
    )
    add_experiment_arguments(parser, "privacy-curve")
    parser.add_argument(
        "--epsilons",
        default=_EPSILONS_EXAMPLE,
        help="comma-separated privacy budgets per site, inf = without DP (the no-DP run is always made)",
    )
    parser.add_argument(
        "--seeds",
        type=ints,
        default=(0, 1, 2),
        help="comma-separated seeds (sites, noise, initialisation); overrides --seed",
    )
    parser.add_argument(
        "--unseen-sites",
        type=int,
        help="as simulate's: hospitals that never train (default: 1 with --data, 0 on SYNTHETIC images)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of the curve; writes the JSON and the plot into ``--out``; the report."""
    from fedshift.simulations.cli import check_model
    from fedshift.simulations.experiment import ExperimentSpec, run_experiment
    from fedshift.simulations.options import experiment_spec, federation, reference, run_directory

    epsilons = parse_epsilons(args.epsilons)
    if args.epsilon is not None or args.no_dp:
        given = "--no-dp" if args.epsilon is None else f"--epsilon {','.join(map(str, args.epsilon))}"
        raise ConfigError(
            f"Expected the budgets in --epsilons (inf = without DP), but got {given}; "
            f"pass e.g. --epsilons {_EPSILONS_EXAMPLE}"
        )
    if args.sites < 1:
        raise ConfigError(f"Expected --sites to be a positive integer, but got {args.sites}")
    if len(args.finetune) > 1:
        raise ConfigError(
            f"Expected one --finetune, but got {','.join(args.finetune)}; run the curve once per choice"
        )
    out = run_directory(args, "privacy-curve")
    preset = {"min-nodes": min(2, args.sites)}  # simulate's
    started = time.time()
    points: dict[float, dict[int, SeedResult]] = {e: {} for e in epsilons}
    no_dp: dict[int, SeedResult] = {}
    local: dict[int, SeedResult] = {}
    last: dict[str, Any] = {}
    for seed in args.seeds:
        sites: Any = None
        for epsilon in (math.inf, *(e for e in epsilons if not math.isinf(e))):
            budget = argparse.Namespace(**{**vars(args), "epsilon": (epsilon,), "no_dp": False})
            if math.isinf(epsilon):  # simulate's --no-dp run (the non-DP recipe), as simulate's own reference
                fed = reference(args, preset, args.sites)
            else:
                fed = federation(budget, preset, args.sites)
            fed = replace(fed, seed=seed, model=replace(fed.model, seed=seed))
            check_model(fed, args.finetune)  # and the thread count: the local-only baseline trains here
            run_dir = out / f"seed-{seed}" / ("no-dp" if math.isinf(epsilon) else f"epsilon-{epsilon:g}")
            spec = experiment_spec(
                budget,
                fed,
                run_dir,
                ExperimentSpec,
                baseline=math.isinf(epsilon),
                unseen_sites=args.unseen_sites,
            )
            logger.info("Seed %d, epsilon %s: %s", seed, epsilon_key(epsilon), run_dir)
            last = run_experiment(spec)
            if sites is None:
                sites = last["sites"]
            elif as_jsonable(last["sites"]) != as_jsonable(sites):
                raise RuntimeError(f"Seed {seed} built other sites at epsilon {epsilon:g} than without DP")
            result = seed_result(last, run_dir)
            if math.isinf(epsilon):
                no_dp[seed] = result
                local[seed] = seed_result(last, run_dir, "local_only")
            if epsilon in points:
                points[epsilon][seed] = result
    report = curve_report(
        points,
        no_dp,
        local,
        data=last["data"],
        synthetic=last["synthetic"],
        sites=[s["site"] for s in last["sites"]],
        seeds=list(args.seeds),
        delta=fed.privacy.delta,
        accountant=fed.privacy.accountant,
        run_config=fed.to_run_config(),  # the last run's; every run directory has its config.json
        seconds=time.time() - started,
    )
    json_path, png_path = write_curve(report, out)
    print(format_table(report))
    print(f"Time: {report['seconds']:.0f} s. Curve: {json_path}, plot: {png_path}; one run directory per run")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a mistake in the options ends in one line on stderr and exit code 2."""
    from fedshift.common.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        run(args)
    except FedshiftError as exc:
        print(f"privacy_curve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
