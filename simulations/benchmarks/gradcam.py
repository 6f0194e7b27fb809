"""Where Grad-CAM looks: its mass on SYNTHETIC lesions, whose position is known.

    nice -n 10 python -m fedshift.simulations.benchmarks.gradcam [--seeds 0,1,2] [--out gradcam.json]

For each seed: SYNTHETIC chest X-rays at 224 px (common/synthetic_cxr.py), the
default model trained with ``train_local`` on the first three quarters (adapters,
4 epochs, lr 3e-3), Grad-CAM on the rest. On the correctly classified lesion
images, against the disk of 2 sigma around each lesion's centre:

* ``raw``: the fraction of the map's mass inside the disk;
* ``minmax``: the same for the min-max normalised map;
* ``shown``: the same for the map as the overlay shows it
  (``client/explain.display_level``: from half its peak up);
* ``pointing``: the fraction of images whose map peaks inside the disk
  (the pointing game, Zhang et al. 2016);
* ``chance``: the disk's share of the image (what a uniform map scores on the
  mass fractions, and a random peak on ``pointing``).

Each explained layer (``--stages``) is one row: by default the feature map the
head pools, the last stage's output and two earlier stages; "(default)" marks
what ``grad_cam`` explains at this size (``client/explain.resolve_stage``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.explain import AUTO, POOLED, Stage, display_level, grad_cam, resolve_stage
from fedshift.client.training import configure_threads, train_local
from fedshift.common.data import ImageSet
from fedshift.common.model import FedshiftModel, ModelConfig, build_model
from fedshift.common.synthetic_cxr import render_synthetic_cxr, synthetic_lesions
from fedshift.common.train_config import TrainConfig

logger = logging.getLogger(__name__)


def variants(spec: str) -> list[tuple[str, Stage]]:
    """``--stages`` as (row name, ``grad_cam`` stage): ``pooled`` or a stage index, comma-separated."""
    out: list[tuple[str, Stage]] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == POOLED:
            out.append(("pooled features", POOLED))
        else:
            out.append(("last stage" if int(item) == -1 else f"stage {int(item)}", int(item)))
    return out


DISK_SIGMAS = 2.0


def minmax(cam: np.ndarray) -> np.ndarray:
    """The map min-max normalised to [0, 1] (zeros for a flat map)."""
    low, high = float(cam.min()), float(cam.max())
    return (cam - low) / (high - low) if high > low else np.zeros_like(cam)


def mass_inside(values: np.ndarray, disk: np.ndarray) -> float:
    """The share of ``values``'s sum that lies inside ``disk`` (0 for an empty map)."""
    total = float(values.sum())
    return float(values[disk].sum()) / total if total > 0 else 0.0


def localisation(cams: np.ndarray, disks: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mass fractions in ``disks`` (raw, min-max, shown), the pointing hit, the disk's area."""
    scores: dict[str, list[float]] = {"raw": [], "minmax": [], "shown": [], "pointing": []}
    for cam, disk in zip(cams, disks, strict=True):
        scores["raw"].append(mass_inside(cam, disk))
        scores["minmax"].append(mass_inside(minmax(cam), disk))
        scores["shown"].append(mass_inside(display_level(cam), disk))
        scores["pointing"].append(float(disk.flat[int(np.argmax(cam))]))
    out = {k: np.array(v) for k, v in scores.items()}
    out["chance"] = disks.mean(axis=(1, 2)) if len(disks) else np.zeros(0)
    return out


def trained_model(seed: int, size: int, n: int, epochs: int) -> tuple[FedshiftModel, dict[str, Any]]:
    """The slow test's training: ``n`` images (half with a lesion), the first 3/4 trained on."""
    images, labels = render_synthetic_cxr(n, 0.5, size, seed)
    train = n * 3 // 4
    model = build_model(ModelConfig(image_size=size, seed=seed))
    config = TrainConfig(local_epochs=epochs, learning_rate=3e-3)
    start = time.perf_counter()
    train_local(model, ImageSet(images=images[:train], labels=labels[:train]), config, torch.device("cpu"))
    data = {
        "images": images[train:],
        "labels": labels[train:],
        "disks": synthetic_lesions(n, 0.5, seed).disks(size, DISK_SIGMAS)[train:],
        "train_seconds": time.perf_counter() - start,
    }
    return model, data


def measure_seed(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, data = trained_model(seed, args.size, args.n, args.epochs)
    logger.info("seed %d trained in %.0f s", seed, data["train_seconds"])
    rows = []
    default = resolve_stage(model, AUTO)  # what grad_cam explains at this size unless told
    for name, stage in variants(args.stages):
        name = f"{name} (default)" if resolve_stage(model, stage) == default else name
        cams, predicted = grad_cam(model, data["images"], stage=stage)
        chosen = (data["labels"] == 1) & (predicted == 1)
        scores = localisation(cams[chosen], data["disks"][chosen])
        row: dict[str, Any] = {"seed": seed, "variant": name, "stage": stage}
        row.update(accuracy=float((predicted == data["labels"]).mean()), images=int(chosen.sum()))
        row.update({k: float(v.mean()) for k, v in scores.items()})
        row["raw_min"] = float(scores["raw"].min()) if len(scores["raw"]) else float("nan")
        row["train_seconds"] = data["train_seconds"]
        rows.append(row)
        logger.info("seed %d %s: %s", seed, name, {k: round(v, 3) for k, v in row.items() if k in KEYS})
    return rows


KEYS = ("accuracy", "raw", "minmax", "shown", "pointing", "chance")


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the mean over seeds of each seed's mean, and the lowest seed."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {
            "variant": name,
            "seeds": len(mine),
            "images": sum(r["images"] for r in mine),
        }
        for key in KEYS:
            values = [r[key] for r in mine]
            entry[key], entry[f"{key}_lowest_seed"] = float(np.mean(values)), float(np.min(values))
        out.append(entry)
    return out


def table(entries: list[dict[str, Any]], title: str) -> str:
    head = ["explained", "images", "accuracy", "raw mass", "min-max mass", "shown mass", "pointing", "chance"]
    lines = [head]
    for e in entries:
        cells = [e["variant"], str(e["images"])]
        cells += [f"{e[k]:.3f} (min {e[f'{k}_lowest_seed']:.3f})" for k in KEYS]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    body = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    return "\n".join([title, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; one training each")
    parser.add_argument("--size", type=int, default=224, help="image and model size in pixels")
    parser.add_argument("--n", type=int, default=200, help="images per seed (3/4 train, 1/4 explained)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stages", default=f"{POOLED},-1,-2,-3", help="explained layers: pooled or an index")
    parser.add_argument("--out", type=Path, help="write the rows and the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_threads()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [row for seed in seeds for row in measure_seed(seed, args)]
    entries = summary(rows)
    title = (
        f"Grad-CAM on SYNTHETIC lesions ({args.size} px, seeds {seeds}, correctly classified lesion images; "
        f"mean over seeds, lowest seed in brackets; disk = {DISK_SIGMAS:g} sigma)"
    )
    print(table(entries, title))
    if args.out:
        settings = {
            **vars(args),
            "out": str(args.out),
            "torch": torch.__version__,
            "disk_sigmas": DISK_SIGMAS,
        }
        args.out.write_text(json.dumps({"settings": settings, "summary": entries, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
