"""The fedshift model: site-local input adapter -> frozen backbone with LoRA -> head.

Three groups of parameters, found by module type and position (never by name matching):

* **frozen**: the pretrained backbone, except what the fine-tuning strategy opens;
* **shared**: what the strategy trains in the backbone (by default LoRA updates)
  and the classification head; the only tensors that travel to the server and
  get aggregated;
* **site-local**: the input adapter and, in the trained stages, the affine half
  of every norm layer (FedBN-style; their statistics stay frozen); they stay at
  the hospital.

The strategies (:mod:`fedshift.common.finetune`): ``adapters`` (default),
``linear-probe``, ``partial``, ``norm-only``, ``full``.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fedshift.common.adapters import (
    LORA_TYPES,
    InputAdapter,
    inject_lora,
    split_batchnorms,
)
from fedshift.common.backbones import DEFAULT_BACKBONE, backbone_norm, create_backbone
from fedshift.common.errors import ConfigError
from fedshift.common.finetune import DEFAULT_FINETUNE, backbone_regions, check_finetune

logger = logging.getLogger(__name__)

HEAD_INITS: dict[str, str] = {  # ModelConfig.head_init
    "random": "torch's default (uniform, scaled by fan-in)",
    "zero": "zero weights and bias: no random logits to unlearn; data-independent, so free under DP",
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same model at the server and at every site."""

    backbone: str = DEFAULT_BACKBONE  # registry name or timm architecture
    weights: str = ""  # local weights file; empty = the registered backbone's bundled weights
    num_classes: int = 2  # output classes of the head
    image_size: int = 64  # side of the square input after resizing
    adapter_rank: int = 4  # LoRA rank; 0 = head only (linear probe)
    adapter_stages: int = 2  # k: LoRA (adapters) or every weight (partial) in the last k stages
    in_chans: int = 1  # channels of the input images: 1 grey, 3 colour (RGB)
    local_norm: bool = True  # FedBN-style: norm affine parameters of the adapted stages stay at the site
    seed: int = 0  # seeds the initial shared parameters
    finetune: str = DEFAULT_FINETUNE  # adapters, linear-probe, partial, norm-only or full
    head_init: str = "random"  # the head's initial weights: random (torch's default) or zero

    def __post_init__(self) -> None:
        check_finetune(self.finetune)
        checks = {
            "num_classes": self.num_classes >= 2,
            "image_size": self.image_size >= 16,
            "adapter_rank": self.adapter_rank >= 0,
            "adapter_stages": self.adapter_stages >= 0,
            "in_chans": self.in_chans in (1, 3),
            "head_init": self.head_init in HEAD_INITS,
        }
        keys = {"in_chans": "image-channels (1 or 3)"}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"Expected {keys.get(name, name.replace('_', '-'))} to be in range, but got "
                    f"{getattr(self, name)!r}; see `fedshift simulate --help`"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Expected model config keys among {sorted(known)}, but got {unknown}")
        return cls(**data)


@functools.lru_cache(maxsize=2)
def _cached_backbone(name: str, weights: str) -> nn.Module:
    return create_backbone(name, weights or None)


NORM_STATISTICS = ("running_mean", "running_var")


