"""Training/inference throughput and a learning check of the local loop, per device.

    python -m fedshift.simulations.benchmarks.throughput [--out bench.json]

For every available device (CPU, and CUDA when present) it trains the default
model (frozen EfficientNet-Lite0 + LoRA + head + site-local parts) on SYNTHETIC
chest X-rays with the same ``train_local`` the ClientApp uses, and reports
samples/s for training and inference plus the test AUC reached, side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.training import configure_threads, evaluate, predict_proba, resolve_device, train_local
from fedshift.common.config import TrainConfig
from fedshift.common.data import make_synthetic_cxr
from fedshift.common.model import ModelConfig, build_model

logger = logging.getLogger(__name__)


def measure(device_name: str, image_size: int, n_train: int, epochs: int) -> dict[str, Any]:
    device = resolve_device(device_name)
    data = make_synthetic_cxr(n_train + 400, prevalence=0.5, size=28, seed=1).split("train")
    train, test = data.subset(np.arange(n_train)), data.subset(np.arange(n_train, len(data)))
    model = build_model(ModelConfig(image_size=image_size))
    stats = train_local(model, train, TrainConfig(local_epochs=epochs, batch_size=64), device, seed=0)
    predict_proba(model, test.images[:64], device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    predict_proba(model, test.images, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    infer = len(test) / (time.perf_counter() - start)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "image_size": image_size,
        "train_samples_per_s": stats.samples_per_second,
        "infer_samples_per_s": infer,
        "test_auc": evaluate(model, test, device)["auc"],
        "epochs": epochs,
        "n_train": n_train,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("throughput.json"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # the CPU is measured first
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    rows = [measure(d, args.image_size, args.n_train, args.epochs) for d in devices]
    print(f"{'device':<8} {'name':<28} {'px':>4} {'train/s':>9} {'infer/s':>9} {'test AUC':>9}")
    for r in rows:
        print(
            f"{r['device']:<8} {r['device_name'][:28]:<28} {r['image_size']:>4} "
            f"{r['train_samples_per_s']:>9.0f} {r['infer_samples_per_s']:>9.0f} {r['test_auc']:>9.3f}"
        )
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
