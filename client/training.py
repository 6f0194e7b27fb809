"""The local training and evaluation loop, shared by the ClientApp and the baselines."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedshift.common.config import TrainConfig
from fedshift.common.data import ImageSet, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import FedshiftModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train_local` did."""

    loss: float  # mean training loss over the last epoch
    num_examples: int  # training samples at the site
    steps: int  # optimiser steps taken
    seconds: float  # wall time of the loop
    samples_per_second: float  # throughput (samples processed / seconds)


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` -> the first GPU when there is one, else CPU; or ``cpu`` / ``cuda:N``.

    On the CPU, torch uses every core this process may run on (Ray workers
    otherwise start with a single intra-op thread).
    """
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        setting = "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Expected a CUDA GPU for device={setting!r}, but none is available; use "
                "device='auto' or 'cpu'"
            )
        try:
            device = torch.device(setting)
        except RuntimeError:
            raise ConfigError(
                f"Expected device to be 'auto', 'cpu' or 'cuda:N', but got {setting!r}"
            ) from None
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"Expected device index < {torch.cuda.device_count()}, but got {setting!r}")
        return device
    raise ConfigError(f"Expected device to be 'auto', 'cpu' or 'cuda:N', but got {setting!r}")


def train_local(
    model: FedshiftModel,
    data: ImageSet,
    config: TrainConfig,
    device: torch.device,
    *,
    seed: int = 0,
) -> TrainStats:
    """Train the model's trainable parameters on ``data`` in place."""
    if len(data) == 0:
        raise ConfigError("Expected a non-empty training split, but it has 0 images")
    model.to(device)
    model.train(True)
    x_all = to_tensor(data.images, model.config.image_size)
    y_all = torch.as_tensor(data.labels, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    steps, processed = 0, 0
    epoch_loss = float("nan")
    start = time.perf_counter()
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for begin in range(0, n, config.batch_size):
            idx = order[begin : begin + config.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
        processed += count
        epoch_loss = total / count
    seconds = time.perf_counter() - start
    model.train(False)
    return TrainStats(
        loss=epoch_loss,
        num_examples=n,
        steps=steps,
        seconds=seconds,
        samples_per_second=processed / seconds if seconds > 0 else float("inf"),
    )


@torch.no_grad()
def predict_proba(
    model: FedshiftModel, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities, shape (N, C)."""
    model.to(device)
    model.train(False)
    out = []
    for begin in range(0, len(images), batch_size):
        x = to_tensor(images[begin : begin + batch_size], model.config.image_size).to(device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, model.config.num_classes))
    return np.concatenate(out).astype(np.float64)


def evaluate(model: FedshiftModel, data: ImageSet, device: torch.device) -> dict[str, float]:
    """Metrics of :func:`fedshift.common.metrics.classification_metrics` on ``data``."""
    probs = predict_proba(model, data.images, device)
    return classification_metrics(data.labels, probs)
