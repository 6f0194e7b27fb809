"""``fedshift evaluate``: saved adapters (plus the site's local parts) on a dataset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a dataset",
        description="Load the global adapters of a checkpoint, and the site-local parts (input "
        "adapter) when a site state directory is given or found beside the data, and print AUC, "
        "accuracy, balanced accuracy and ECE on one split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help=".npz or image folder")
    p.add_argument("--split", default="test", help="train, val or test")
    p.add_argument(
        "--site-state",
        type=Path,
        help="site state directory (default: the data file's directory, if it holds one)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.client.site import load_local_state
    from fedshift.client.training import configure_threads, evaluate, resolve_device
    from fedshift.common.checkpoint import load_checkpoint
    from fedshift.common.data import load_dataset
    from fedshift.common.io import as_jsonable, atomic_write_json
    from fedshift.common.model import build_model

    checkpoint = load_checkpoint(args.checkpoint)
    dataset = load_dataset(args.data, image_size=checkpoint.model.image_size)
    data = dataset.split(args.split)
    model = build_model(checkpoint.model)
    model.load_shared_state_dict(checkpoint.arrays)
    state_dir = args.site_state or Path(args.data).parent
    local = load_local_state(state_dir)
    if local is not None:
        model.load_local_state_dict(local)
        logger.info("Using the site-local input adapter from %s", state_dir)
    else:
        logger.info("No site-local state found; using the default input adapter")
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_threads()
    metrics = evaluate(model, data, device)
    print(f"{dataset.label} [{args.split}] round {checkpoint.round} checkpoint:")
    for key in ("auc", "accuracy", "balanced_accuracy", "ece", "log_loss", "n"):
        print(f"  {key:<18} {metrics[key]:.4f}" if key != "n" else f"  n {int(metrics['n']):>20}")
    if args.json:
        atomic_write_json(
            args.json,
            as_jsonable({"data": dataset.label, "split": args.split, "round": checkpoint.round, **metrics}),
        )
    return 0
