"""The stock Opacus baseline of the DP benchmark: fedshift's backbone, made DP-SGD-ready the stock way.

What Flower's Opacus example does, on the same pretrained backbone: every parameter
trainable, a new 2-class head, every BatchNorm (timm's fused ``BatchNormAct2d``
included, which ``ModuleValidator.fix`` misses) replaced by GroupNorm.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from fedshift.common.backbones import backbone_norm, create_backbone

STOCK_BACKBONE = "efficientnet_lite0"


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
