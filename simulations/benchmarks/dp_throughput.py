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
each in its default configuration (fedshift DP: the DP recipe's zero head and
learning rate, ``fedshift.common.config.DP_RECIPE``; stock Opacus: ``--lr``), then
report test AUC; fedshift without DP trains the same number of steps for
reference. The test split is the data's ``val`` (or ``test``) split; synthetic
data (no ``--data`` and no ``../shared/data/pneumoniamnist.npz``) is labelled
SYNTHETIC in the table.

The stock model is :mod:`.stock_opacus`, the timed runs :mod:`.dp_runs`, the table,
targets and JSON report :mod:`.dp_report`; this module measures and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.dp import PrivateTraining, sample_rate
from fedshift.client.training import device_for, evaluate, train_local
from fedshift.common.config import FederationConfig, TrainConfig, with_recipe
from fedshift.common.data import ImageSet, to_tensor
from fedshift.common.errors import ConfigError, FedshiftError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.privacy import DEFAULT_ACCOUNTANT, epsilon
from fedshift.simulations.benchmarks.dp_report import (
    Measured,
    Row,
    benchmark_report,
    format_table,
    format_targets,
    load_average,
)
from fedshift.simulations.benchmarks.dp_runs import (
    DEFAULT_DATA,
    DELTA,
    load_data,
    measure_fedshift,
    stock_metrics,
    train_stock,
)

logger = logging.getLogger(__name__)


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
    learning_rate: float = 1e-3  # AdamW learning rate of the non-private and stock modes
    synthetic_n: int = 2000  # images generated when there is no data file (1/5 held out)
    seed: int = 0


@dataclass(frozen=True)
class _Inputs:
    """The images every mode trains on, as fedshift and as stock Opacus take them."""

    train: ImageSet
    test: ImageSet
    x_all: torch.Tensor
    y_all: torch.Tensor
    n: int
    q: float
    config: ModelConfig


