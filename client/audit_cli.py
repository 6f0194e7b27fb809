"""``fedshift audit``: an empirical privacy audit of a site's DP-SGD round (:mod:`fedshift.client.audit`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError

logger = logging.getLogger(__name__)

# the training recipe the audited round runs (the coordinator's run config, default: fedshift's)
RECIPE_KEYS = (
    "backbone",
    "backbone-weights",
    "image-size",
    "image-channels",
    "num-classes",
    "adapter-rank",
    "adapter-stages",
    "local-norm",
    "finetune",
    "local-epochs",
    "batch-size",
    "learning-rate",
    "lr-decay",
    "device",
)
# a simulated site's DP settings (--data); a deployed site's come from its own site.toml only
DP_KEYS = ("dp", "dp-epsilon", "dp-delta", "dp-clip-norm", "dp-noise-multiplier", "dp-accountant")
DP_DEFAULTS = {"dp": True, "dp-epsilon": 8.0}


def register(sub: Any) -> None:
    from fedshift.client.audit import CANARY_KINDS, DEFAULT_AUDIT_SIZE, DEFAULT_CANARIES
    from fedshift.common.config import add_arguments

    p = sub.add_parser(
        "audit",
        help="audit a site's DP-SGD empirically with canaries",
        description="Train one round as the site trains a run's first round (its recipe and DP settings, "
        "the whole budget in that round, Opacus, the real optimizer, the cross-entropy objective) on a "
        "throw-away copy of --audit-size of its training images holding canaries, each included with "
        "probability 1/2; score every canary from the shared tensors the "
        "round would release; print the epsilon the settings claim beside the empirical lower bound "
        "(95%, one-run theorem of Steinke, Nasr and Jagielski 2023) and the membership-inference AUC. "
        "Nothing is sent or charged; the result goes to <state-dir>/audits/. A lower bound above the "
        "claimed epsilon is evidence of a bug; a bound below it proves nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="a hospital's site TOML: its data, state and DP settings")
    where.add_argument("--data", type=Path, help="a (simulated) site's data: .npz or manifest")
    p.add_argument(
        "--state-dir", type=Path, help="with --data: where audits/ goes (default: beside the data)"
    )
    p.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, help="number of canaries m")
    p.add_argument("--canary-kind", choices=CANARY_KINDS, default="mislabelled", help="what a canary is")
    p.add_argument(
        "--audit-size",
        type=int,
        default=DEFAULT_AUDIT_SIZE,
        help="training images the audited round runs on, a random subset of the split (0: all); smaller "
        "sets give the attacker more power, and the claim is computed for the size audited",
    )
    p.add_argument("--audit-seed", type=int, default=0, help="seed of the canaries and their coin flips")
    p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    add_arguments(p.add_argument_group("training recipe (the run config's keys)"), keys=RECIPE_KEYS)
    add_arguments(
        p.add_argument_group(
            "differential privacy, with --data only (default there: --dp --dp-epsilon 8; a site.toml sets "
            "its own)"
        ),
        keys=DP_KEYS,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.client.audit import run_audit, save_audit
    from fedshift.client.site import SiteSettings
    from fedshift.common.config import FederationConfig, run_config_from_arguments
    from fedshift.common.io import as_jsonable, atomic_write_json

    values = run_config_from_arguments(args)
    recipe = {k: v for k, v in values.items() if k in RECIPE_KEYS}
    if args.config is not None:
        from fedshift.deploy.settings import ClientSettings

        given = [k for k in DP_KEYS if k in values]
        if given or args.state_dir is not None:
            flags = ", ".join(f"--{k}" for k in given) or "--state-dir"
            raise ConfigError(
                f"Expected no {flags} with --config: a hospital's DP settings and state directory come "
                f"only from its site TOML ({args.config}); drop the flag, or audit with --data"
            )
        fed = FederationConfig.from_run_config(recipe)
        site = SiteSettings.from_node_config(ClientSettings.load(args.config).node_config, fed)
    else:
        if not args.data.exists():
            raise ConfigError(
                f"Expected --data to be a site's .npz or manifest, but {args.data} does not exist"
            )
        fed = FederationConfig.from_run_config({**DP_DEFAULTS, **values})
        state_dir = args.state_dir if args.state_dir is not None else args.data.parent
        site = SiteSettings(args.data.stem, args.data, state_dir, fed.device, fed.privacy)
    result = run_audit(
        fed,
        site,
        canaries=args.canaries,
        kind=args.canary_kind,
        audit_size=args.audit_size,
        seed=args.audit_seed,
    )
    path = save_audit(site.state_dir, result)
    print(result.table())
    print(f"saved {path}")
    if args.json is not None:
        atomic_write_json(args.json, as_jsonable(result.to_dict()))
    return 0
