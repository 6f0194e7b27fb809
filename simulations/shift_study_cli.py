"""``fedshift shift-study``: label-shift correction and domain alignment on shifted sites, in one run."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_DATA = "../shared/data/pneumoniamnist.npz"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.05,0.5,0.95, but got {text!r}"
        ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, but got {text!r}")
    return values


def register(sub: Any) -> None:
    p = sub.add_parser(
        "shift-study",
        help="measure label-shift correction and domain alignment per site (one table, JSON and plot)",
        description="Split one dataset into sites with their own prevalence and scanner profile, "
        "federate them plain and with feature alignment (Flower simulation), and report per site "
        "accuracy, balanced accuracy, log loss, ECE and AUC for (a) plain, (b) + label-shift "
        "correction, (c) + alignment, (d) both and the oracle (true prior). (b), (d) and the oracle "
        "are post-hoc corrections at each site: they cost no training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="MedMNIST-layout .npz")
    p.add_argument("--prevalences", type=_floats, default=(0.05, 0.1, 0.5, 0.9, 0.95), help="one per site")
    p.add_argument(
        "--max-per-site",
        type=int,
        default=600,
        help="images per site, fewer if the pool runs out (60/20/20 split)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    p.add_argument("--image-size", type=int, default=32, help="input side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=_ints,
        help="run the study once per seed (other images, noise, initialisation) into <out>/seed-N and "
        "report the claims over seeds, e.g. 0,1,2 (default: --seed only)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--prior-method", default="em", choices=["em", "bbse"], help="site prior estimator")
    p.add_argument(
        "--prior-pseudocount",
        type=float,
        default=1.0,
        help="EM: Dirichlet pseudo-count per class (1 = Laplace MAP, 0 = maximum likelihood)",
    )
    p.add_argument("--calibration", default="bcts", choices=["bcts", "ts", "vs", "none"])
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of the prior interval")
    p.add_argument("--min-samples", type=int, default=30, help="fewer unlabeled images: no correction")
    p.add_argument("--count-noise", type=float, default=2.0, help="noise multiplier of the DP label counts")
    p.add_argument(
        "--align-weight",
        type=float,
        default=0.01,
        help="weight of the feature-alignment loss (run c+loss; 0: no such run)",
    )
    p.add_argument(
        "--align-loss",
        default="prototype",
        choices=["prototype", "coral"],
        help="prototype: class-conditional means; coral: marginal moments",
    )
    p.add_argument("--align-dim", type=int, default=16, help="random projection dimension of the features")
    p.add_argument("--align-clip", type=float, default=1.0, help="L2 bound of a projected feature (DP)")
    p.add_argument("--align-noise", type=float, default=3.0, help="noise multiplier of the DP moments")
    p.add_argument(
        "--epsilon", type=float, help="train with DP-SGD at this budget per site (default: no DP-SGD)"
    )
    p.add_argument("--out", type=Path, help="run directory (default: runs/shift-study-<time>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.common.config import FederationConfig, PrivacyConfig, TrainConfig
    from fedshift.common.io import as_jsonable, atomic_write_json
    from fedshift.common.model import ModelConfig
    from fedshift.common.shift_config import ShiftConfig
    from fedshift.simulations.shift_study import StudySpec, format_seed_summary, run_study, summarize_seeds

    if not Path(args.data).is_file():
        raise ConfigError(
            f"Expected --data to be a MedMNIST-layout .npz file, but {args.data!r} does not exist; "
            f"pass e.g. --data {DEFAULT_DATA}"
        )
    out = args.out or Path("runs") / time.strftime("shift-study-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"Expected --out to be a new or empty directory, but {str(out)!r} has files")
    federation = FederationConfig(
        num_rounds=args.rounds,
        device=args.device,
        seed=args.seed,
        model=ModelConfig(image_size=args.image_size, seed=args.seed),
        train=TrainConfig(local_epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=args.lr),
        privacy=PrivacyConfig(enabled=args.epsilon is not None, epsilon=args.epsilon or float("nan")),
        shift=ShiftConfig(
            correction=True,
            prior_method=args.prior_method,
            prior_pseudocount=args.prior_pseudocount,
            calibration=args.calibration,
            bootstrap=args.bootstrap,
            min_samples=args.min_samples,
            threshold=True,
            count_noise=args.count_noise,
            align_weight=args.align_weight,
            align_loss=args.align_loss,
            align_dim=args.align_dim,
            align_clip=args.align_clip,
            align_noise=args.align_noise,
            tta=True,
        ),
    )
    seeds = args.seeds or (args.seed,)
    reports = {}
    for seed in seeds:
        fed = replace(federation, seed=seed, model=replace(federation.model, seed=seed))
        spec = StudySpec(
            out_dir=out / f"seed-{seed}" if len(seeds) > 1 else out,
            data=args.data,
            prevalences=args.prevalences,
            max_per_site=args.max_per_site,
            federation=fed,
        )
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