def _inputs(settings: BenchSettings, device: torch.device) -> tuple[Any, str, _Inputs]:
    """The data set, its test split's name and the benchmark's inputs (n a multiple of B)."""
    dataset, train, test, test_name = load_data(
        settings.data, synthetic_n=settings.synthetic_n, seed=settings.seed
    )
    b, size = settings.batch_size, settings.image_size
    # n a multiple of B: fedshift's q = B / n and Opacus's q = 1 / len(loader) are then the same
    n = (len(train) // b) * b
    if n == 0:
        raise ConfigError(
            f"Expected --batch-size to be at most the training split ({len(train)} images), but got {b}"
        )
    train = train.subset(np.sort(np.random.default_rng(settings.seed).permutation(len(train))[:n]))
    q = sample_rate(n, b)
    inputs = _Inputs(
        train=train,
        test=test,
        x_all=to_tensor(train.images, size),
        y_all=torch.as_tensor(train.labels, dtype=torch.long),
        n=n,
        q=q,
        config=ModelConfig(image_size=size, seed=settings.seed),
    )
    logger.info(
        "%s: train %d, test (%s) %d; device %s, %d threads; q = %.5f, sigma = %g",
        dataset.label, n, test_name, len(test), device, torch.get_num_threads(), q, settings.noise_multiplier,
    )  # fmt: skip
    return dataset, test_name, inputs


def _throughput(settings: BenchSettings, device: torch.device, inputs: _Inputs, m: Measured) -> None:
    b, sigma, clip = settings.batch_size, settings.noise_multiplier, settings.clip_norm
    logger.info("Throughput: fedshift without and with DP, %d steps x %d", settings.steps, settings.repeats)
    m.plain, m.private = measure_fedshift(
        inputs.train, inputs.config, device, batch_size=b, steps=settings.steps, repeats=settings.repeats,
        noise_multiplier=sigma, clip_norm=clip, q=inputs.q, seed=settings.seed,
    )  # fmt: skip
    m.speed_np, m.speed_dp = float(np.median(m.plain)), float(np.median(m.private))
    logger.info(
        "Throughput: stock Opacus DP, %d steps (per-sample grads of every layer)", settings.stock_steps
    )
    m.speed_stock = train_stock(
        inputs.x_all, inputs.y_all, device=device, batch_size=b, steps=settings.stock_steps, warmup=1,
        noise_multiplier=sigma, clip_norm=clip, seed=settings.seed,
    ).samples_per_second  # fmt: skip


def _utility(settings: BenchSettings, device: torch.device, inputs: _Inputs, m: Measured) -> None:
    """Test AUC of every mode after the same number of steps (and both DP modes' epsilon)."""
    k, b, sigma, clip, seed = (
        settings.utility_steps,
        settings.batch_size,
        settings.noise_multiplier,
        settings.clip_norm,
        settings.seed,
    )
    train, test, n, q = inputs.train, inputs.test, inputs.n, inputs.q
    utility_config = TrainConfig(batch_size=b, learning_rate=settings.learning_rate)
    logger.info("Utility: fedshift non-private, %d steps", k)
    model = build_model(inputs.config)
    subset = train.subset(np.random.default_rng(seed).permutation(n)[: min(n, k * b)])
    train_local(model, subset, utility_config, device, seed=seed)
    m.auc_np = evaluate(model, test, device)["auc"]
    recipe = _recipe(inputs.config)
    logger.info("Utility: fedshift DP, %d steps (the DP recipe: %s, %s)", k, recipe.model, recipe.train)
    model = build_model(recipe.model)
    plan = PrivateTraining(sigma, clip, q, steps=k, seed=seed)
    dp_config = replace(utility_config, learning_rate=recipe.train.learning_rate)
    train_local(model, train, dp_config, device, seed=seed, private=plan)
    m.auc_dp = evaluate(model, test, device)["auc"]
    m.eps = epsilon([(sigma, q, k)], DELTA)  # as fedshift's ledger reports it (the tight PRV by default)
    same_mechanism_rdp = epsilon([(sigma, q, k)], DELTA, accountant="rdp")  # stock's accountant: cross-check
    logger.info("Utility: stock Opacus DP, %d steps", k)
    result = train_stock(
        inputs.x_all, inputs.y_all, device=device, batch_size=b, steps=k, warmup=0, noise_multiplier=sigma,
        clip_norm=clip, seed=seed, learning_rate=settings.learning_rate,
    )  # fmt: skip
    m.auc_stock = stock_metrics(result.model, test, settings.image_size, device)["auc"]
    m.eps_stock = result.epsilon
    if not math.isclose(same_mechanism_rdp, m.eps_stock, rel_tol=1e-9):
        logger.warning(
            "Epsilon differs: fedshift's mechanism under RDP %.6g, stock Opacus's RDP accountant %.6g",
            same_mechanism_rdp,
            m.eps_stock,
        )
    logger.info(
        "The same mechanism (sigma %g, q %.5f, %d steps): epsilon %.4g by fedshift's ledger (%s), %.4g by "
        "stock Opacus's RDP accountant", sigma, q, k, m.eps, DEFAULT_ACCOUNTANT, m.eps_stock,
    )  # fmt: skip


def _recipe(config: ModelConfig) -> FederationConfig:
    """What a DP run builds for a model of ``config``'s size and seed: the DP recipe's model and training."""
    run_config = with_recipe({"image-size": config.image_size, "seed": config.seed}, private=True)
    return FederationConfig.from_run_config(run_config)


def run_benchmark(settings: BenchSettings) -> tuple[list[Row], dict[str, Any]]:
    """Measure the three modes: the table's rows and the JSON report (rows included)."""
    started, load_start = time.perf_counter(), load_average()
    device = device_for(settings.device)
    dataset, test_name, inputs = _inputs(settings, device)
    measured = Measured()
    _throughput(settings, device, inputs, measured)
    load_after_throughput = load_average()
    if not settings.skip_utility:
        _utility(settings, device, inputs, measured)
    rows = measured.rows(str(device))
    report = benchmark_report(
        measured,
        rows,
        device=device,
        data={
            "data": dataset.label,
            "synthetic": dataset.synthetic,
            "n_train": inputs.n,
            "test_split": test_name,
            "n_test": len(inputs.test),
        },
        settings=settings,
        sample_rate=inputs.q,
        delta=DELTA,
        loads=(load_start, load_after_throughput),
    )
    report["seconds"] = time.perf_counter() - started
    return rows, report


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate of fedshift non-private and of stock Opacus (fedshift DP: the DP recipe's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("dp_throughput.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
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
    print(format_table(rows, title))
    print(format_targets(report["targets"]))
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False))
    logger.info("Wrote %s (%.0f s)", args.out, report["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
