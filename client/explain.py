"""Grad-CAM explanations: where the model looked for the class it predicted.

Grad-CAM (Selvaraju et al. 2017) on the backbone's last convolutional output,
the feature map the head pools; where that map is coarser than 7x7 (a model
under 224 px), on the deepest stage that is not; or on a stage asked for. The
channels are weighted by the spatial mean of the explained class's logit
gradient, summed, clipped at zero and upsampled (bilinear) to the image. The PNG
overlays blend that map, from half its peak up, as a heat colour over the image.
Where these maps fall on SYNTHETIC lesions: simulations/benchmarks/gradcam.py.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedshift.common.adapters import backbone_stages
from fedshift.common.data import to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.io import atomic_write_folder
from fedshift.common.model import FedshiftModel

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45  # weight of the heat colour in the overlay where the map is at its maximum
OVERLAY_SUFFIX = "-gradcam.png"
DISPLAY_FLOOR = 0.5  # the share of the map's peak below which the overlay shows no heat
MIN_MAP_SIDE = 7  # a coarser map (e.g. 2x2 at 64 px) cannot point at a lesion
AUTO, POOLED = "auto", "pooled"  # ``stage``: chosen by map size; the feature map the head pools
Stage: TypeAlias = int | str
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def target_layer(model: FedshiftModel, stage: int = -1) -> nn.Module:
    """The backbone stage ``stage`` (an index into its stages, shallow to deep)."""
    stages = backbone_stages(model.backbone)
    if not -len(stages) <= stage < len(stages):
        raise ConfigError(f"Expected a stage index in [-{len(stages)}, {len(stages) - 1}], but got {stage}")
    return stages[stage]


def _pooled_input(model: FedshiftModel) -> nn.Module:
    """The module that pools the backbone's final feature map (timm's ``global_pool``)."""
    pool = getattr(model.backbone, "global_pool", None)
    if not isinstance(pool, nn.Module):
        raise ConfigError(
            f"Expected the backbone {type(model.backbone).__name__} to pool its features through "
            "global_pool, but it has none; pass a stage index instead"
        )
    return pool


def _map_sides(model: FedshiftModel) -> tuple[int, list[int]]:
    """The side of the feature map the head pools and of each stage's output, at the model's input size."""
    sides: list[int] = []
    hooks = [
        s.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
        for s in backbone_stages(model.backbone)
    ]
    hooks.append(
        _pooled_input(model).register_forward_pre_hook(lambda _m, args: sides.append(args[0].shape[-1]))
    )
    size = model.config.image_size
    try:
        with torch.no_grad():
            model.train(False)
            model(torch.zeros(1, model.config.in_chans, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return sides[-1], sides[:-1]


def resolve_stage(model: FedshiftModel, stage: Stage = AUTO) -> Stage:
    """``POOLED`` or a negative stage index: what ``stage`` explains for this model.

    ``AUTO``: the feature map the head pools where it is at least 7x7 (a model at
    >= 224 px), else the deepest stage whose map is (with a warning): at 64 px the
    pooled map is 2x2 and scores at chance on SYNTHETIC lesions, an 8x8 stage does not
    (simulations/benchmarks/gradcam.py).
    """
    if stage == POOLED:
        return POOLED
    if isinstance(stage, int) and not isinstance(stage, bool):
        target_layer(model, stage)
        return stage - len(backbone_stages(model.backbone)) if stage >= 0 else stage
    if stage != AUTO:
        raise ConfigError(f"Expected a stage index, {AUTO!r} or {POOLED!r}, but got {stage!r}")
    pooled, sides = _map_sides(model)
    if pooled >= MIN_MAP_SIDE:
        return POOLED
    fine = [i - len(sides) for i, side in enumerate(sides) if side >= MIN_MAP_SIDE]
    if not fine:
        return POOLED
    logger.warning(
        "Grad-CAM: the map the head pools is only %dx%d for this %d px model; explaining stage %d (%dx%d) "
        "instead. Explanations need a model at >= 224 px",
        pooled,
        pooled,
        model.config.image_size,
        fine[-1],
        sides[fine[-1]],
        sides[fine[-1]],
    )
    return fine[-1]


def _cam_batch(
    model: FedshiftModel, x: torch.Tensor, stage: Stage, classes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at the layer's resolution ``(n, h, w)`` and the explained classes ``(n,)`` for one batch
    (``classes``, or the predicted ones)."""
    captured: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        tensor.retain_grad()
        captured.append(tensor)

    if stage == POOLED:
        handle = _pooled_input(model).register_forward_pre_hook(lambda _m, args: keep(args[0]))
    else:
        handle = target_layer(model, int(stage)).register_forward_hook(lambda _m, _i, out: keep(out))
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            predicted = logits.argmax(dim=1) if classes is None else classes
            logits.gather(1, predicted[:, None]).sum().backward()
    finally:
        handle.remove()
    activation = captured[-1]
    if activation.grad is None:
        raise ConfigError("Expected gradients at the explained layer, but none flowed; cannot explain")
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))
    return cam.detach(), predicted.detach()


