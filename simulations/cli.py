"""``fedshift simulate``: N shifted hospital sites on one machine, with Flower's simulation engine."""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError

logger = logging.getLogger(__name__)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.1,0.5,0.9, but got {text!r}"
        ) from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names such as adapters,full, but got {text!r}"
        )
    return names


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a federation of shifted hospital sites on this machine",
        description="Split one dataset into shifted hospital sites (label shift, scanner "
        "profiles, sizes), federate them with Flower's simulation engine, train a local-only "
        "baseline, and write a report. Without --data it uses built-in SYNTHETIC chest X-rays.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data and sites")
    d.add_argument("--data", help="MedMNIST-style .npz or an image folder (default: SYNTHETIC)")
    d.add_argument("--sites", type=int, default=4, help="number of simulated hospitals")
    d.add_argument("--prevalences", type=_floats, help="per-site share of class 1, e.g. 0.1,0.5,0.9")
    d.add_argument("--dirichlet-alpha", type=float, help="draw prevalences from Dirichlet(alpha)")
    d.add_argument("--quantity-skew", type=float, default=0.0, help="0 = equal sizes")
    d.add_argument("--max-per-site", type=int, help="cap on images per site")
    d.add_argument("--synthetic-n", type=int, default=2000, help="images to generate without --data")
    f = p.add_argument_group("federation")
    f.add_argument("--rounds", type=int, default=10, help="federated rounds")
    f.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    f.add_argument("--no-baseline", action="store_true", help="skip the local-only baseline")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="efficientnet_lite0", help="registered or timm name")
    m.add_argument("--weights", default="", help="local .pth/.safetensors for --backbone")
    m.add_argument("--image-size", type=int, default=64, help="input side in pixels")
    m.add_argument("--adapter-rank", type=int, default=4, help="LoRA rank (0 = head only)")
    m.add_argument("--adapter-stages", type=int, default=2, help="LoRA in the last k stages")
    m.add_argument(
        "--strategy",
        type=_names,
        default=("adapters",),
        help="fine-tuning strategy: adapters, linear-probe, partial (every weight of the last "
        "--adapter-stages stages), norm-only or full; several, comma-separated (e.g. "
        "adapters,linear-probe,partial,norm-only,full), compares them on the same sites in one run",
    )
    m.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        help="discriminative learning rates: each level deeper (head, last stage, ...) learns at "
        "lr * decay**depth; 1 = one rate",
    )
    m.add_argument(
        "--unfreeze-every",
        type=int,
        default=0,
        help="progressive unfreezing: the head trains alone, one level deeper opens every N rounds; 0 = off",
    )
    m.add_argument(
        "--no-local-norm",
        action="store_true",
        help="share nothing but LoRA and head, and keep norm layers frozen (default: FedBN-style "
        "site-local norm affines in the adapted stages)",
    )
    q = p.add_argument_group(
        "differential privacy (DP-SGD at every site; on when --epsilon is given)",
        "Each site's ledger lives in <out>/sites/site-k/; the same run without DP is printed beside it.",
    )
    q.add_argument(
        "--epsilon",
        type=_floats,
        help="privacy budget of every site, e.g. 8, or one per site, e.g. 8,4,8,2 (turns DP-SGD on)",
    )
    q.add_argument("--delta", type=float, default=1e-5, help="delta of the budget (<= 1/n and 1e-5)")
    q.add_argument("--clip-norm", type=float, default=1.0, help="per-sample gradient norm bound C")
    q.add_argument(
        "--noise-multiplier",
        type=float,
        default=0.0,
        help="sigma; 0 = the smallest that fits the budget over all rounds",
    )
    q.add_argument("--accountant", default="rdp", choices=["rdp", "prv"], help="Opacus accountant")
    q.add_argument("--secure-rng", action="store_true", help="noise from the OS CSPRNG (production)")
    q.add_argument("--no-dp-reference", action="store_true", help="skip the same run without DP")
    e = p.add_argument_group("EWC (a Fisher-weighted pull towards each round's global adapters)")
    e.add_argument(
        "--ewc-lambda",
        type=_floats,
        default=(0.0,),
        help="penalty strength; 0 = off (with --continual: one or more, e.g. 1,10,100, default 10)",
    )
    e.add_argument(
        "--ewc-fisher-source",
        default="dp",
        choices=["dp", "public", "none"],
        help="dp: site data under DP, charged to the ledger; public: synthetic images; none: F = 1",
    )
    c = p.add_argument_group(
        "continual scenario (--continual)",
        "Half the sites federate in phase A; the other half, with another scanner and prevalence, "
        "join in phase B from phase A's adapters, once without EWC and once with EWC towards phase "
        "A's consolidated anchor and Fisher. Reports forgetting and phase-B AUC.",
    )
    c.add_argument("--continual", action="store_true", help="run the two-phase continual scenario")
    c.add_argument(
        "--phase-prevalences",
        type=_floats,
        default=(0.3, 0.8),
        help="prevalence of the phase-A and of the phase-B sites",
    )
    p.add_argument("--out", type=Path, help="run directory (default: runs/simulate-<time>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.common.config import EWCConfig, FederationConfig, PrivacyConfig, TrainConfig
    from fedshift.common.model import ModelConfig
    from fedshift.simulations.experiment import ExperimentSpec, run_experiment

    if args.sites < 1:
        raise ConfigError(f"Expected --sites to be a positive integer, but got {args.sites}")
    if args.epsilon is not None and len(args.epsilon) not in (1, args.sites):
        raise ConfigError(
            f"Expected --epsilon to be one budget or one per site ({args.sites}), but got "
            f"{len(args.epsilon)} values; pass e.g. --epsilon 8"
        )
    if len(args.ewc_lambda) > 1 and not args.continual:
        raise ConfigError(
            f"Expected one --ewc-lambda without --continual, but got {len(args.ewc_lambda)} values; pass "
            "one, e.g. --ewc-lambda 10 (several are compared only in the continual scenario)"
        )
    site_budgets = tuple(args.epsilon) if args.epsilon is not None and len(args.epsilon) > 1 else None
    out = args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"Expected --out to be a new or empty directory, but {str(out)!r} has files; choose another --out"
        )
    federation = FederationConfig(
        num_rounds=args.rounds,
        min_nodes=min(2, args.sites),
        device=args.device,
        seed=args.seed,
        model=ModelConfig(
            backbone=args.backbone,
            weights=args.weights,
            image_size=args.image_size,
            adapter_rank=args.adapter_rank,
            adapter_stages=args.adapter_stages,
            local_norm=not args.no_local_norm,
            seed=args.seed,
            finetune=args.strategy[0],
        ),
        train=TrainConfig(
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_decay=args.lr_decay,
            unfreeze_every=args.unfreeze_every,
        ),
        privacy=PrivacyConfig(
            enabled=args.epsilon is not None,
            epsilon=max(args.epsilon) if args.epsilon else math.nan,
            delta=args.delta,
            clip_norm=args.clip_norm,
            noise_multiplier=args.noise_multiplier,
            accountant=args.accountant,
            secure_rng=args.secure_rng,
        ),
        ewc=EWCConfig(lam=args.ewc_lambda[0], fisher_source=args.ewc_fisher_source),
    )
    # Fail on a bad backbone or device before any data is simulated or Ray is started:
    # inside Ray these would only surface as failed replies from every site.
    from fedshift.client.training import resolve_device
    from fedshift.common.model import build_model

    resolve_device(args.device)
    for strategy in args.strategy:
        build_model(replace(federation.model, finetune=strategy))
    spec = ExperimentSpec(
        out_dir=out,
        data=args.data,
        sites=args.sites,
        prevalences=args.prevalences,
        dirichlet_alpha=args.dirichlet_alpha,
        quantity_skew=args.quantity_skew,
        max_per_site=args.max_per_site,
        synthetic_n=args.synthetic_n,
        baseline=not args.no_baseline,
        dp_reference=not args.no_dp_reference,
        site_epsilons=site_budgets,
        federation=federation,
    )
    if args.continual:
        return _continual(spec, args.phase_prevalences, args.ewc_lambda, out)
    if len(args.strategy) > 1:
        return _compare(spec, args.strategy, out)
    report = run_experiment(spec)
    size = report["size"]
    means = report["mean_test_auc"]
    fed_auc, no_dp_auc, loc_auc = means["federated"], means["federated_no_dp"], means["local_only"]
    print(report["table"])
    if "ewc_line" in report:
        print(report["ewc_line"])
    if "negative_transfer_line" in report:
        print(report["negative_transfer_line"])
    if "epsilon_table" in report:
        print("\n" + report["epsilon_table"])
        ledgers = report["privacy"]["ledger_epsilon"]
        print(
            "Ledgers now report: "
            + ", ".join(f"{site} epsilon={eps:.3f}" for site, eps in sorted(ledgers.items()))
            + f" (delta={args.delta:g}, accountant {args.accountant})"
        )
        for refusal in report["privacy"]["refused"]:
            print(f"Round {refusal['round']}: {refusal['site']} sent no update: {refusal['reason']}")
    budget = ",".join(f"{e:g}" for e in args.epsilon) if args.epsilon is not None else ""
    label = f"federated with DP (epsilon <= {budget})" if args.epsilon is not None else "federated"
    print(
        f"\nMean test AUC: {label} {fed_auc:.3f}"
        + (f" | federated without DP {no_dp_auc:.3f}" if no_dp_auc is not None else "")
        + (f" | local-only {loc_auc:.3f}" if loc_auc is not None else "")
    )
    print(
        f"Shared adapters: {size['shared_params']:,} parameters, {size['shared_bytes']:,} bytes "
        f"= {100 * size['shared_bytes'] / size['backbone_bytes']:.2f}% of the frozen backbone "
        f"({size['backbone_params']:,} parameters, {size['backbone_bytes']:,} bytes); max sent "
        f"per client per round: {100 * report['max_bytes_fraction_of_backbone']:.2f}%"
    )
    secs = report["seconds"]
    print(
        f"Time: {secs['total']:.0f} s (federated {secs['federated']:.0f} s, without DP "
        f"{secs['federated_no_dp']:.0f} s, local-only {secs['local_only']:.0f} s). Run directory: {out}"
    )
    if math.isnan(fed_auc):
        logger.warning("No site reported a test AUC; see %s", out / "results.json")
    return 0


def _compare(spec: Any, strategies: tuple[str, ...], out: Path) -> int:
    from fedshift.simulations.strategies import STRATEGIES_FILE, compare_strategies

    report = compare_strategies(spec, strategies)
    print(report["table"])
    print(
        f"Time: {report['seconds']:.0f} s. Results: {out / STRATEGIES_FILE}; one run directory per strategy"
    )
    return 0


def _continual(spec: Any, prevalences: tuple[float, ...], lambdas: tuple[float, ...], out: Path) -> int:
    from fedshift.simulations.continual import CONTINUAL_FILE, run_continual

    if len(prevalences) != 2:
        raise ConfigError(
            f"Expected --phase-prevalences to be two numbers (phase A, phase B), but got {prevalences}; "
            "pass e.g. 0.3,0.8"
        )
    chosen = tuple(lam for lam in lambdas if lam > 0) or (10.0,)
    report = run_continual(spec, prevalence_a=prevalences[0], prevalence_b=prevalences[1], ewc_lambdas=chosen)
    print(report["table"])
    print(f"Time: {report['seconds']:.0f} s. Results: {out / CONTINUAL_FILE}")
    return 0
