"""What each fine-tuning choice costs: trainable parameters, bytes sent, training speed with and without DP.

    python -m fedshift.simulations.benchmarks.finetune [--data X.npz] [--device cuda] [--out s.json]

Every fine-tuning choice trains the same images on the same device with the same
``train_local`` the ClientApp uses, once without DP and once with DP-SGD (Poisson
batches of the same expected size, per-sample clipping and noise), for the same
number of steps; the table shows samples/s of both and their ratio side by side,
measured in one run (the machines are shared and noisy: compare ratios).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.dp import PrivateTraining
from fedshift.client.training import device_for, train_local
from fedshift.common.config import TrainConfig
from fedshift.common.data import ImageSet, load_dataset, make_synthetic_cxr
from fedshift.common.finetune import FINETUNE_CHOICES
from fedshift.common.model import ModelConfig, build_model

logger = logging.getLogger(__name__)


def _images(data: str | None, n: int) -> ImageSet:
    source = load_dataset(data).split("train") if data else make_synthetic_cxr(n, seed=1).split("train")
    if len(source) < n:
        raise SystemExit(f"Expected at least {n} training images in {data}, but it has {len(source)}")
    return source.subset(np.arange(n))


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def measure(
    finetune: str, images: ImageSet, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    config = ModelConfig(image_size=args.image_size, finetune=finetune)
    train = TrainConfig(batch_size=args.batch_size, learning_rate=1e-3)
    row: dict[str, Any] = {"strategy": finetune}  # the row key of earlier results
    for mode in ("no-dp", "dp"):
        model = build_model(config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        private = None
        if mode == "dp":
            n = len(images)
            private = PrivateTraining(
                noise_multiplier=1.0, clip_norm=1.0, sample_rate=args.batch_size / n, steps=args.steps
            )
        warm = images.subset(np.arange(args.batch_size))
        warm_private = PrivateTraining(1.0, 1.0, sample_rate=1.0, steps=1) if private is not None else None
        train_local(model, warm, train, device, private=warm_private)  # warm-up (kernels, caches)
        stats = train_local(model, images, train, device, private=private)
        row[f"{mode}_samples_per_second"] = stats.samples_per_second
        row[f"{mode}_peak_mb"] = _peak_mb(device)
        row["trainable_params"] = sum(p.numel() for p in model.trainable_parameters())
        row["shared_bytes"] = 4 * sum(v.numel() for v in model.shared_state_dict().values())
        logger.info("%s %s: %.0f samples/s", finetune, mode, stats.samples_per_second)
    row["dp_over_no_dp"] = row["dp_samples_per_second"] / row["no-dp_samples_per_second"]
    return row


def table(rows: list[dict[str, Any]], device: str) -> str:
    head = [
        "finetune",
        "trainable",
        "sent/round",
        "no-DP samples/s",
        "DP samples/s",
        "DP/no-DP",
        "DP peak MB",
    ]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["strategy"],
                f"{r['trainable_params']:,}",
                f"{r['shared_bytes']:,}",
                f"{r['no-dp_samples_per_second']:.0f}",
                f"{r['dp_samples_per_second']:.0f}",
                f"{r['dp_over_no_dp']:.2f}",
                f"{r['dp_peak_mb']:.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [f"Fine-tuning choices on {device}"]
    text += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="MedMNIST-style .npz (default: SYNTHETIC chest X-rays)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument(
        "--finetunes",
        "--strategies",
        dest="finetunes",
        default=",".join(FINETUNE_CHOICES),
        help="fine-tuning choices, comma-separated (--strategies is an alias)",
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = device_for(args.device)
    images = _images(args.data, args.steps * args.batch_size)
    rows = [measure(s.strip(), images, device, args) for s in args.finetunes.split(",") if s.strip()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(table(rows, f"{device} ({name}), {args.image_size} px, batch {args.batch_size}"))
    if args.out:
        info = {"device": str(device), "device_name": name, "torch": torch.__version__, **vars(args)}
        info["out"] = str(args.out)
        args.out.write_text(json.dumps({"settings": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
