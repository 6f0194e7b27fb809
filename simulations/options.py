"""The command-line options of an experiment, shared by ``fedshift simulate`` and ``fedshift shift-study``.

One option set: the sites (data, label shift, sizes) and every run-config key an
experiment may set, registered from the config declarations (help, type, range and
choices are the declaration's; :data:`FLAGS` gives some keys the short flags the
README uses). ``shift-study`` is a preset over the same options (other defaults).
:func:`experiment_spec` turns the parsed options into the runner's
:class:`~fedshift.simulations.experiment.ExperimentSpec`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedshift.common import settings
from fedshift.common.config import (
    DP_RECIPE,
    FederationConfig,
    add_arguments,
    run_config_from_arguments,
    with_recipe,
)
from fedshift.common.errors import ConfigError
from fedshift.simulations.attacks import ATTACKS, parse_attacks
from fedshift.simulations.experiment import ExperimentSpec

Spec = TypeVar("Spec", bound=ExperimentSpec)

# run-config key -> its flags, where the short flag differs from --<key> (the long form stays an alias)
FLAGS: dict[str, list[str]] = {
    "num-server-rounds": ["--rounds", "--num-server-rounds"],
    "learning-rate": ["--lr", "--learning-rate"],
    "backbone-weights": ["--weights", "--backbone-weights"],
    "dp-delta": ["--delta", "--dp-delta"],
    "dp-clip-norm": ["--clip-norm", "--dp-clip-norm"],
    "dp-noise-multiplier": ["--noise-multiplier", "--dp-noise-multiplier"],
    "dp-accountant": ["--accountant", "--dp-accountant"],
    "dp-secure-rng": ["--secure-rng", "--dp-secure-rng"],
    "ls-prior-method": ["--prior-method", "--ls-prior-method"],
    "ls-prior-pseudocount": ["--prior-pseudocount", "--ls-prior-pseudocount"],
    "ls-calibration": ["--calibration", "--ls-calibration"],
    "ls-bootstrap": ["--bootstrap", "--ls-bootstrap"],
    "ls-min-samples": ["--min-samples", "--ls-min-samples"],
    "ls-count-noise-multiplier": ["--count-noise", "--ls-count-noise-multiplier"],
    "align-noise-multiplier": ["--align-noise", "--align-noise-multiplier"],
}

# Private by default (issue 14): these commands run every site with DP-SGD at this budget (and the default
# dp-delta) unless --epsilon sets another or --no-dp turns DP off; the others only with --epsilon.
DEFAULT_EPSILON = 8.0
PRIVATE_BY_DEFAULT = ("simulate",)

# the run-config keys an experiment takes from flags, by option group
GROUPS: dict[str, tuple[str, ...]] = {
    "federation": ("num-server-rounds", "local-epochs", "batch-size", "learning-rate", "seed", "device"),
    "model": (
        "backbone",
        "backbone-weights",
        "image-size",
        "adapter-rank",
        "adapter-stages",
        "lr-decay",
        "unfreeze-every",
        "local-norm",
        "head-init",
    ),
    "differential privacy": (
        "dp-delta",
        "dp-clip-norm",
        "dp-noise-multiplier",
        "dp-accountant",
        "dp-secure-rng",
        "dp-epsilon-per-run",
    ),
    "EWC": (
        "ewc-fisher-source",
        "ewc-fisher-samples",
        "ewc-fisher-clip",
        "ewc-fisher-noise-multiplier",
        "ewc-fisher-labels",
    ),
    "label shift and alignment": (
        "ls-correction",
        "ls-prior-method",
        "ls-prior-pseudocount",
        "ls-calibration",
        "ls-bootstrap",
        "ls-min-samples",
        "ls-max-interval-width",
        "ls-threshold",
        "ls-logit-adjust",
        "ls-count-noise-multiplier",
        "align-weight",
        "align-loss",
        "align-dim",
        "align-clip",
        "align-noise-multiplier",
        "align-refresh",
        "align-tta",
    ),
    "aggregation": (
        "aggregation",
        "trim-fraction",
        "update-norm-bound",
        "update-norm-action",
        "max-num-examples",
        "secure-aggregation",
        "secagg-threshold",
        "secagg-clip-range",
        "secagg-neighbours",
        "server-optimizer",
        "server-learning-rate",
        "server-momentum",
        "server-tau",
    ),
}

GROUP_HELP = {
    "differential privacy": (
        "differential privacy (DP-SGD at every site; simulate: on by default, --no-dp turns it off)",
        "Each site's ledger lives in <out>/sites/site-k/. With DP, the DP-aware recipe replaces these "
        "defaults unless you set them: "
        + ", ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in DP_RECIPE.items())
        + ".",
    ),
    "EWC": ("EWC (a Fisher-weighted pull towards each round's global adapters)", None),
    "aggregation": (
        "aggregation at the server: robust rules, update norm bound, secure aggregation, server optimizer",
        "Secure aggregation (SecAgg+) shows the server only the sum of the sites' updates.",
    ),
    "label shift and alignment": (
        "label-shift correction and domain alignment",
        "Post-hoc prior correction at each site (DP label counts), and feature alignment in training.",
    ),
}


def floats(text: str) -> tuple[float, ...]:
    """``--x 0.1,0.5,0.9``: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.1,0.5,0.9, but got {text!r}"
        ) from None


