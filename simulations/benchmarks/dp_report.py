"""The DP benchmark's report: one row per mode, the printed table and the targets' verdicts."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import opacus
import timm
import torch

TARGET_DP_VS_NONPRIVATE = 0.5  # fedshift DP samples/s over fedshift non-private samples/s
TARGET_DP_VS_STOCK = 5.0  # fedshift DP samples/s over stock Opacus DP samples/s


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


def format_table(rows: list[Row], data_label: str) -> str:
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


def format_targets(targets: dict[str, dict[str, Any]]) -> str:
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


def finite(value: float | None) -> float | None:
    """JSON has no nan/inf: those become ``null``."""
    return value if value is not None and math.isfinite(value) else None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine skew every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@dataclass
class Measured:
    """What the benchmark measured: samples/s of every mode, and AUC and epsilon after the utility run."""

    plain: list[float] = field(default_factory=list)  # fedshift non-private samples/s, every timed run
    private: list[float] = field(default_factory=list)  # fedshift DP samples/s, every timed run
    speed_np: float = math.nan
    speed_dp: float = math.nan
    speed_stock: float = math.nan
    auc_np: float = math.nan
    auc_dp: float = math.nan
    auc_stock: float = math.nan
    eps: float = math.nan
    eps_stock: float = math.nan

    def rows(self, device: str) -> list[Row]:
        ratio_np, ratio_stock = self.speed_dp / self.speed_np, self.speed_dp / self.speed_stock
        return [
            Row("fedshift non-private", device, self.speed_np, 1.0, math.nan, self.auc_np, math.inf),
            Row("fedshift DP", device, self.speed_dp, ratio_np, ratio_stock, self.auc_dp, self.eps),
            Row(
                "stock Opacus DP",
                device,
                self.speed_stock,
                self.speed_stock / self.speed_np,
                math.nan,
                self.auc_stock,
                self.eps_stock,
            ),
        ]

    def targets(self) -> dict[str, dict[str, Any]]:
        """The three performance targets: their ratios, thresholds and verdicts."""
        ratio_np, ratio_stock = self.speed_dp / self.speed_np, self.speed_dp / self.speed_stock
        auc_dp, auc_stock = self.auc_dp, self.auc_stock
        auc_pass = None if math.isnan(auc_dp) or math.isnan(auc_stock) else bool(auc_dp >= auc_stock)
        return {
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
            "dp_auc_vs_stock": {"fedshift_dp": finite(auc_dp), "stock": finite(auc_stock), "pass": auc_pass},
        }


def benchmark_report(
    measured: Measured,
    rows: list[Row],
    *,
    device: torch.device,
    data: Mapping[str, Any],
    settings: Any,
    sample_rate: float,
    delta: float,
    loads: tuple[list[float] | None, list[float] | None],
) -> dict[str, Any]:
    """The JSON report: versions, device, data, settings, rows, every timed run, targets, load."""
    return {
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine() or "cpu",
        "threads": torch.get_num_threads(),
        **data,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "sample_rate": sample_rate,
        "delta": delta,
        "rows": [{k: finite(v) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in rows],
        "fedshift_nonprivate_samples_per_s_runs": measured.plain,
        "fedshift_dp_samples_per_s_runs": measured.private,
        "targets": measured.targets(),
        "load_average": {"start": loads[0], "after_throughput": loads[1], "end": load_average()},
    }
