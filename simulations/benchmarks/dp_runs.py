"""The timed runs of the DP benchmark: stock Opacus DP-SGD, fedshift with and without DP, and their data."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedshift.client.dp import PrivateTraining
from fedshift.client.training import train_local
from fedshift.common.config import TrainConfig
from fedshift.common.data import Dataset, ImageSet, load_npz, make_synthetic_cxr, to_tensor
from fedshift.common.errors import DataError
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import ModelConfig, build_model
from fedshift.simulations.benchmarks.stock_opacus import build_stock_model

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pneumoniamnist.npz"
DELTA = 1e-5


@dataclass
class StockResult:
    model: nn.Module
    samples_per_second: float
    steps: int  # timed steps (after the warm-up)
    epsilon: float  # from stock Opacus's own RDP accountant, warm-up steps included


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_stock(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    steps: int,
    warmup: int,
    noise_multiplier: float,
    clip_norm: float = 1.0,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> StockResult:
    """Full-model DP-SGD as Flower's Opacus example does it: ``make_private`` + a plain loop."""
    model = build_stock_model(seed=seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        poisson_sampling=True,
    )
    loss_fn = nn.CrossEntropyLoss()
    batches = itertools.chain.from_iterable(itertools.repeat(private_loader))
    processed, start = 0, time.perf_counter()
    for step, (xb, yb) in enumerate(itertools.islice(batches, warmup + steps)):
        if step == warmup:
            _sync(device)
            processed, start = 0, time.perf_counter()
        xb, yb = xb.to(device), yb.to(device)
        private_optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(private_model(xb), yb)
        loss.backward()
        private_optimizer.step()
        processed += len(yb)
    _sync(device)
    seconds = time.perf_counter() - start
    return StockResult(
        model=private_model,
        samples_per_second=processed / seconds if steps and seconds > 0 else math.nan,
        steps=steps,
        epsilon=float(engine.get_epsilon(DELTA)),
    )


@torch.no_grad()
def stock_metrics(
    model: nn.Module, data: ImageSet, image_size: int, device: torch.device, batch_size: int = 256
) -> dict[str, float]:
    """:func:`classification_metrics` of the stock model: the counterpart of ``evaluate``."""
    model.train(False)
    probs = []
    for begin in range(0, len(data), batch_size):
        x = to_tensor(data.images[begin : begin + batch_size], image_size).to(device)
        probs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return classification_metrics(data.labels, np.concatenate(probs).astype(np.float64))


def measure_fedshift(
    train: ImageSet,
    config: ModelConfig,
    device: torch.device,
    *,
    batch_size: int,
    steps: int,
    repeats: int,
    noise_multiplier: float,
    clip_norm: float,
    q: float,
    seed: int,
) -> tuple[list[float], list[float]]:
    """``train_local`` samples/s without and with DP: ``repeats`` timed calls each, alternating.

    Each model first takes one warm-up step (its own call). Alternating the two
    modes spreads any load from other processes over both.
    """
    train_config = TrainConfig(batch_size=batch_size)
    rng = np.random.default_rng(seed)
    models = {False: build_model(config), True: build_model(config)}

    def run(private: bool, k: int) -> float:
        model = models[private]
        if private:
            plan = PrivateTraining(noise_multiplier, clip_norm, q, steps=k, seed=seed)
            stats = train_local(model, train, train_config, device, seed=seed, private=plan)
        else:  # one shuffled pass over k batches' worth of images: k steps of batch_size
            idx = rng.choice(len(train), size=min(len(train), k * batch_size), replace=False)
            stats = train_local(model, train.subset(idx), train_config, device, seed=seed)
        return stats.samples_per_second

    run(False, 1)
    run(True, 1)
    plain: list[float] = []
    private: list[float] = []
    for _ in range(repeats):
        plain.append(run(False, steps))
        private.append(run(True, steps))
    return plain, private


def _test_split(dataset: Dataset) -> tuple[str, ImageSet]:
    for name in ("test", "val"):
        if name in dataset.splits:
            return name, dataset.split(name)
    raise DataError(
        f"Expected a 'val' or 'test' split in {dataset.label}, but it has {sorted(dataset.splits)}"
    )


def load_data(path: Path | None, *, synthetic_n: int, seed: int) -> tuple[Dataset, ImageSet, ImageSet, str]:
    """``(dataset, train, test, test split name)``: the real data if present, else SYNTHETIC."""
    if path is None and DEFAULT_DATA.is_file():
        path = DEFAULT_DATA
    if path is not None:
        dataset = load_npz(path)
        name, test = _test_split(dataset)
        return dataset, dataset.split("train"), test, name
    logger.warning("No data file found at %s: using SYNTHETIC chest X-rays", DEFAULT_DATA)
    dataset = make_synthetic_cxr(synthetic_n, 0.5, size=28, seed=seed)
    pooled = dataset.split("train")
    n_test = synthetic_n // 5
    return (
        dataset,
        pooled.subset(np.arange(n_test, synthetic_n)),
        pooled.subset(np.arange(n_test)),
        "held out",
    )