def grad_cam(
    model: FedshiftModel,
    images: np.ndarray,
    *,
    stage: Stage = AUTO,
    classes: np.ndarray | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``(N, H, W)`` (non-negative, at the images' own size) and the classes explained ``(N,)``.

    ``images``: ``(N, H, W)`` or ``(N, H, W, 3)`` uint8, as the loaders read them. ``stage``: ``POOLED``
    for the backbone's last convolutional output, the feature map the head pools
    (there Grad-CAM is the classifier's own class activation map), a stage index,
    or ``AUTO`` (:func:`resolve_stage`).
    ``classes``: the class to explain per image (default: the model's prediction).
    The model's parameters get no gradient left behind (zeroed after each batch).
    """
    model.cpu()
    stage = resolve_stage(model, stage)
    model.train(False)
    maps: list[np.ndarray] = []
    explained: list[np.ndarray] = []
    height, width = images.shape[1:3]
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], model.config.image_size, model.config.in_chans)
        wanted = None if classes is None else torch.as_tensor(classes[start : start + batch_size]).long()
        cam, predicted = _cam_batch(model, x, stage, wanted)
        model.zero_grad(set_to_none=True)
        if not maps and min(cam.shape[1:]) < MIN_MAP_SIDE:
            logger.warning(
                "Grad-CAM's map is only %dx%d for this %d px model: the overlays are coarse; explanations "
                "need a model at >= 224 px",
                *cam.shape[1:],
                model.config.image_size,
            )
        up = F.interpolate(cam[:, None], size=(height, width), mode="bilinear", align_corners=False)
        maps.append(up[:, 0].clamp_min(0.0).numpy().astype(np.float64))
        explained.append(predicted.numpy())
    if not maps:
        return np.zeros((0, height, width)), np.zeros(0, dtype=np.int64)
    return np.concatenate(maps), np.concatenate(explained).astype(np.int64)


def _heat(values: np.ndarray) -> np.ndarray:
    """A blue -> green -> yellow -> red colour ``(H, W, 3)`` in [0, 1] for values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    anchors = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    position = v[..., 0] * (len(anchors) - 1)
    low = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    frac = (position - low)[..., None]
    return np.asarray(anchors[low] * (1.0 - frac) + anchors[low + 1] * frac)


def display_level(cam: np.ndarray) -> np.ndarray:
    """The overlay's heat level in [0, 1]: 0 up to half the map's peak, then linear to 1 at the peak.

    The overlay shows the map's peaks at their half maximum, not its low spread over the whole image.
    """
    peak = float(cam.max())
    if not peak > 0:
        return np.zeros_like(cam, dtype=np.float64)
    return np.asarray(np.clip((cam / peak - DISPLAY_FLOOR) / (1.0 - DISPLAY_FLOOR), 0.0, 1.0))


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` overlay of ``cam`` (at :func:`display_level`) on ``image``: a grey
    ``(H, W)`` one shown in grey, a colour ``(H, W, 3)`` one in its own colours."""
    level = display_level(cam)
    base = image.astype(np.float64) / 255.0
    base = base if base.ndim == 3 else np.repeat(base[..., None], 3, axis=2)
    alpha = OVERLAY_ALPHA * level[..., None]
    rgb = base * (1.0 - alpha) + _heat(level) * alpha
    return np.asarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_names(ids: list[str] | None, n: int) -> list[str]:
    """File names of the overlays: each id with its path separators and odd characters made ``_``
    (``00004`` for image 4 without ids), a ``-<index>`` added where two would clash."""
    names: list[str] = []
    for i in range(n):
        stem = _UNSAFE.sub("_", ids[i]).lstrip(".") if ids is not None else f"{i:05d}"
        name = f"{stem or i}{OVERLAY_SUFFIX}"
        if name in names:
            name = f"{stem}-{i}{OVERLAY_SUFFIX}"
        names.append(name)
    return names


def check_destination(out_dir: str | Path) -> Path:
    """The overlays' folder: new, or one holding only earlier overlays (it is replaced); else ConfigError."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Expected --explain {out} to be a folder, but it is a file; pass a folder path")
    others = (
        sorted(p.name for p in out.iterdir() if not p.name.endswith(OVERLAY_SUFFIX)) if out.is_dir() else []
    )
    if others:
        raise ConfigError(
            f"Expected --explain {out} to be a new folder or one holding only Grad-CAM overlays, but it "
            f"holds {others[0]!r}; pass a new folder"
        )
    return out


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(
            f"Expected the number of images to explain to be a positive integer, but got {k!r}; pass e.g. 8"
        )
    return k


def write_explanations(
    model: FedshiftModel,
    images: np.ndarray,
    out_dir: str | Path,
    k: int,
    ids: list[str] | None = None,
    classes: np.ndarray | None = None,
) -> list[Path]:
    """Grad-CAM overlays for the first ``k`` images, one PNG each, of ``classes`` (default: the predicted).

    The folder is written whole or not at all (common/io.py): files are named by
    :func:`overlay_names`. Returns the paths written, in image order.
    """
    check_k(k)
    for what, given in (("id", ids), ("class", classes)):
        if given is not None and len(given) != len(images):
            raise ConfigError(f"Expected one {what} per image ({len(images)}), but got {len(given)}")
    out = check_destination(out_dir)
    chosen = images[:k]
    cams, explained = grad_cam(model, chosen, classes=None if classes is None else classes[:k])
    names = overlay_names(ids, len(chosen))
    pngs = {name: _png(overlay(im, cam)) for name, im, cam in zip(names, chosen, cams, strict=True)}
    atomic_write_folder(out, pngs)
    logger.info("Grad-CAM: %d overlay(s) in %s (classes %s)", len(names), out, explained.tolist())
    return [out / name for name in names]
