"""``fedshift predict``: a site's bundle on new images, with its corrections; one CSV row per image."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshift.common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from fedshift.client.bundle import SiteBundle
    from fedshift.client.inference import Inference, Prior, Threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Images:
    """Images to predict on, their ids, their labels (``None``: unlabeled) and the class names."""

    images: np.ndarray
    ids: list[str]
    labels: np.ndarray | None
    class_names: tuple[str, ...]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict on new images with a site's model bundle and its corrections",
        description="Apply a site's model bundle (calibration, label-shift prior, threshold) to images and "
        "write one CSV row per image: its id, the raw and corrected class probabilities, the predicted "
        "class and the threshold used. With labels, also print the metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="bundle folder (or the site's state directory)")
    p.add_argument(
        "--images", required=True, help="image folder (labelled or not), .npz or .csv/.tsv manifest"
    )
    p.add_argument("--out", type=Path, required=True, help="predictions CSV to write")
    p.add_argument(
        "--split", default="test", help="the split of an .npz, a split-layout folder or a manifest with one"
    )
    p.add_argument(
        "--prior",
        default="auto",
        help="auto (estimated on these images), training (no prior change), none (the model's own "
        'probabilities) or a JSON file with {"prior": [p_0, ..., p_C-1]}',
    )
    p.add_argument("--tta", action="store_true", help="adapt the norm statistics to these images first")
    p.add_argument("--threshold", help="site (the site's validation-chosen threshold) or a number in (0, 1)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument(
        "--explain",
        type=Path,
        metavar="DIR",
        help="also write Grad-CAM overlays (PNG) of the predicted class into this folder (replaced whole)",
    )
    p.add_argument(
        "--explain-k", type=int, default=8, metavar="K", help="how many images --explain covers (the first K)"
    )
    p.set_defaults(func=run)


def read_images(
    path: str | Path,
    split: str,
    image_size: int,
    num_classes: int,
    class_names: tuple[str, ...] | None = None,
    state_dir: Path | None = None,
) -> Images:
    """An unlabeled folder of images, a labelled folder (``<class>/`` or ``<split>/<class>/``), an .npz or a
    manifest (every row; a split column's or ``state_dir``'s saved split's ``split`` when it has one).

    Folder images are named by their paths relative to ``path``; their class folders
    are the model's ``class_names`` by name, or (``None``) its classes in sorted order.
    """
    from fedshift.common import data as loaders
    from fedshift.common import image_folders as folders

    p = Path(path)
    if p.is_dir() and not any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir()):
        images, files = folders.load_unlabeled_folder(p, image_size)  # no class folders: no labels
        return Images(images, files, None, class_names or loaders.default_class_names(num_classes))
    if p.suffix.lower() == ".npz" and not p.is_dir():  # labels optional, any classes
        return _npz_images(p, split, num_classes, class_names)
    if p.suffix.lower() in loaders.MANIFEST_SUFFIXES and not p.is_dir():  # labels optional; no split made
        return _manifest_images(p, split, image_size, num_classes, class_names, state_dir)
    dataset = loaders.load_dataset(p, image_size=image_size, require=split)
    if p.is_dir() and split not in dataset.splits:  # root/<class>/ images: one split, whatever its name
        split = next(iter(dataset.splits))
    data = dataset.split(split)
    if not len(data):
        raise DataError(f"Expected images in split '{split}' of {p}, but it has none; pass another --split")
    ids = [f.relative_to(p).as_posix() for f in folders.image_folder_files(p, require=split)[split]]
    labels = _model_labels(data.labels, dataset.class_names, class_names, num_classes, p)
    return Images(data.images, ids, labels, class_names or dataset.class_names)


def _npz_images(path: Path, split: str, num_classes: int, class_names: tuple[str, ...] | None) -> Images:
    """One split of an ``.npz``: its images, ids ``<split>:<i>`` and its labels if it stores them."""
    from fedshift.common.data import default_class_names, load_npz_split

    images, labels, stored = load_npz_split(path, split)
    if not len(images):
        raise DataError(
            f"Expected images in split '{split}' of {path}, but it has none; pass another --split"
        )
    if labels is not None and len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"Expected labels below {num_classes} (the model's classes) in split '{split}' of {path}, but "
            f"got {int(labels.max())}; predict with the model these labels belong to"
        )
    if stored is not None and len(stored) < num_classes:
        stored = None
    names = (class_names or stored or default_class_names(num_classes))[:num_classes]
    return Images(images, [f"{split}:{i}" for i in range(len(images))], labels, tuple(names))


def _manifest_images(
    path: Path,
    split: str,
    image_size: int,
    num_classes: int,
    class_names: tuple[str, ...] | None,
    state_dir: Path | None,
) -> Images:
    """A manifest's rows (only ``split``'s when it has a split column, or when the site that trained on it
    saved its split in ``state_dir``), ids their paths, labels if given (mapped by the model's classes)."""
    from fedshift.common.data import default_class_names
    from fedshift.common.manifest import manifest_images

    images, ids, labels, names = manifest_images(path, image_size, split=split, class_names=class_names)
    images, ids, labels = _saved_split_rows(path, split, state_dir, images, ids, labels)
    named = names is not None and names != default_class_names(len(names))  # class names, not indices
    if labels is not None and class_names is None and named and len(names or ()) != num_classes:
        raise DataError(
            f"Expected the labels of {path} to name the model's {num_classes} classes, but they name "
            f"{len(names or ())} ({', '.join(names or ())}) and the bundle names none to map them to; "
            f"label the rows with class indices 0..{num_classes - 1}"
        )
    if labels is not None and names is not None and len(names) > num_classes:
        raise DataError(
            f"Expected at most {num_classes} classes (the model's) in {path}, but its labels name "
            f"{len(names)} ({', '.join(names)}); predict with the model these labels belong to"
        )
    chosen = class_names or (names if names is not None and len(names) == num_classes else None)
    return Images(images, ids, labels, chosen or default_class_names(num_classes))


def _saved_split_rows(
    path: Path,
    split: str,
    state_dir: Path | None,
    images: np.ndarray,
    ids: list[str],
    labels: np.ndarray | None,
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Only the rows the site's saved split puts in ``split``, for a manifest without a split column that the
    site trained on (every row otherwise: new patients)."""
    from fedshift.common.manifest import read_manifest
    from fedshift.common.patient_split import read_saved_image_splits

    saved = read_saved_image_splits(state_dir)
    if not saved or read_manifest(path, min_classes=1, labelled=False).has_split or not set(ids) & set(saved):
        return images, ids, labels
    keep = [i for i, row in enumerate(ids) if saved.get(row) == split]
    if not keep:
        raise DataError(
            f"Expected rows of {path} in the site's saved '{split}' split ({state_dir}), but none is; pass "
            "another --split"
        )
    logger.info("%d of %d rows of %s: the site's saved '%s' split", len(keep), len(ids), path, split)
    return images[keep], [ids[i] for i in keep], None if labels is None else labels[keep]


def _model_labels(
    labels: np.ndarray, folders: tuple[str, ...], names: tuple[str, ...] | None, num_classes: int, root: Path
) -> np.ndarray:
    """Class-folder indices as the model's class indices: by name, or in sorted order without names."""
    if names is None:
        if len(folders) != num_classes:
            raise DataError(
                f"Expected {num_classes} class folders in {root} (the bundle names no classes: they map "
                f"to the model's in sorted order), but found {len(folders)} ({', '.join(folders)}); "
                "keep one folder per class"
            )
        return labels
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(
            f"Expected class folders named after the model's classes ({', '.join(names)}), but {root} has "
            f"{unknown[0]!r}; rename or remove that folder"
        )
    return np.array([names.index(f) for f in folders], dtype=np.int64)[labels]


def parse_prior(value: str, num_classes: int) -> Prior:
    """``auto``/``training``/``none``, or the prior in a JSON file."""
    from fedshift.client.inference import PRIOR_MODES

    if value in PRIOR_MODES:
        return value
    path = Path(value)
    try:
        prior = np.asarray(json.loads(path.read_text())["prior"], dtype=np.float64).ravel()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"Expected --prior among {list(PRIOR_MODES)} or a JSON file with "
            f'{{"prior": [...]}}, but {value!r} cannot be read ({type(exc).__name__}); pass e.g. auto'
        ) from None
    if prior.shape != (num_classes,) or not np.all(np.isfinite(prior)) or prior.min() <= 0:
        raise ConfigError(
            f"Expected {num_classes} positive class priors in {path}, but got {prior.tolist()}; "
            "store one prior per class"
        )
    return prior / prior.sum()


def parse_threshold(value: str | None) -> Threshold:
    from fedshift.client.inference import THRESHOLD_SITE

    if value is None or value == THRESHOLD_SITE:
        return value
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not 0.0 < t < 1.0:
        raise ConfigError(f"Expected --threshold 'site' or a number in (0, 1), but got {value!r}; pass 0.5")
    return t


def predict_bundle(
    bundle: SiteBundle,
    images: np.ndarray,
    device: torch.device,
    *,
    prior: Prior = "auto",
    tta: bool = False,
    threshold: Threshold = None,
) -> Inference:
    """The bundle's model and corrections on ``images``: its estimator's settings and seed as the site used
    them, and its stored estimate as the fallback of ``auto``."""
    from fedshift.client.correction import saved_estimator
    from fedshift.client.inference import infer
    from fedshift.common.shift_config import ShiftConfig

    config, seed = ShiftConfig(), 0
    if bundle.correction is not None and bundle.label_shift is not None:
        saved = saved_estimator(bundle.label_shift)
        if saved is not None:
            config, seed = saved
    stored = bundle.correction.estimate if bundle.correction is not None else None
    return infer(
        bundle.model,
        images,
        device,
        bundle.correction,
        tta=tta,
        reference=bundle.reference,  # the site's own moments: new images are moved onto them
        prior=prior,
        config=config,
        threshold=threshold,
        seed=seed,
        stored=stored,
    )


def predictions_csv(data: Images, result: Inference) -> bytes:
    """One row per image: id, raw and corrected probabilities per class, predicted class, threshold."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = data.class_names
    writer.writerow(
        ["id", *(f"raw_{n}" for n in names), *(f"corrected_{n}" for n in names), "predicted", "threshold"]
    )
    thr = "" if result.threshold is None else repr(result.threshold)
    for i, ident in enumerate(data.ids):
        raw = [repr(float(v)) for v in result.raw[i]]
        corrected = [repr(float(v)) for v in result.corrected[i]]
        writer.writerow([ident, *raw, *corrected, names[int(result.predicted[i])], thr])
    return buf.getvalue().encode()


def _print_summary(data: Images, result: Inference, out: Path) -> None:
    summary = result.summary()
    print(f"{len(data.ids)} images -> {out}")
    if result.prior is not None:
        pairs = zip(data.class_names, result.prior, strict=True)
        print("  prior used          " + ", ".join(f"{n} {p:.4f}" for n, p in pairs))
    est = result.estimate
    if est is not None and est.estimate is not None:
        low, high = est.interval if est.interval is not None else (est.estimate, est.estimate)
        prevalence = f"{est.estimate[-1]:.4f} [{low[-1]:.4f}, {high[-1]:.4f}]"
        print(f"  estimated prevalence {prevalence} ({est.n} images)")
    print("  corrections         " + ("; ".join(summary["applied"]) or "none"))
    for note in summary["notes"]:
        print(f"  note                {note}")


def _print_metrics(labels: np.ndarray, result: Inference) -> None:
    from fedshift.common.metrics import METRIC_NAMES, classification_metrics

    rows = {"raw": result.raw, "corrected": result.corrected}
    print(f"  {'':<18}" + "".join(f"{k:>18}" for k in rows))
    metrics = {k: classification_metrics(labels, v) for k, v in rows.items()}
    for name in METRIC_NAMES:
        print(f"  {name:<18}" + "".join(f"{metrics[k][name]:>18.6f}" for k in rows))


def explain(bundle: SiteBundle, data: Images, result: Inference, out: Path, k: int, tta: bool) -> int:
    """Grad-CAM overlays of the first ``k`` images' predicted classes (the CSV's), under the same norm
    statistics as the prediction; how many were written."""
    import torch

    from fedshift.client.explain import write_explanations
    from fedshift.client.inference import adapted_for_inference

    with adapted_for_inference(bundle.model, data.images, torch.device("cpu"), tta, bundle.reference):
        paths = write_explanations(bundle.model, data.images, out, k, ids=data.ids, classes=result.predicted)
    return len(paths)


def run(args: argparse.Namespace) -> int:
    from fedshift.client.bundle import load_bundle
    from fedshift.client.explain import check_destination, check_k
    from fedshift.client.training import device_for
    from fedshift.common.io import atomic_write_bytes

    if Path(args.out).is_dir():
        raise DataError(
            f"Expected --out to be a CSV file, but {str(args.out)!r} is a directory; pass e.g. p.csv"
        )
    prior_arg, threshold = args.prior, parse_threshold(args.threshold)
    if args.explain is not None:
        check_k(args.explain_k)
        check_destination(args.explain)
    bundle = load_bundle(args.model)
    config = bundle.model_config
    prior = parse_prior(prior_arg, config.num_classes)
    data = read_images(
        args.images, args.split, config.image_size, config.num_classes, bundle.class_names, bundle.path.parent
    )
    device = device_for(args.device)
    result = predict_bundle(bundle, data.images, device, prior=prior, tta=args.tta, threshold=threshold)
    table = predictions_csv(data, result)
    written = 0
    if args.explain is not None:
        written = explain(bundle, data, result, args.explain, args.explain_k, args.tta)
    atomic_write_bytes(args.out, table)
    _print_summary(data, result, args.out)
    if args.explain is not None:
        print(f"  explanations        {written} Grad-CAM overlays -> {args.explain}")
    if data.labels is not None:
        _print_metrics(data.labels, result)
    return 0
