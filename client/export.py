"""``fedshift export``: a site's model and corrections as one self-contained TorchScript program.

The program maps images to corrected class probabilities, float64 ``(N, C)``.
Input: grey ``(N, H, W)`` or ``(N, 1, H, W)`` for a grey model, colour ``(N, H, W, 3)``
or ``(N, 3, H, W)`` for a colour one; uint8 in 0..255 (as the loaders read them) or
floating point in [0, 1]. Inside: the preprocessing of
:func:`fedshift.common.data.to_tensor` (scale to [0, 1], antialiased bilinear
resize to the model's side), the model (input adapter, backbone with adapters,
site-local tensors, head), the calibration map and the prior correction
``p_t(y|x) ∝ p_s(y|x) p_t(y) / p_s(y)`` with the prior chosen at export. It
loads with plain ``torch.jit.load``; fedshift need not be installed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedshift.common.calibration import Calibration
from fedshift.common.errors import ConfigError
from fedshift.common.io import atomic_write_bytes
from fedshift.common.model import FedshiftModel

logger = logging.getLogger(__name__)

METADATA_FILE = "fedshift.json"  # extra file inside the TorchScript archive: what the program applies
# as predict's --prior: the bundle's stored estimate; calibrated under the training prior; raw softmax
PRIOR_CHOICES = ("stored", "training", "none")
INPUTS = {1: "(N, H, W) or (N, 1, H, W) grey", 3: "(N, H, W, 3) or (N, 3, H, W) colour"}
PARITY_TOLERANCE = 1e-5  # the exported program must match the in-process model this closely


class _CorrectedHead(nn.Module):
    """Preprocessed images ``(N, C, S, S)`` in [0, 1] -> corrected probabilities (float64)."""

    def __init__(self, model: FedshiftModel, weights: np.ndarray, bias: np.ndarray, log_ratio: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float64))
        self.register_buffer("log_ratio", torch.as_tensor(log_ratio, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).double()
        # softmax(w z + b) * p_t / p_s, renormalised == softmax(w z + b + log(p_t / p_s))
        return torch.softmax(logits * self.weights + self.bias + self.log_ratio, dim=1)


class _Program(nn.Module):
    """Shape and dtype handling and the resize of ``to_tensor``, scripted around the traced model."""

    def __init__(self, core: nn.Module, image_size: int, channels: int) -> None:
        super().__init__()
        self.core = core
        self.image_size = image_size
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels == 1 and images.dim() == 3:
            x = images.unsqueeze(1)
        elif images.dim() == 4 and images.size(1) == self.channels:
            x = images
        elif self.channels == 3 and images.dim() == 4 and images.size(3) == 3:
            x = images.permute(0, 3, 1, 2)
        elif self.channels == 1:
            raise RuntimeError("Expected grey images of shape (N, H, W) or (N, 1, H, W)")
        else:
            raise RuntimeError("Expected colour images of shape (N, 3, H, W) or (N, H, W, 3)")
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        x = x.to(torch.float32) / scale
        size = self.image_size
        if x.size(2) != size or x.size(3) != size:
            x = F.interpolate(x, size=[size, size], mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)
        return self.core(x)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence TorchScript's deprecation notice: it is for torch's own users, not for this command's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def log_prior_ratio(source_prior: np.ndarray | None, target_prior: np.ndarray | None, c: int) -> np.ndarray:
    """``log(p_t / p_s)`` per class; zeros (no correction) when either prior is missing."""
    if source_prior is None or target_prior is None:
        return np.zeros(c)
    ps, pt = np.asarray(source_prior, dtype=np.float64), np.asarray(target_prior, dtype=np.float64)
    if ps.shape != (c,) or pt.shape != (c,) or not (np.all(ps > 0) and np.all(pt > 0)):
        raise ConfigError(
            f"Expected two positive priors over {c} classes, but got {ps.tolist()} and {pt.tolist()}; "
            "export with --prior none"
        )
    return np.log(pt / pt.sum()) - np.log(ps / ps.sum())


def build_program(
    model: FedshiftModel,
    calibration: Calibration | None = None,
    source_prior: np.ndarray | None = None,
    target_prior: np.ndarray | None = None,
) -> torch.jit.ScriptModule:
    """The TorchScript program for ``model`` with ``calibration`` and the ``source -> target`` prior."""
    c = model.config.num_classes
    cal = calibration if calibration is not None else Calibration.identity(c)
    model = copy.deepcopy(model).cpu()
    model.train(False)
    model.requires_grad_(False)
    head = _CorrectedHead(model, cal.weights, cal.bias, log_prior_ratio(source_prior, target_prior, c))
    size, channels = model.config.image_size, model.config.in_chans
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(head, example, check_trace=False)
        program = torch.jit.script(_Program(traced, size, channels))
    with torch.no_grad():
        gap = float((program(example) - head(example)).abs().max())
    if not gap <= PARITY_TOLERANCE:
        raise ConfigError(
            f"Expected the exported program to match the model to {PARITY_TOLERANCE}, but it differs by "
            f"{gap:.3g}; this backbone does not trace: use fedshift predict instead"
        )
    return program


def save_program(program: torch.jit.ScriptModule, out: str | Path, metadata: dict[str, Any]) -> None:
    """Write the program atomically, with ``metadata`` as the archive's ``fedshift.json``."""
    buffer = io.BytesIO()
    extra = {METADATA_FILE: json.dumps(metadata, indent=2, sort_keys=True)}
    with _quiet_jit():
        torch.jit.save(program, buffer, _extra_files=extra)
    atomic_write_bytes(out, buffer.getvalue())


