"""``fedshift evaluate``: a site's model bundle, or saved adapters (with the local parts), on a split."""

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
        description="Load a site's model bundle (--model: its model and corrections, applied as "
        "fedshift predict does) or the global adapters of a checkpoint, with the site-local parts (input "
        "adapter) when a site state directory is given or found beside the data, and print AUC, "
        "accuracy, balanced accuracy, log loss and ECE on one split (any file that has that split).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="site model bundle (or the site's state directory)")
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory")
    p.add_argument("--data", required=True, help=".npz or image folder")
    p.add_argument("--split", default="test", help="train, val or test")
    p.add_argument(
        "--site-state",
        type=Path,
        help="site state directory (default: the data file's directory, if it holds one)",
    )
    p.add_argument(
        "--prior", default="auto", help="with --model: auto, training, none or a JSON prior file (predict's)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=run)


def run_bundle(args: argparse.Namespace) -> int:
    """The bundle's raw and corrected metrics on the split (its corrections applied as predict does)."""
    from fedshift.client.bundle import load_bundle
    from fedshift.client.predict import parse_prior, predict_bundle, read_images
    from fedshift.client.training import device_for
    from fedshift.common.errors import DataError
    from fedshift.common.io import as_jsonable, atomic_write_json
    from fedshift.common.metrics import classification_metrics

    bundle = load_bundle(args.model)
    config = bundle.model_config
    prior = parse_prior(args.prior, config.num_classes)
    data = read_images(
        args.data, args.split, config.image_size, config.num_classes, bundle.class_names, bundle.path.parent
    )
    if data.labels is None:
        raise DataError(
            f"Expected labelled images in {args.data} (an .npz split or a folder root/<class>/), but they "
            "have no labels; run fedshift predict on unlabelled images"
        )
    device = device_for(args.device)
    result = predict_bundle(bundle, data.images, device, prior=prior)
    rows = {"raw": result.raw, "corrected": result.corrected}
    metrics = {k: classification_metrics(data.labels, v) for k, v in rows.items()}
    label = Path(args.data).name
    print(
        f"{label} [{args.split}] bundle {bundle.path} (corrections: {'; '.join(result.applied) or 'none'}):"
    )
    print(f"  {'':<18}" + "".join(f"{k:>12}" for k in rows))
    for key in ("auc", "accuracy", "balanced_accuracy", "ece", "log_loss"):
        print(f"  {key:<18}" + "".join(f"{metrics[k][key]:>12.4f}" for k in rows))
    print(f"  n {len(data.images):>20}")
    for note in result.notes:
        print(f"  note: {note}")
    if args.json:
        summary = {"data": label, "split": args.split, **result.summary(), **metrics}
        atomic_write_json(args.json, as_jsonable(summary))
    return 0


def _saved_split(data: str, state_dir: Path) -> Path | None:
    """The state dir whose saved split a manifest keeps (its decode cache there too), else None with a
    warning: a split made now need not be the one the site trained with."""
    from fedshift.common.data import MANIFEST_SUFFIXES
    from fedshift.common.patient_split import SPLIT_FILE

    if Path(data).suffix.lower() not in MANIFEST_SUFFIXES:
        return None
    if (state_dir / SPLIT_FILE).is_file():
        return state_dir
    logger.warning(
        "No saved split (%s) in %s: the manifest's split is made afresh and may put the site's training "
        "patients in this split; pass --site-state with the site's state directory",
        SPLIT_FILE,
        state_dir,
    )
    return None


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        return run_bundle(args)
    from fedshift.client.site import load_local_state
    from fedshift.client.training import device_for, evaluate
    from fedshift.common.checkpoint import load_checkpoint
    from fedshift.common.data import load_dataset
    from fedshift.common.io import as_jsonable, atomic_write_json
    from fedshift.common.model import build_model

    checkpoint = load_checkpoint(args.checkpoint)
    state_dir = args.site_state or Path(args.data).parent
    dataset = load_dataset(
        args.data,
        image_size=checkpoint.model.image_size,
        require=args.split,
        state_dir=_saved_split(args.data, state_dir),
    )
    data = dataset.split(args.split)
    model = build_model(checkpoint.model)
    model.load_shared_state_dict(checkpoint.arrays)
    local = load_local_state(state_dir)
    if local is not None:
        model.load_local_state_dict(local)
        logger.info("Using the site-local input adapter from %s", state_dir)
    else:
        logger.info("No site-local state found; using the default input adapter")
    device = device_for(args.device)
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
