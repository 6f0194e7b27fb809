"""DP-SGD cost of fedshift against no DP and against stock full-model Opacus, on one machine.

    python -m fedshift.simulations.benchmarks.dp_throughput [--data PATH] [--device auto|cpu|cuda:0]
        [--image-size 64] [--batch-size 32] [--steps N] [--out dp_throughput.json]

It answers the performance target "fedshift's DP-SGD trains at >= 0.5x the
throughput of the same configuration without DP, and >= 5x faster than stock
full-model Opacus DP-SGD on the same backbone, images and machine, at equal or
better AUC". Side by side, on the same images:

1. **fedshift non-private**: the default model (frozen EfficientNet-Lite0 + LoRA +
   head + site-local parts) trained by ``train_local`` without DP;
2. **fedshift DP**: the same model and loop with :class:`PrivateTraining`;
3. **stock Opacus**: what Flower's Opacus example does, on the same pretrained
   backbone: every parameter trainable, a new 2-class head, every BatchNorm
   (timm's fused ``BatchNormAct2d`` included, which ``ModuleValidator.fix``
   misses) replaced by GroupNorm, then ``PrivacyEngine.make_private`` with Poisson
   sampling over a torch ``DataLoader``.

Throughput is timed after one warm-up step in every mode. Utility: both DP
approaches train with the same noise multiplier, sample rate and number of steps
(hence the same epsilon, cross-checked against stock Opacus's own accountant),
then report test AUC; fedshift without DP trains the same number of steps for
reference. The test split is the data's ``val`` (or ``test``) split; synthetic
data (no ``--data`` and no ``../shared/data/pneumoniamnist.npz``) is labelled
SYNTHETIC in the table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import opacus
import timm
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedshift.client.dp import PrivateTraining, sample_rate
from fedshift.client.training import evaluate, resolve_device, train_local
from fedshift.common.backbones import backbone_norm, create_backbone
from fedshift.common.config import TrainConfig
from fedshift.common.data import Dataset, ImageSet, load_npz, make_synthetic_cxr, to_tensor
from fedshift.common.errors import ConfigError, DataError, FedshiftError
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.privacy import epsilon

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pneumoniamnist.npz"
STOCK_BACKBONE = "efficientnet_lite0"
DELTA = 1e-5
TARGET_DP_VS_NONPRIVATE = 0.5  # fedshift DP samples/s over fedshift non-private samples/s
TARGET_DP_VS_STOCK = 5.0  # fedshift DP samples/s over stock Opacus DP samples/s

# ------------------------------------------------------------------ the stock model


class GroupNormAct(nn.Module):
    """GroupNorm followed by the dropout and activation a fused ``BatchNormAct2d`` carried.

    The GroupNorm stays a plain ``nn.GroupNorm`` child, so Opacus computes its
    per-sample gradients with its own grad sampler. The activation is applied
    out of place: an in-place op on the output of a module with Opacus's
    backward hook breaks autograd.
    """

    def __init__(self, norm: nn.GroupNorm, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act
        if getattr(self.act, "inplace", False):
            self.act = copy.copy(self.act)
            setattr(self.act, "inplace", False)  # noqa: B010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.act(self.drop(self.norm(x))))


def _group_norm_like(bn: nn.modules.batchnorm._BatchNorm, keep_affine: bool) -> nn.GroupNorm:
    """Opacus's replacement (``gcd(32, C)`` groups), optionally starting from the BN's affine."""
    channels = bn.num_features
    norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=float(bn.eps), affine=bn.affine)
    if keep_affine and bn.affine:
        with torch.no_grad():
            norm.weight.copy_(cast(torch.Tensor, bn.weight))
            norm.bias.copy_(cast(torch.Tensor, bn.bias))
    return norm


def replace_batchnorms(root: nn.Module, *, keep_affine: bool = True) -> int:
    """Replace every BatchNorm in ``root`` (in place) by GroupNorm; returns how many.

    A plain BatchNorm becomes ``nn.GroupNorm`` (what ``ModuleValidator.fix`` does);
    timm's fused ``BatchNormAct2d``, a BatchNorm subclass that Opacus's validator
    does not recognise, becomes :class:`GroupNormAct`, keeping its ``drop`` and
    ``act``. With ``keep_affine`` the GroupNorm starts from the pretrained BN's
    scale and shift (Opacus's fix starts from 1 and 0), which gives the stock
    baseline the better start.
    """
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            norm = _group_norm_like(child, keep_affine)
            act, drop = getattr(child, "act", None), getattr(child, "drop", None)
            if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
                new: nn.Module = GroupNormAct(
                    norm,
                    drop if isinstance(drop, nn.Module) else nn.Identity(),
                    act if isinstance(act, nn.Module) else nn.Identity(),
                )
            else:
                new = norm
            setattr(parent, name, new)
            replaced += 1
    return replaced


class GrayToRGB(nn.Module):
    """Fixed input handling of the stock model: gray copied to 3 channels, backbone mean/std.

    The same map fedshift's :class:`InputAdapter` starts from, but without parameters.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
        return (x.expand(-1, mean.shape[1], -1, -1) - mean) / std


def build_stock_model(num_classes: int = 2, *, seed: int = 0, keep_affine: bool = True) -> nn.Module:
    """The pretrained backbone fedshift uses, made fully trainable and DP-compatible the stock way."""
    backbone = create_backbone(STOCK_BACKBONE, None)
    mean, std = backbone_norm(backbone)
    torch.manual_seed(seed)
    cast(Any, backbone).reset_classifier(num_classes)
    replace_batchnorms(backbone, keep_affine=keep_affine)
    model = nn.Sequential(GrayToRGB(mean, std), backbone)
    for param in model.parameters():
        param.requires_grad_(True)
    return model.train(True)


# ------------------------------------------------------------------ runs


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


# ------------------------------------------------------------------ entry point


@dataclass(frozen=True)
class Row:
    """One mode of the benchmark."""

    mode: str
    device: str
    samples_per_s: float  # training throughput after one warm-up step
    vs_nonprivate: float  # samples/s relative to fedshift without DP
    dp_vs_stock: float  # fedshift DP samples/s over stock Opacus samples/s (DP row only, else nan)
    test_auc: float  # after the utility run (nan when skipped)
    epsilon: float  # of the utility run at delta = 1e-5 (inf without DP)


def _format_table(rows: list[Row], data_label: str) -> str:
    def num(v: float, fmt: str) -> str:
        return "-" if math.isnan(v) else ("inf" if math.isinf(v) else format(v, fmt))

    lines = [
        f"data: {data_label}",
        f"{'mode':<22} {'device':<8} {'samples/s':>10} {'x nonpriv':>10} {'DP/stock':>9} "
        f"{'test AUC':>9} {'epsilon':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r.mode:<22} {r.device:<8} {num(r.samples_per_s, '.1f'):>10} "
            f"{num(r.vs_nonprivate, '.2f'):>10} {num(r.dp_vs_stock, '.1f'):>9} "
            f"{num(r.test_auc, '.3f'):>9} {num(r.epsilon, '.3f'):>8}"
        )
    return "\n".join(lines)


def _format_targets(targets: dict[str, dict[str, Any]]) -> str:
    def verdict(passed: bool | None) -> str:
        return "n/a" if passed is None else ("pass" if passed else "FAIL")

    speed_np, speed_stock, auc = (
        targets["dp_vs_nonprivate"],
        targets["dp_vs_stock"],
        targets["dp_auc_vs_stock"],
    )
    return (
        f"targets: DP/non-private {speed_np['ratio']:.2f} >= {speed_np['threshold']:g}: "
        f"{verdict(speed_np['pass'])}; DP/stock {speed_stock['ratio']:.1f} >= "
        f"{speed_stock['threshold']:g}: {verdict(speed_stock['pass'])}; "
        f"AUC DP >= stock: {verdict(auc['pass'])}"
    )


def _finite(value: float | None) -> float | None:
    """JSON has no nan/inf: those become ``null``."""
    return value if value is not None and math.isfinite(value) else None


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine skew every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures (the command-line options, read once)."""

    data: Path | None = None  # MedMNIST .npz; None = the default path if present, else SYNTHETIC
    device: str = "auto"  # auto, cpu or cuda:N
    image_size: int = 64  # side of the square model input
    batch_size: int = 32  # B; DP runs use Poisson batches of expected size B (q = B / n)
    steps: int = 20  # timed fedshift steps per repeat
    repeats: int = 3  # timed fedshift runs per mode; the median is reported
    stock_steps: int = 6  # timed stock Opacus steps (each ~10 s on a 2-core CPU at 64 px)
    utility_steps: int = 20  # DP-SGD steps of every mode before its test AUC
    skip_utility: bool = False  # throughput only
    noise_multiplier: float = 1.0  # sigma of both DP modes
    clip_norm: float = 1.0  # C of both DP modes
    learning_rate: float = 1e-3  # AdamW learning rate of every mode
    synthetic_n: int = 2000  # images generated when there is no data file (1/5 held out)
    seed: int = 0


def run_benchmark(settings: BenchSettings) -> tuple[list[Row], dict[str, Any]]:
    """Measure the three modes: the table's rows and the JSON report (rows included)."""
    started, load_start = time.perf_counter(), _load_average()
    device = resolve_device(settings.device)
    dataset, train, test, test_name = load_data(
        settings.data, synthetic_n=settings.synthetic_n, seed=settings.seed
    )
    b, size, sigma, clip = (
        settings.batch_size,
        settings.image_size,
        settings.noise_multiplier,
        settings.clip_norm,
    )
    # n a multiple of B: fedshift's q = B / n and Opacus's q = 1 / len(loader) are then the same
    n = (len(train) // b) * b
    if n == 0:
        raise ConfigError(
            f"Expected --batch-size to be at most the training split ({len(train)} images), but got {b}"
        )
    train = train.subset(np.sort(np.random.default_rng(settings.seed).permutation(len(train))[:n]))
    q = sample_rate(n, b)
    config = ModelConfig(image_size=size, seed=settings.seed)
    x_all = to_tensor(train.images, size)
    y_all = torch.as_tensor(train.labels, dtype=torch.long)
    logger.info(
        "%s: train %d, test (%s) %d; device %s, %d threads; q = %.5f, sigma = %g",
        dataset.label, n, test_name, len(test), device, torch.get_num_threads(), q, sigma,
    )  # fmt: skip

    logger.info("Throughput: fedshift without and with DP, %d steps x %d", settings.steps, settings.repeats)
    plain, private = measure_fedshift(
        train, config, device, batch_size=b, steps=settings.steps, repeats=settings.repeats,
        noise_multiplier=sigma, clip_norm=clip, q=q, seed=settings.seed,
    )  # fmt: skip
    speed_np, speed_dp = float(np.median(plain)), float(np.median(private))
    logger.info(
        "Throughput: stock Opacus DP, %d steps (per-sample grads of every layer)", settings.stock_steps
    )
    speed_stock = train_stock(
        x_all, y_all, device=device, batch_size=b, steps=settings.stock_steps, warmup=1,
        noise_multiplier=sigma, clip_norm=clip, seed=settings.seed,
    ).samples_per_second  # fmt: skip
    load_after_throughput = _load_average()

    auc_np = auc_dp = auc_stock = eps = eps_stock = math.nan
    if not settings.skip_utility:
        k = settings.utility_steps
        utility_config = TrainConfig(batch_size=b, learning_rate=settings.learning_rate)
        logger.info("Utility: fedshift non-private, %d steps", k)
        model = build_model(config)
        subset = train.subset(np.random.default_rng(settings.seed).permutation(n)[: min(n, k * b)])
        train_local(model, subset, utility_config, device, seed=settings.seed)
        auc_np = evaluate(model, test, device)["auc"]
        logger.info("Utility: fedshift DP, %d steps", k)
        model = build_model(config)
        plan = PrivateTraining(sigma, clip, q, steps=k, seed=settings.seed)
        train_local(model, train, utility_config, device, seed=settings.seed, private=plan)
        auc_dp = evaluate(model, test, device)["auc"]
        eps = epsilon([(sigma, q, k)], DELTA)
        logger.info("Utility: stock Opacus DP, %d steps", k)
        result = train_stock(
            x_all, y_all, device=device, batch_size=b, steps=k, warmup=0, noise_multiplier=sigma,
            clip_norm=clip, seed=settings.seed, learning_rate=settings.learning_rate,
        )  # fmt: skip
        auc_stock = stock_metrics(result.model, test, size, device)["auc"]
        eps_stock = result.epsilon
        if not math.isclose(eps, eps_stock, rel_tol=1e-9):
            logger.warning("Epsilon differs: fedshift %.6g, stock Opacus accountant %.6g", eps, eps_stock)

    dev = str(device)
    ratio_np, ratio_stock = speed_dp / speed_np, speed_dp / speed_stock
    rows = [
        Row("fedshift non-private", dev, speed_np, 1.0, math.nan, auc_np, math.inf),
        Row("fedshift DP", dev, speed_dp, ratio_np, ratio_stock, auc_dp, eps),
        Row("stock Opacus DP", dev, speed_stock, speed_stock / speed_np, math.nan, auc_stock, eps_stock),
    ]
    auc_pass = None if math.isnan(auc_dp) or math.isnan(auc_stock) else bool(auc_dp >= auc_stock)
    report = {
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "timm": timm.__version__,
        "device": dev,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine() or "cpu",
        "threads": torch.get_num_threads(),
        "data": dataset.label,
        "synthetic": dataset.synthetic,
        "n_train": n,
        "test_split": test_name,
        "n_test": len(test),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "sample_rate": q,
        "delta": DELTA,
        "rows": [{k: _finite(v) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in rows],
        "fedshift_nonprivate_samples_per_s_runs": plain,
        "fedshift_dp_samples_per_s_runs": private,
        "targets": {
            "dp_vs_nonprivate": {
                "ratio": ratio_np,
                "threshold": TARGET_DP_VS_NONPRIVATE,
                "pass": bool(ratio_np >= TARGET_DP_VS_NONPRIVATE),
            },
            "dp_vs_stock": {
                "ratio": ratio_stock,
                "threshold": TARGET_DP_VS_STOCK,
                "pass": bool(ratio_stock >= TARGET_DP_VS_STOCK),
            },
            "dp_auc_vs_stock": {
                "fedshift_dp": _finite(auc_dp),
                "stock": _finite(auc_stock),
                "pass": auc_pass,
            },
        },
        "load_average": {
            "start": load_start,
            "after_throughput": load_after_throughput,
            "end": _load_average(),
        },
        "seconds": time.perf_counter() - started,
    }
    return rows, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=None, help=f"MedMNIST .npz (default {DEFAULT_DATA})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N (auto = GPU when present)")
    parser.add_argument("--image-size", type=_positive, default=64)
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--steps", type=_positive, default=20, help="timed fedshift steps per repeat")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed fedshift runs per mode (median)")
    parser.add_argument("--stock-steps", type=_positive, default=6, help="timed stock Opacus steps")
    parser.add_argument("--utility-steps", type=_positive, default=20, help="DP-SGD steps before the AUC")
    parser.add_argument("--skip-utility", action="store_true", help="throughput only, no AUC")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma of both DP modes")
    parser.add_argument("--synthetic-n", type=_positive, default=2000, help="images when data is synthetic")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of every mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("dp_throughput.json"))
    args = parser.parse_args(argv)
    if not (args.noise_multiplier > 0 and math.isfinite(args.noise_multiplier)):
        parser.error(f"--noise-multiplier must be a finite number > 0, got {args.noise_multiplier}")
    # force: opacus calls logging.basicConfig at import, which would swallow INFO progress lines
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    # known and harmless here: Opacus's hooks on a model whose input needs no grad; seeded RNG
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    settings = BenchSettings(
        data=args.data, device=args.device, image_size=args.image_size, batch_size=args.batch_size,
        steps=args.steps, repeats=args.repeats, stock_steps=args.stock_steps,
        utility_steps=args.utility_steps, skip_utility=args.skip_utility,
        noise_multiplier=args.noise_multiplier, synthetic_n=args.synthetic_n, seed=args.seed,
        learning_rate=args.lr,
    )  # fmt: skip
    try:
        rows, report = run_benchmark(settings)
    except FedshiftError as exc:
        parser.error(str(exc))
    title = (
        f"{report['data']}, {settings.image_size} px, batch {settings.batch_size}, "
        f"sigma {settings.noise_multiplier:g}, C {settings.clip_norm:g}, "
        f"{report['threads']} threads on {report['device_name']}"
    )
    print(_format_table(rows, title))
    print(_format_targets(report["targets"]))
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False))
    logger.info("Wrote %s (%.0f s)", args.out, report["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
