"""Parameter-efficient adapters: LoRA updates on pointwise layers and the input adapter.

LoRA modules wrap a frozen 1x1 convolution or linear layer ``W`` and add a
low-rank update ``(alpha / r) * B @ A``; ``B`` starts at zero, so a freshly
adapted backbone computes exactly what the pretrained one did. Pointwise layers
are chosen on purpose: their per-sample gradients are cheap (no depthwise
convolutions), which keeps DP-SGD affordable.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from fedshift.common.errors import ConfigError


class LoRAConv1x1(nn.Module):
    """A frozen 1x1 ``nn.Conv2d`` plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_down = nn.Conv2d(
            base.in_channels, rank, kernel_size=1, stride=cast(tuple[int, int], base.stride), bias=False
        )
        self.lora_up = nn.Conv2d(rank, base.out_channels, kernel_size=1, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


LORA_TYPES = (LoRAConv1x1, LoRALinear)


def _is_pointwise_conv(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), 0)
    )


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages, shallow to deep, found through timm's common layouts."""
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(backbone, attr, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq) > 0:
            return list(seq)
    resnet = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in resnet):
        return [m for m in resnet if m is not None]
    raise ConfigError(
        f"Expected the backbone {type(backbone).__name__} to expose stages (blocks/stages/layers/"
        "layer1-4) for adapters, but it has none; use --adapter-stages 0 (head only)"
    )


def inject_lora(backbone: nn.Module, *, rank: int, last_stages: int, alpha: float | None = None) -> list[str]:
    """Wrap every pointwise conv / linear layer in the last ``last_stages`` stages with LoRA.

    Returns the dotted names of the wrapped layers. ``rank == 0`` or
    ``last_stages == 0`` adds nothing (a linear probe).
    """
    if rank < 0 or last_stages < 0:
        raise ConfigError(
            f"Expected adapter rank and stages to be >= 0, but got rank={rank}, stages={last_stages}"
        )
    if rank == 0 or last_stages == 0:
        return []
    stages = backbone_stages(backbone)
    if last_stages > len(stages):
        raise ConfigError(
            f"Expected --adapter-stages to be at most {len(stages)} for this backbone, but got {last_stages}"
        )
    scale_alpha = float(rank if alpha is None else alpha)
    chosen = {id(m) for m in stages[-last_stages:]}
    wrapped: list[str] = []
    for stage_name, stage in backbone.named_modules():
        if id(stage) not in chosen:
            continue
        for name, parent in list(stage.named_modules()):
            for child_name, child in list(parent.named_children()):
                if _is_pointwise_conv(child):
                    setattr(parent, child_name, LoRAConv1x1(child, rank, scale_alpha))
                elif type(child) is nn.Linear:
                    setattr(parent, child_name, LoRALinear(child, rank, scale_alpha))
                else:
                    continue
                wrapped.append(".".join(p for p in (stage_name, name, child_name) if p))
    return wrapped


class InputAdapter(nn.Module):
    """A learnable 1x1 map from ``in_chans`` image channels to the backbone's 3.

    Initialised to what the pretrained pipeline does with a grayscale image:
    copy it to every channel and normalise with the backbone's mean and std.
    It is site-local: each hospital learns its own intensity mapping.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_chans: int = 1) -> None:
        super().__init__()
        out = len(mean)
        if in_chans not in (1, out):
            raise ConfigError(
                f"Expected images with 1 or {out} channels, but got {in_chans}; convert them "
                "to grayscale or RGB"
            )
        self.conv = nn.Conv2d(in_chans, out, kernel_size=1, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(out):
                self.conv.weight[c, 0 if in_chans == 1 else c, 0, 0] = 1.0 / std[c]
                cast(torch.Tensor, self.conv.bias)[c] = -mean[c] / std[c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ChannelAffine(nn.Module):
    """``y = x * weight[c] + bias[c]``: the trainable half of a norm layer whose statistics are frozen.

    Kept as its own module so that per-sample gradients (DP-SGD) see a layer
    with parameters and no buffers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class FrozenNormAct(nn.Module):
    """A BatchNorm in inference form: frozen running statistics, then a site-local affine.

    Computes exactly what the pretrained ``BatchNorm`` (timm's ``BatchNormAct2d``
    included: its dropout and activation come along) computes in eval mode, with
    the affine split off into :class:`ChannelAffine` so each site can tune it.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ConfigError(f"Expected a BatchNorm with running statistics, but {bn} tracks none")
        channels = bn.num_features
        weight = bn.weight if bn.weight is not None else torch.ones(channels)
        bias = bn.bias if bn.bias is not None else torch.zeros(channels)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = float(bn.eps)
        self.affine = ChannelAffine(weight, bias)
        self.drop = cast(nn.Module, getattr(bn, "drop", nn.Identity()))
        self.act = cast(nn.Module, getattr(bn, "act", nn.Identity()))
        if getattr(self.act, "inplace", False):  # in-place on a hooked output breaks per-sample grads
            self.act = copy.copy(self.act)
            setattr(self.act, "inplace", False)  # noqa: B010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = cast(torch.Tensor, self.running_mean).view(shape)
        inv_std = torch.rsqrt(cast(torch.Tensor, self.running_var) + self.eps).view(shape)
        return self.act(self.drop(self.affine((x - mean) * inv_std)))


def split_batchnorms(root: nn.Module, within: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """Replace every BatchNorm inside ``within`` by :class:`FrozenNormAct`.

    Returns ``(dotted name, trainable module)`` for each norm found: the
    :class:`ChannelAffine` of a replaced BatchNorm, or a GroupNorm/LayerNorm
    itself (those have no statistics and stay as they are).
    """
    chosen = {id(m) for block in within for m in block.modules()}
    out: list[tuple[str, nn.Module]] = []
    for parent_name, parent in list(root.named_modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) not in chosen:
                continue
            name = ".".join(p for p in (parent_name, child_name) if p)
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                frozen = FrozenNormAct(child)
                setattr(parent, child_name, frozen)
                out.append((name, frozen.affine))
            elif isinstance(child, nn.GroupNorm | nn.LayerNorm) and child.weight is not None:
                out.append((name, child))
    return out
