"""The local training and evaluation loop, shared by the ClientApp and the baselines."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedshift.client.dp import PrivateTraining
from fedshift.common.config import TrainConfig
from fedshift.common.data import ImageSet, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import FedshiftModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train_local` did."""

    loss: float  # mean training loss over the samples processed
    num_examples: int  # training samples at the site
    steps: int  # optimiser steps taken
    seconds: float  # wall time of the loop
    samples_per_second: float  # throughput (samples processed / seconds)


def configure_threads() -> int:
    """Let torch use every core this process may run on, at most ``FEDSHIFT_NUM_THREADS``; the count.

    Ray workers otherwise start with a single intra-op thread; on a CPU shared with other
    jobs, oversubscribed threads spin. Each entry point that computes on the CPU calls it once.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cap = int(os.environ.get("FEDSHIFT_NUM_THREADS", cores or 1))
    threads = max(1, min(cores or 1, cap))
    torch.set_num_threads(threads)
    return threads


def device_for(setting: str = "auto") -> torch.device:
    """:func:`resolve_device`, and on the CPU torch's thread count set for it (:func:`configure_threads`):
    what an entry point that computes calls once."""
    device = resolve_device(setting)
    if device.type == "cpu":
        configure_threads()
    return device


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` -> the first GPU when there is one, else CPU; or ``cpu`` / ``cuda:N``. No side effects:
    the CPU's thread count is :func:`configure_threads`."""
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        setting = "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
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


def _shuffled(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for begin in range(0, n, batch_size):
            yield order[begin : begin + batch_size]


# a data-independent gradient term (e.g. EWC): parameter -> gradient to add at every step
GradientTerm = Callable[[], Mapping[nn.Parameter, torch.Tensor]]


# a per-sample training objective: (features, logits, labels) -> loss per sample, shape (N,).
# It must be a sum of per-sample terms (DP-SGD clips each sample's gradient); ``features`` are
# the pooled backbone features that enter the head (e.g. for a feature-alignment loss).
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default objective: cross-entropy per sample."""
    del features
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def _add_gradients(term: GradientTerm) -> None:
    for param, grad in term().items():
        param.grad = grad.clone() if param.grad is None else param.grad + grad


def param_groups(model: FedshiftModel, config: TrainConfig) -> list[dict[str, object]]:
    """The parameters that train, grouped by depth: ``lr * lr_decay ** depth`` (head 0; ULMFiT-style)."""
    by_depth: dict[int, list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            by_depth.setdefault(model.depth(param), []).append(param)
    if not by_depth:
        raise ConfigError(
            "Expected at least one trainable parameter, but the model has none; check finetune and "
            "unfreeze-every"
        )
    return [
        {"params": params, "lr": config.learning_rate * config.lr_decay**depth}
        for depth, params in sorted(by_depth.items())
    ]


def train_local(
    model: FedshiftModel,
    data: ImageSet,
    config: TrainConfig,
    device: torch.device,
    *,
    seed: int = 0,
    private: PrivateTraining | None = None,
    gradient_term: GradientTerm | None = None,
    objective: Objective = cross_entropy,
) -> TrainStats:
    """Train the model's trainable parameters on ``data`` in place.

    Without ``private``: ``local_epochs`` shuffled passes. With it: DP-SGD, its
    Poisson batches and its clipping-and-noise optimizer (:mod:`fedshift.client.dp`).
    ``gradient_term`` (e.g. :class:`fedshift.client.ewc.EWCTerm`) is added to the
    gradient at every step, after DP's clipping and noise: it must not depend on data.
    ``objective`` replaces the per-sample cross-entropy (e.g. a logit-adjusted loss
    or a feature-alignment term); it sees the head's input features too.
    """
    n = len(data)
    if n == 0:
        raise ConfigError("Expected a non-empty training split, but it has 0 images")
    model.to(device)
    model.train(True)
    x_all = to_tensor(data.images, model.config.image_size, model.config.in_chans)
    y_all = torch.as_tensor(data.labels, dtype=torch.long)
    forward, optimizer, batches = _loop(model, n, config, device, seed, private, gradient_term)
    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    steps, processed, loss_sum = 0, 0, 0.0
    start = time.perf_counter()
    try:
        for idx in batches:
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            captured.clear()
            logits = forward(x)
            per_sample = objective(captured[0], logits, y)
            # DP-SGD (Opacus "mean" mode) divides the clipped sum by the expected batch size itself
            loss = per_sample.sum() if private is not None else per_sample.mean()
            loss.backward()
            if gradient_term is not None and private is None:
                _add_gradients(gradient_term)
            optimizer.step()
            batch_loss = float(loss.detach())
            loss_sum += batch_loss if private is not None else batch_loss * len(idx)
            processed += len(idx)
            steps += 1
    finally:
        hook.remove()
        if private is not None:
            private.detach()
    seconds = time.perf_counter() - start
    model.train(False)
    loss_mean = loss_sum / processed if processed else float("nan")
    throughput = processed / seconds if seconds > 0 else float("inf")
    return TrainStats(loss_mean, n, steps, seconds, throughput)


def _loop(
    model: FedshiftModel,
    n: int,
    config: TrainConfig,
    device: torch.device,
    seed: int,
    private: PrivateTraining | None,
    gradient_term: GradientTerm | None,
) -> tuple[nn.Module, torch.optim.Optimizer, Iterator[torch.Tensor]]:
    """The module to call, the optimizer and the batches: shuffled passes, or DP-SGD's Poisson batches."""
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(
        param_groups(model, config), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if private is None:
        batches = _shuffled(n, config.batch_size, config.local_epochs, torch.Generator().manual_seed(seed))
        return model, optimizer, batches
    forward, optimizer = private.attach(model, optimizer, n)
    if gradient_term is not None:  # runs after clipping, noise and scaling
        private.after_noise(lambda: _add_gradients(gradient_term))
    return forward, optimizer, private.batches(n, device)


@torch.no_grad()
def batched_outputs(
    model: FedshiftModel,
    images: np.ndarray,
    device: torch.device,
    fn: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    batch_size: int = 256,
) -> np.ndarray:
    """``fn(x)`` over ``images`` in eval mode, batch by batch, as float64 of shape (N, width)."""
    model.to(device)
    model.train(False)
    out = []
    for begin in range(0, len(images), batch_size):
        x = to_tensor(images[begin : begin + batch_size], model.config.image_size, model.config.in_chans)
        x = x.to(device)
        out.append(fn(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, width))
    return np.concatenate(out).astype(np.float64)


def predict_proba(
    model: FedshiftModel, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities, shape (N, C): the model's softmax, as a site's inference computes it."""
    from fedshift.client.inference import predict_logits, softmax

    return softmax(predict_logits(model, images, device, batch_size))


def evaluate(model: FedshiftModel, data: ImageSet, device: torch.device) -> dict[str, float]:
    """Metrics of :func:`fedshift.common.metrics.classification_metrics` on ``data``."""
    return classification_metrics(data.labels, predict_proba(model, data.images, device))