def _copy_into(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's own tensors of the same names (checked by the caller)."""
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


def norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer that normalises with running statistics (BatchNorms, frozen-statistics norms), with its
    name, in registration order (the backbone's forward order)."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if all(isinstance(getattr(m, stat, None), torch.Tensor) for stat in NORM_STATISTICS)
    ]


class FedshiftModel(nn.Module):
    """Input adapter, frozen backbone (with LoRA injected) and a linear head."""

    def __init__(self, backbone: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        mean, std = backbone_norm(backbone)
        cast(Any, backbone).reset_classifier(0)  # timm interface: features come out pooled
        for param in backbone.parameters():
            param.requires_grad_(False)
        torch.manual_seed(config.seed)
        self.input_adapter = InputAdapter(mean, std, in_chans=config.in_chans)
        self.backbone = backbone
        self.head = nn.Linear(int(cast(Any, backbone).num_features), config.num_classes)
        if config.head_init == "zero":  # data-independent, so free under DP: no random logits to unlearn
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self._setup_strategy(backbone, config)
        self.train(False)

    def _setup_strategy(self, backbone: nn.Module, config: ModelConfig) -> None:
        """Open the parts of the backbone that ``config.finetune`` trains; record groups and depths."""
        strategy, k = config.finetune, config.adapter_stages
        regions = backbone_regions(backbone)
        if strategy in ("adapters", "partial") and k > len(regions.stages):
            raise ConfigError(
                f"Expected --adapter-stages to be at most {len(regions.stages)} for this backbone, "
                f"but got {k}"
            )
        last = regions.stages[len(regions.stages) - k :] if k > 0 else []
        everything = [*regions.stem, *regions.stages, *regions.tail]
        self.adapted_layers: list[str] = []
        weights: list[nn.Module] = []  # modules whose own weights train
        norms: list[nn.Module] = []  # modules whose norm layers get a trainable affine
        if strategy == "adapters":
            self.adapted_layers = inject_lora(backbone, rank=config.adapter_rank, last_stages=k)
            norms = last if config.local_norm else []
        elif strategy == "partial":
            weights = norms = [*last, *regions.tail] if k > 0 else []
        elif strategy == "norm-only":
            norms = everything
        elif strategy == "full":
            weights = norms = everything
        affines = split_batchnorms(backbone, norms)
        norm_params = {id(p) for _, m in affines for p in m.parameters(recurse=False)}
        local_norms = config.local_norm and strategy != "norm-only"
        # not a ModuleDict: these modules already live inside the backbone, and registering them
        # twice would make Opacus hook (and count) their per-sample gradients twice
        self.local_norms: dict[str, nn.Module] = (
            {name.replace(".", "__"): module for name, module in affines} if local_norms else {}
        )
        opened = {id(p) for m in weights for p in m.parameters()} | {id(p) for p in self.lora_parameters()}
        if not local_norms:
            opened |= norm_params
        elif weights:
            opened -= norm_params
        self._shared_names = [n for n, p in backbone.named_parameters() if id(p) in opened]
        # depth of every trainable tensor: 0 head, 1 last stage and tail, ..., stem and input adapter
        depth: dict[int, int] = {id(p): 1 for m in regions.tail for p in m.parameters()}
        for index, stage in enumerate(regions.stages):
            depth.update({id(p): regions.depth_of_stage(index) for p in stage.parameters()})
        for module in [*regions.stem, self.input_adapter]:
            depth.update({id(p): regions.stem_depth for p in module.parameters()})
        depth.update({id(p): 0 for p in self.head.parameters()})
        self._depth = depth
        self.max_depth = regions.stem_depth

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.input_adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def train(self, mode: bool = True) -> FedshiftModel:
        """Train mode for the trainable parts; the frozen backbone keeps its statistics."""
        super().train(mode)
        self.backbone.eval()
        # modules that own trainable tensors follow ``mode`` (none has mode-dependent maths: norms
        # are split into frozen statistics and an affine), because Opacus only records activations
        # of modules in training mode
        trainable = {id(p) for p in self.trainable_parameters()}
        for module in self.backbone.modules():
            if any(id(p) in trainable for p in module.parameters(recurse=False)):
                module.train(mode)
        return self

    # ------------------------------------------------------- parameter groups
    def _shared_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.backbone.named_parameters())
        out = {f"backbone.{n}": params[n] for n in self._shared_names}
        out.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return out

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that travel: what the strategy trains in the backbone, and the head."""
        return {k: v.detach() for k, v in self._shared_params().items()}

    def load_shared_state_dict(self, state: dict[str, torch.Tensor] | dict[str, np.ndarray]) -> None:
        """Load shared tensors; keys and shapes must match exactly."""
        own = self.shared_state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ConfigError(
                f"Expected the shared tensors of this model, but {len(missing)} are missing "
                f"{missing[:2]} and {len(extra)} are unexpected {extra[:2]}; the server and the "
                "site must use the same backbone and adapter settings"
            )
        with torch.no_grad():
            for key, target in own.items():
                value = torch.as_tensor(np.asarray(state[key]))
                if tuple(value.shape) != tuple(target.shape):
                    raise ConfigError(
                        f"Expected shared tensor {key!r} to have shape {tuple(target.shape)}, "
                        f"but got {tuple(value.shape)}"
                    )
                target.copy_(value.to(target.dtype))

    def _local_params(self) -> dict[str, nn.Parameter]:
        out = {f"input_adapter.{k}": p for k, p in self.input_adapter.named_parameters()}
        for name, norm in self.local_norms.items():
            for k, p in norm.named_parameters(recurse=False):
                out[f"local_norms.{name}.{k}"] = p
        return out

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """Site-local tensors (never sent): the input adapter and the adapted stages' norm affines."""
        return {k: v.detach() for k, v in self._local_params().items()}

    def load_local_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self._local_params()
        if set(state) != set(own):
            raise ConfigError(
                f"Expected the site-local tensors {sorted(own)[:2]}..., but got {sorted(state)[:2]}...; "
                "the site state was saved for another model configuration: move it away"
            )
        _copy_into(own, state)

    def _norm_buffers(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{stat}": getattr(m, stat) for name, m in norm_layers(self) for stat in NORM_STATISTICS
        }

    def norm_statistics(self) -> dict[str, torch.Tensor]:
        """Every norm layer's running mean and variance (what test-time norm adaptation changes)."""
        return {k: v.detach().clone() for k, v in self._norm_buffers().items()}

    def load_norm_statistics(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the running statistics that :meth:`norm_statistics` returned; keys and shapes must match."""
        own = self._norm_buffers()
        bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise ConfigError(
                f"Expected the norm statistics of this model, but {bad[0]!r} does not fit; they were "
                "saved for another model configuration"
            )
        _copy_into(own, state)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The low-rank factors of every LoRA module (shared, trainable)."""
        return [
            p
            for m in self.backbone.modules()
            if isinstance(m, LORA_TYPES)
            for p in (m.lora_down.weight, m.lora_up.weight)
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        local = list(self._local_params().values())
        if self.config.finetune == "linear-probe":  # the head alone: the input adapter stays as built
            local = [p for p in local if not any(p is q for q in self.input_adapter.parameters())]
        return [*local, *self._shared_params().values()]

    def depth(self, param: nn.Parameter) -> int:
        """How deep ``param`` sits: 0 the head, 1 the last stage, ..., ``max_depth`` the stem."""
        return self._depth.get(id(param), self.max_depth)

    def freeze_for_training(self, max_depth: int | None = None) -> None:
        """requires_grad only on the trainable groups (shared + site-local) down to ``max_depth``."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.trainable_parameters():
            if max_depth is None or self.depth(param) <= max_depth:
                param.requires_grad_(True)


def build_model(config: ModelConfig) -> FedshiftModel:
    """A fresh model; the pretrained backbone is read from disk once per process."""
    backbone = copy.deepcopy(_cached_backbone(config.backbone, config.weights))
    model = FedshiftModel(backbone, config)
    model.freeze_for_training()
    return model


def size_report(model: FedshiftModel) -> dict[str, int]:
    """Parameter counts and float32 bytes: shared adapters vs. the full backbone."""
    shared = sum(t.numel() for t in model.shared_state_dict().values())
    local = sum(t.numel() for t in model.local_state_dict().values())
    lora = {id(p) for p in model.lora_parameters()}
    backbone = sum(p.numel() for p in model.backbone.parameters() if id(p) not in lora)
    return {
        "shared_params": shared,
        "shared_bytes": 4 * shared,
        "local_params": local,
        "backbone_params": backbone,
        "backbone_bytes": 4 * backbone,
    }
