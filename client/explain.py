"""Grad-CAM explanations: where the model looked for the class it predicted.

Grad-CAM (Selvaraju et al. 2017) on the output of the backbone's last stage:
the channels are weighted by the spatial mean of the predicted class's logit
gradient, summed, clipped at zero and upsampled (bilinear) to the image. The
PNG overlays blend that map, as a heat colour, over the grayscale image.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedshift.common.adapters import backbone_stages
from fedshift.common.data import to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.io import atomic_write_bytes
from fedshift.common.model import FedshiftModel

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45  # weight of the heat colour in the overlay where the map is at its maximum
OVERLAY_SUFFIX = "-gradcam.png"


def target_layer(model: FedshiftModel, stage: int = -1) -> nn.Module:
    """The backbone stage Grad-CAM reads: by default the last convolutional one."""
    stages = backbone_stages(model.backbone)
    if not -len(stages) <= stage < len(stages):
        raise ConfigError(f"Expected a stage index in [-{len(stages)}, {len(stages) - 1}], but got {stage}")
    return stages[stage]


def _cam_batch(model: FedshiftModel, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at the layer's resolution ``(n, h, w)`` and predicted classes ``(n,)`` for one batch."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            predicted = logits.argmax(dim=1)
            logits.gather(1, predicted[:, None]).sum().backward()
    finally:
        handle.remove()
    activation = captured[-1]
    if activation.grad is None:
        raise ConfigError("Expected gradients at the backbone's last stage, but none flowed; cannot explain")
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))
    return cam.detach(), predicted.detach()


def grad_cam(
    model: FedshiftModel, images: np.ndarray, *, stage: int = -1, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``(N, H, W)`` (non-negative, at the images' own size) and predicted classes ``(N,)``.

    ``images``: ``(N, H, W)`` uint8, as the loaders read them. The model's
    parameters get no gradient left behind (they are zeroed after each batch).
    """
    layer = target_layer(model, stage)
    model.cpu()
    model.train(False)
    maps: list[np.ndarray] = []
    classes: list[np.ndarray] = []
    height, width = images.shape[1:]
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], model.config.image_size)
        cam, predicted = _cam_batch(model, x, layer)
        model.zero_grad(set_to_none=True)
        up = F.interpolate(cam[:, None], size=(height, width), mode="bilinear", align_corners=False)
        maps.append(up[:, 0].clamp_min(0.0).numpy().astype(np.float64))
        classes.append(predicted.numpy())
    if not maps:
        return np.zeros((0, height, width)), np.zeros(0, dtype=np.int64)
    return np.concatenate(maps), np.concatenate(classes).astype(np.int64)


def _heat(values: np.ndarray) -> np.ndarray:
    """A blue -> green -> yellow -> red colour ``(H, W, 3)`` in [0, 1] for values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    anchors = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    position = v[..., 0] * (len(anchors) - 1)
    low = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    frac = (position - low)[..., None]
    return np.asarray(anchors[low] * (1.0 - frac) + anchors[low + 1] * frac)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` overlay of ``cam`` (scaled to its maximum) on the grayscale ``image``."""
    peak = float(cam.max())
    level = cam / peak if peak > 0 else np.zeros_like(cam)
    grey = np.repeat(image.astype(np.float64)[..., None] / 255.0, 3, axis=2)
    alpha = OVERLAY_ALPHA * level[..., None]
    rgb = grey * (1.0 - alpha) + _heat(level) * alpha
    return np.asarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_explanations(
    model: FedshiftModel,
    images: np.ndarray,
    out_dir: str | Path,
    k: int,
    ids: list[str] | None = None,
) -> list[Path]:
    """Grad-CAM overlays of the predicted class for the first ``k`` images, one PNG each (atomic).

    Files are ``<id>-gradcam.png`` (``ids[i]``, or the image's index, zero-padded).
    Returns the paths written, in image order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"Expected the number of images to explain to be a positive integer, but got {k!r}")
    if ids is not None and len(ids) != len(images):
        raise ConfigError(f"Expected one id per image ({len(images)}), but got {len(ids)} ids")
    chosen = images[:k]
    cams, classes = grad_cam(model, chosen)
    out = Path(out_dir)
    names = [Path(ids[i]).name if ids is not None else f"{i:05d}" for i in range(len(chosen))]
    paths = []
    for name, image, cam in zip(names, chosen, cams, strict=True):
        path = out / f"{name}{OVERLAY_SUFFIX}"
        atomic_write_bytes(path, _png(overlay(image, cam)))
        paths.append(path)
    logger.info("Grad-CAM: %d overlay(s) in %s (predicted classes %s)", len(paths), out, classes.tolist())
    return paths
