"""``fedshift shift-study``: a preset of the experiment options for label-shift correction and alignment.

The options are ``simulate``'s (:mod:`fedshift.simulations.options`) with the study's
defaults (:data:`PRESET`: real PneumoniaMNIST, five sites of far-apart prevalences,
correction and test-time adaptation on); the study itself is
:func:`fedshift.simulations.shift_study.run_study`, once per ``--seeds`` seed.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError
from fedshift.simulations.options import HelpFormatter, add_experiment_arguments, ints

logger = logging.getLogger(__name__)

DEFAULT_DATA = "../shared/data/pneumoniamnist.npz"

# run-config defaults of the study (the rest are the declarations' defaults)
PRESET: dict[str, Any] = {
    "num-server-rounds": 5,
    "image-size": 32,
    "learning-rate": 3e-3,
    "ls-correction": True,
    "ls-min-samples": 30,
    "ls-threshold": True,
    "align-weight": 0.01,
    "align-clip": 1.0,
    "align-tta": True,
}
# the study's sites: one per prevalence, up to 600 images each (60/20/20 split)
SITES_PRESET: dict[str, Any] = {
    "data": DEFAULT_DATA,
    "sites": None,
    "prevalences": (0.05, 0.1, 0.5, 0.9, 0.95),
    "max_per_site": 600,
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "shift-study",
        help="measure label-shift correction and domain alignment per site (one table, JSON and plot)",
        description="Split one dataset into sites with their own prevalence and scanner profile, "
        "federate them plain and with feature alignment (Flower simulation), and report per site "
        "accuracy, balanced accuracy, log loss, ECE and AUC for (a) plain, (b) + label-shift "
        "correction, (c) + alignment, (d) both and the oracle (true prior). (b), (d) and the oracle "
        "are post-hoc corrections at each site: they cost no training. The options are simulate's, "
        "with the study's defaults; one site per --prevalences value.",
        formatter_class=HelpFormatter,
    )
    add_experiment_arguments(p, "shift-study", PRESET)
    p.set_defaults(**SITES_PRESET)
    p.add_argument(
        "--seeds",
        type=ints,
        help="run the study once per seed (other images, noise, initialisation) into <out>/seed-N and "
        "report the claims over seeds, e.g. 0,1,2 (default: --seed only)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.client.training import configure_threads
    from fedshift.common.io import as_jsonable, atomic_write_json
    from fedshift.simulations.options import experiment_spec, federation, run_directory
    from fedshift.simulations.shift_study import StudySpec, format_seed_summary, run_study, summarize_seeds

    if not args.data or not Path(args.data).is_file():
        raise ConfigError(
            f"Expected --data to be a MedMNIST-layout .npz file, but {args.data!r} does not exist; "
            f"pass e.g. --data {DEFAULT_DATA}"
        )
    if len(args.finetune) > 1:
        raise ConfigError(
            f"Expected one --finetune for shift-study, but got {','.join(args.finetune)}; compare several "
            "with fedshift simulate --finetune a,b"
        )
    if args.sites is None:
        args.sites = len(args.prevalences or ())
    base = federation(args, {}, args.sites)
    out = run_directory(args, "shift-study")
    configure_threads()  # the alignment scores' features are computed here, on the CPU
    seeds = args.seeds or (base.seed,)
    reports = {}
    for seed in seeds:
        fed = replace(base, seed=seed, model=replace(base.model, seed=seed))
        spec = experiment_spec(args, fed, out / f"seed-{seed}" if len(seeds) > 1 else out, StudySpec)
        reports[seed] = run_study(spec)
        _print_study(reports[seed], spec.out_dir)
    if len(seeds) > 1:
        summary = summarize_seeds(reports)
        atomic_write_json(out / "shift_study_seeds.json", as_jsonable(summary))
        print(f"\n{format_seed_summary(summary)}\nSummary: {out / 'shift_study_seeds.json'}")
    return 0


def _print_study(report: dict[str, Any], out: Path) -> None:
    claims = report["claims"]
    print(report["table"])
    ll = claims["mean_log_loss"]
    auc = claims["mean_auc"]
    print(
        f"\nMean per-site log loss: (a) {ll['a']:.4f} -> (b) {ll['b']:.4f} with label-shift correction"
        f" ({'lower' if claims['label_shift_lowers_mean_log_loss'] else 'NOT lower'})"
    )
    for site, acc in claims["far_accuracy"].items():
        print(f"Accuracy at far site {site}: (a) {acc['a']:.3f} -> (b) {acc['b']:.3f}")
    loss = f"; (c) + the alignment loss {auc['c+loss']:.4f}" if "c+loss" in auc else ""
    print(
        f"Mean AUC: (a) {auc['a']:.4f} -> (c) {auc['c']:.4f} with alignment "
        f"({'not lower' if claims['alignment_keeps_mean_auc'] else 'LOWER'}); (b) {auc['b']:.4f}, "
        f"(d) {auc['d']:.4f}{loss}"
    )
    tta = claims["tta_mean_auc"]
    print(
        f"Test-time norm adaptation (an option): mean AUC (a) {tta['a']:.4f} -> {tta['a+tta']:.4f}, "
        f"(c) {tta['c']:.4f} -> {tta['c+tta']:.4f}"
    )
    for run_name, audit in report["egress"].items():
        print(
            f"Egress ({run_name}): {audit['mechanisms']}; uncharged DP statistics {len(audit['uncharged'])}, "
            f"unexpected items {len(audit['unexpected'])}, blocked {len(audit['blocked'])}"
        )
    print(
        f"Time: {report['seconds']['total']:.0f} s. Report: {out / 'shift_study.json'}, "
        f"plot: {out / 'shift_study.png'}"
    )