def ints(text: str) -> tuple[int, ...]:
    """``--x 0,1,2``: comma-separated integers (at least one)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, but got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    """``--x a,b``: comma-separated names (at least one)."""
    listed = tuple(v.strip() for v in text.split(",") if v.strip())
    if not listed:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names such as adapters,full, but got {text!r}"
        )
    return listed


def _declared(key: str) -> settings.Setting:
    return settings.setting_of(FederationConfig, key)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once (a declared flag's help already names its own)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_experiment_arguments(
    parser: argparse.ArgumentParser, command: str, defaults: Mapping[str, Any] | None = None
) -> None:
    """Every option of an experiment: the sites, the run-config keys by group, and ``--out``.

    ``defaults`` are a preset's run-config values (shown in the help, used unless the user sets them).
    """
    d = parser.add_argument_group("data and sites")
    d.add_argument(
        "--data", help="MedMNIST-style .npz, .csv/.tsv manifest or image folder; none: SYNTHETIC images"
    )
    d.add_argument(
        "--sites",
        type=int,
        default=4,
        help="number of simulated hospitals; none: one per --prevalences value",
    )
    d.add_argument("--prevalences", type=floats, help="per-site share of class 1, e.g. 0.1,0.5,0.9")
    d.add_argument("--dirichlet-alpha", type=float, help="draw prevalences from Dirichlet(alpha)")
    d.add_argument("--quantity-skew", type=float, default=0.0, help="0 = equal sizes")
    d.add_argument("--max-per-site", type=int, help="cap on images per site")
    d.add_argument("--synthetic-n", type=int, default=2000, help="images to generate without --data")
    d.add_argument(
        "--synthetic-colour",
        action="store_true",
        help="without --data: generate SYNTHETIC H&E-like colour patches (stain-shifted sites) instead of "
        "chest X-rays",
    )
    for group, keys in GROUPS.items():
        title, description = GROUP_HELP.get(group, (group, None))
        g = parser.add_argument_group(title, description)
        add_arguments(g, keys=keys, flags=FLAGS, defaults=defaults)
        if group == "model":
            finetune = _declared("finetune")
            g.add_argument(
                "--finetune",
                "--strategy",
                dest="finetune",
                type=names,
                default=(finetune.default,),
                help=f"{finetune.help}: {', '.join(finetune.names())}; several, comma-separated, compare "
                "them on the same sites in one run (--strategy is an alias); run-config finetune",
            )
        elif group == "differential privacy":
            private = command in PRIVATE_BY_DEFAULT
            g.add_argument(
                "--epsilon",
                type=floats,
                help="privacy budget of every site, e.g. 8, or one per site, e.g. 8,4,8,2 (turns DP-SGD "
                + (f"on; default {DEFAULT_EPSILON:g}" if private else "on")
                + "); run-config dp-epsilon",
            )
            g.add_argument(
                "--no-dp",
                action="store_true",
                help="explicitly without DP (the report says so)"
                + ("" if private else f"; {command} runs without DP unless --epsilon is given"),
            )
            parser.set_defaults(private_by_default=private)
        elif group == "EWC":
            g.add_argument(
                "--ewc-lambda",
                type=floats,
                default=(0.0,),
                help=f"{_declared('ewc-lambda').help} (with --continual: one or more, e.g. 1,10,100, "
                "default 10); run-config ewc-lambda",
            )
    parser.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="KIND[:VALUE]@site-k",
        help="simulation only: one site alters its training replies; repeatable or comma-separated: "
        + "; ".join(ATTACKS.values()),
    )
    parser.add_argument("--out", type=Path, help=f"run directory (default: runs/{command}-<time>)")


def budgets(args: argparse.Namespace) -> tuple[float, ...] | None:
    """The sites' privacy budgets of the options (one, or one per site); ``None``: without DP.

    ``--epsilon``, else :data:`DEFAULT_EPSILON` where the command is private by default, unless ``--no-dp``.
    """
    if args.no_dp and args.epsilon is not None:
        raise ConfigError(
            f"Expected either --epsilon or --no-dp, but got both (--epsilon "
            f"{','.join(f'{e:g}' for e in args.epsilon)}); drop one"
        )
    if args.no_dp:
        return None
    if args.epsilon is not None:
        return tuple(args.epsilon)
    return (DEFAULT_EPSILON,) if args.private_by_default else None


def federation(args: argparse.Namespace, preset: Mapping[str, Any], num_sites: int) -> FederationConfig:
    """The run config of the options: the recipe (with DP: :data:`~fedshift.common.config.DP_RECIPE`), then
    ``preset`` (values the command derives), then the flags' values."""
    epsilon = budgets(args)
    if epsilon is not None and len(epsilon) not in (1, num_sites):
        raise ConfigError(
            f"Expected --epsilon to be one budget or one per site ({num_sites}), but got "
            f"{len(epsilon)} values; pass e.g. --epsilon 8"
        )
    if len(args.ewc_lambda) > 1 and not getattr(args, "continual", False):
        raise ConfigError(
            f"Expected one --ewc-lambda without --continual, but got {len(args.ewc_lambda)} values; pass "
            "one, e.g. --ewc-lambda 10 (several are compared only in the continual scenario)"
        )
    values = with_recipe({**preset, **run_config_from_arguments(args)}, private=epsilon is not None)
    values["finetune"] = args.finetune[0]
    values["ewc-lambda"] = args.ewc_lambda[0]
    if epsilon is not None:
        values.update({"dp": True, "dp-epsilon": max(epsilon)})
    return FederationConfig.from_run_config(values)  # 0 of dp-epsilon(-per-run) reads as "not set"


