"""``fedshift simulate``: N shifted hospital sites on one machine, with Flower's simulation engine."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedshift.client.site import SITE_DATA_FILE
from fedshift.common.errors import ConfigError
from fedshift.simulations.options import HelpFormatter, add_experiment_arguments, floats

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a federation of shifted hospital sites on this machine",
        description="Split one dataset into shifted hospital sites (label shift, scanner "
        "profiles, sizes), federate them with Flower's simulation engine, train a local-only "
        "baseline, and write a report. Without --data it uses built-in SYNTHETIC chest X-rays (or, with "
        "--synthetic-colour, SYNTHETIC H&E-like colour patches).",
        formatter_class=HelpFormatter,
    )
    add_experiment_arguments(p, "simulate")
    r = p.add_argument_group("references")
    r.add_argument("--no-baseline", action="store_true", help="skip the local-only baseline")
    r.add_argument("--no-dp-reference", action="store_true", help="with DP: skip the same run without DP")
    r.add_argument(
        "--unseen-sites",
        type=int,
        help="hospitals that never train: at the end each gets the final model, adapts it to its own "
        "unlabelled images (norm statistics, prior) and is scored with and without that; they share the "
        "pool with the trained sites (default: 1 with --data, 0 on SYNTHETIC images)",
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
        type=floats,
        default=(0.3, 0.8),
        help="prevalence of the phase-A and of the phase-B sites",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.simulations.experiment import ExperimentSpec, run_experiment
    from fedshift.simulations.options import budgets, experiment_spec, federation, reference, run_directory

    if args.sites < 1:
        raise ConfigError(f"Expected --sites to be a positive integer, but got {args.sites}")
    preset = {"min-nodes": min(2, args.sites)}
    fed = federation(args, preset, args.sites)
    out = run_directory(args, "simulate")
    check_model(fed, args.finetune)
    spec = experiment_spec(
        args,
        fed,
        out,
        ExperimentSpec,
        baseline=not args.no_baseline,
        dp_reference=reference(args, preset, args.sites)
        if fed.privacy.enabled and not args.no_dp_reference
        else None,
        unseen_sites=args.unseen_sites,
    )
    if args.continual:
        return _continual(spec, args.phase_prevalences, args.ewc_lambda, out)
    if len(args.finetune) > 1:
        return _compare(spec, args.finetune, out)
    report = run_experiment(spec)
    _print_report(report, budgets(args), fed, out)
    return 0


def check_model(fed: Any, finetunes: tuple[str, ...]) -> None:
    """Fail on a bad backbone or device before any data is simulated or Ray is started.

    Inside Ray these would only surface as failed replies from every site. On the CPU
    it also sets this process's thread count (the local-only baseline trains here).
    """
    from fedshift.client.training import configure_threads, resolve_device
    from fedshift.common.model import build_model

    if resolve_device(fed.device).type == "cpu":
        configure_threads()
    for finetune in finetunes:
        build_model(replace(fed.model, finetune=finetune))


def _print_report(report: dict[str, Any], epsilon: tuple[float, ...] | None, fed: Any, out: Path) -> None:
    means = report["mean_test_auc"]
    fed_auc, no_dp_auc, loc_auc = means["federated"], means["federated_no_dp"], means["local_only"]
    print(report["table"])
    for line in ("ewc_line", "negative_transfer_line"):
        if line in report:
            print(report[line])
    if "unseen_table" in report:
        print("\n" + report["unseen_table"])
    if "epsilon_table" in report:
        print("\n" + report["epsilon_table"])
        ledgers = report["privacy"]["ledger_epsilon"]
        print(
            "Ledgers now report: "
            + ", ".join(f"{site} epsilon={eps:.3f}" for site, eps in sorted(ledgers.items()))
            + f" (delta={fed.privacy.delta:g}, accountant {fed.privacy.accountant})"
        )
        for refusal in report["privacy"]["refused"]:
            print(f"Round {refusal['round']}: {refusal['site']} sent no update: {refusal['reason']}")
    budget = ",".join(f"{e:g}" for e in epsilon) if epsilon is not None else ""
    label = f"federated with DP (epsilon <= {budget})" if epsilon is not None else "federated WITHOUT DP"
    print(
        f"\nMean test AUC: {label} {fed_auc:.3f}"
        + (f" | federated without DP {no_dp_auc:.3f}" if no_dp_auc is not None else "")
        + (f" | local-only {loc_auc:.3f}" if loc_auc is not None else "")
    )
    size = report["size"]
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
    _print_next_step(report["bundles"], out)


def _print_next_step(bundles: dict[str, str], out: Path) -> None:
    """Where the sites' model bundles are, and the ``fedshift predict`` command a user types next."""
    if not bundles:
        logger.warning("No site wrote a model bundle; see the sites' logs in %s", out / "sites")
        return
    site, bundle = next(iter(bundles.items()))
    data = Path(bundle).parent / SITE_DATA_FILE
    predictions = str(out / f"predictions-{site}.csv")
    words = ["fedshift", "predict", "--model", bundle, "--images", str(data), "--split", "test", "--out"]
    command = shlex.join([*words, predictions])
    print(f"\nEvery site holds its model bundle ({len(bundles)}: {', '.join(bundles)}). Predict at {site}:")
    print(f"  {command}")


def _compare(spec: Any, finetunes: tuple[str, ...], out: Path) -> int:
    from fedshift.simulations.finetune_compare import FINETUNE_FILE, compare_finetunes

    report = compare_finetunes(spec, finetunes)
    print(report["table"])
    print(
        f"Time: {report['seconds']:.0f} s. Results: {out / FINETUNE_FILE}; one run directory per "
        "fine-tuning choice"
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