def export_bundle(bundle_dir: str | Path, out: str | Path, prior: str = "stored") -> dict[str, Any]:
    """Export a site model bundle to ``out``; returns the metadata written beside the program."""
    from fedshift.client.bundle import load_bundle

    if prior not in PRIOR_CHOICES:
        raise ConfigError(f"Expected --prior to be one of {list(PRIOR_CHOICES)}, but got {prior!r}")
    bundle = load_bundle(bundle_dir)
    correction = bundle.correction
    calibration = correction.calibration if correction is not None and prior != "none" else None
    source = target = None
    if correction is not None and prior == "stored":
        source, target = correction.estimate.source_prior, correction.estimate.prior
    program = build_program(bundle.model, calibration, source, target)
    metadata = {
        "input": INPUTS[bundle.model_config.in_chans] + "; uint8 0..255 or float in [0, 1]",
        "image_channels": bundle.model_config.in_chans,
        "output": "(N, C) float64 corrected class probabilities",
        "image_size": bundle.model_config.image_size,
        "prior": prior,
        "calibration": calibration.kind if calibration is not None else "identity",
        "source_prior": None if source is None else np.asarray(source).tolist(),
        "target_prior": None if target is None else np.asarray(target).tolist(),
        "threshold": correction.threshold if correction is not None else None,
        "card": bundle.card,
    }
    save_program(program, out, metadata)
    logger.info("Exported %s to %s (prior: %s)", bundle.path, out, prior)
    return metadata


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a site model bundle as a TorchScript program",
        description="Write a self-contained TorchScript program that maps images (grey (N, H, W) or "
        "(N, 1, H, W), or colour (N, H, W, 3) or (N, 3, H, W) for a colour model; uint8 0..255 or float "
        "in [0, 1]) to corrected class "
        "probabilities: the site's model, its calibration and its prior correction. Load it "
        "with torch.jit.load; fedshift is not needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="site model bundle (or the site's state dir)")
    p.add_argument("--out", type=Path, required=True, help="the program file to write, e.g. model.pt")
    p.add_argument(
        "--prior",
        default="stored",
        choices=PRIOR_CHOICES,
        help="stored: calibrated and corrected to the bundle's prior estimate; training: calibrated "
        "only; none: the model's own softmax",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metadata = export_bundle(args.model, args.out, args.prior)
    print(f"wrote {args.out}: input {metadata['input']}; output {metadata['output']}")
    return 0
