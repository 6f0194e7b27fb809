"""The fedshift model: site-local input adapter -> frozen backbone with LoRA -> head.

Three groups of parameters, found by module type (never by name matching):

* **frozen**: the pretrained backbone;
* **shared**: LoRA updates and the classification head; the only tensors that
  travel to the server and get aggregated;
* **site-local**: the input adapter and, in the adapted stages, the affine half
  of every norm layer (FedBN-style; their statistics stay frozen); they stay at
  the hospital.
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
    backbone_stages,
    inject_lora,
    split_batchnorms,
)
from fedshift.common.backbones import DEFAULT_BACKBONE, backbone_norm, create_backbone
from fedshift.common.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the same model at the server and at every site."""

    backbone: str = DEFAULT_BACKBONE  # registry name or timm architecture
    weights: str = ""  # local weights file; empty = the registered backbone's bundled weights
    num_classes: int = 2  # output classes of the head
    image_size: int = 64  # side of the square input after resizing
    adapter_rank: int = 4  # LoRA rank; 0 = head only (linear probe)
    adapter_stages: int = 2  # LoRA in the pointwise layers of the last k stages
    in_chans: int = 1  # channels of the input images (1 = grayscale)
    local_norm: bool = True  # FedBN-style: norm affine parameters of the adapted stages stay at the site
    seed: int = 0  # seeds the initial shared parameters

    def __post_init__(self) -> None:
        checks = {
            "num_classes": self.num_classes >= 2,
            "image_size": self.image_size >= 16,
            "adapter_rank": self.adapter_rank >= 0,
            "adapter_stages": self.adapter_stages >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"Expected {name.replace('_', '-')} to be in range, but got "
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
        self.adapted_layers = inject_lora(
            backbone, rank=config.adapter_rank, last_stages=config.adapter_stages
        )
        self.input_adapter = InputAdapter(mean, std, in_chans=config.in_chans)
        # not a ModuleDict: these modules already live inside the backbone, and registering them
        # twice would make Opacus hook (and count) their per-sample gradients twice
        self.local_norms: dict[str, nn.Module] = {}
        if config.local_norm and config.adapter_stages > 0:
            stages = backbone_stages(backbone)[-config.adapter_stages :]
            for name, module in split_batchnorms(backbone, stages):
                self.local_norms[name.replace(".", "__")] = module
        self.backbone = backbone
        self.head = nn.Linear(int(cast(Any, backbone).num_features), config.num_classes)
        self.train(False)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.input_adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def train(self, mode: bool = True) -> FedshiftModel:
        """Train mode for the trainable parts; the frozen backbone keeps its statistics."""
        super().train(mode)
        self.backbone.eval()
        # adapters inside the backbone follow ``mode`` (they have no mode-dependent maths, but
        # Opacus only records activations of modules in training mode)
        for module in self.backbone.modules():
            if isinstance(module, LORA_TYPES):
                module.lora_down.train(mode)
                module.lora_up.train(mode)
        for module in self.local_norms.values():
            module.train(mode)
        return self

    # ------------------------------------------------------- parameter groups
    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that travel: LoRA updates and the head (frozen bases excluded)."""
        lora_modules = {
            f"backbone.{n}": m for n, m in self.backbone.named_modules() if isinstance(m, LORA_TYPES)
        }
        out: dict[str, torch.Tensor] = {}
        for prefix, module in lora_modules.items():
            out[f"{prefix}.lora_down.weight"] = module.lora_down.weight
            out[f"{prefix}.lora_up.weight"] = module.lora_up.weight
        for name, param in self.head.named_parameters():
            out[f"head.{name}"] = param
        return {k: v.detach() for k, v in out.items()}

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
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(state[key])

    def lora_parameters(self) -> list[nn.Parameter]:
        """The low-rank factors of every LoRA module (shared, trainable)."""
        return [
            p
            for m in self.backbone.modules()
            if isinstance(m, LORA_TYPES)
            for p in (m.lora_down.weight, m.lora_up.weight)
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self._local_params().values(), *self.head.parameters(), *self.lora_parameters()]

    def freeze_for_training(self) -> None:
        """requires_grad only on the trainable groups (shared + site-local)."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.trainable_parameters():
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