def reference(args: argparse.Namespace, preset: Mapping[str, Any], num_sites: int) -> FederationConfig:
    """The federation of the same options without DP (``--no-dp``: the non-DP recipe), DP's reference."""
    return federation(argparse.Namespace(**{**vars(args), "epsilon": None, "no_dp": True}), preset, num_sites)


def experiment_spec(
    args: argparse.Namespace, fed: FederationConfig, out: Path, cls: type[Spec], **more: Any
) -> Spec:
    """The runner's :class:`ExperimentSpec` (``cls``, or a preset's subclass) of the options."""
    epsilon = budgets(args)
    several = epsilon is not None and len(epsilon) > 1
    attacks = parse_attacks(args.attack, args.sites)
    if attacks and fed.aggregation.secure:
        raise ConfigError(
            f"Expected --attack without secure aggregation, but got {', '.join(map(str, attacks))} with "
            "secure-aggregation = true: an attack alters a site's plain update, which leaves the site "
            "masked; drop --attack or --secure-aggregation"
        )
    return cls(
        out_dir=out,
        data=args.data,
        sites=args.sites,
        prevalences=args.prevalences,
        dirichlet_alpha=args.dirichlet_alpha,
        quantity_skew=args.quantity_skew,
        max_per_site=args.max_per_site,
        synthetic_n=args.synthetic_n,
        synthetic_colour=args.synthetic_colour,
        site_epsilons=epsilon if several else None,
        attacks=attacks,
        federation=fed,
        **more,
    )


def run_directory(args: argparse.Namespace, command: str) -> Path:
    """``--out``, or ``runs/<command>-<time>``; refused when it already holds files."""
    out: Path = args.out or Path("runs") / time.strftime(f"{command}-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"Expected --out to be a new or empty directory, but {str(out)!r} has files; choose another --out"
        )
    return out
