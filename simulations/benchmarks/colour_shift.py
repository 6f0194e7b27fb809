"""How far each colour scanner profile shifts a model, and what test-time norm adaptation recovers.

    python -m fedshift.simulations.benchmarks.colour_shift [--out colour_shift.json]

A model (the default one, with its 3->3 input adapter) trains on SYNTHETIC H&E-like patches as the
``reference`` site sees them, with the ClientApp's ``train_local``; its test AUC is then measured on
held-out patches through every profile of :data:`~fedshift.simulations.shift.COLOUR_PROFILES`: as
received, and with the norm statistics adapted to the site's unlabelled test images relative to the
training images (``fedshift predict --tta`` on a bundle: relative to the site's own norm moments).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.inference import adapted_for_inference
from fedshift.client.training import configure_threads, evaluate, resolve_device, train_local
from fedshift.common.config import TrainConfig
from fedshift.common.data import ImageSet
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.synthetic_colour import make_synthetic_colour
from fedshift.simulations.shift import COLOUR_PROFILES

logger = logging.getLogger(__name__)


def measure(n_train: int, n_test: int, image_size: int, epochs: int, seed: int) -> list[dict[str, Any]]:
    """One row per colour profile: its description and the test AUC as received and with TTA."""
    device = resolve_device("auto")
    data = make_synthetic_colour(n_train + n_test, size=28, seed=seed).split("train")
    train, test = data.subset(np.arange(n_train)), data.subset(np.arange(n_train, len(data)))
    model = build_model(ModelConfig(image_size=image_size, in_chans=3, seed=seed))
    train_local(model, train, TrainConfig(local_epochs=epochs, batch_size=32), device, seed=seed)
    rows = []
    for k, profile in enumerate(COLOUR_PROFILES):
        shifted = ImageSet(profile.apply(test.images, np.random.default_rng([seed, k])), test.labels)
        received = evaluate(model, shifted, device)["auc"]
        with adapted_for_inference(model, shifted.images, device, True, train.images):
            adapted = evaluate(model, shifted, device)["auc"]
        rows.append({"profile": profile.describe(), "auc": received, "auc_tta": adapted})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("colour_shift.json"))
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()
    torch.manual_seed(0)
    runs = {
        seed: measure(args.n_train, args.n_test, args.image_size, args.epochs, seed)
        for seed in range(args.seeds)
    }
    print(f"SYNTHETIC H&E patches; trained on 'reference', {args.n_train} images, {args.epochs} epochs")
    print(f"{'profile':<56} " + " ".join(f"{'AUC s' + str(s):>8} {'TTA s' + str(s):>8}" for s in runs))
    for i, row in enumerate(runs[0]):
        values = " ".join(f"{runs[s][i]['auc']:>8.3f} {runs[s][i]['auc_tta']:>8.3f}" for s in runs)
        print(f"{row['profile']:<56} {values}")
    args.out.write_text(
        json.dumps(
            {"torch": torch.__version__, "args": vars(args) | {"out": str(args.out)}, "runs": runs}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
