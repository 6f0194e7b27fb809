"""Fine-tuning choices ("finetune"): which parts of the pretrained backbone train, and how deep each sits.

A fine-tuning choice decides three things, all from module types and positions (never from
name matching, so any timm backbone with stages works):

* which backbone modules become trainable (LoRA factors, whole stages, norm affines);
* which of them travel (shared) and which stay at the site (FedBN-style norm affines);
* each trainable tensor's **depth** (0 = the head, 1 = the last stage and what follows it,
  2 = the stage before it, ..., deepest = the stem and the input adapter), used by
  discriminative learning rates (``lr * lr_decay ** depth``) and progressive
  unfreezing (only tensors with depth <= the round's limit train).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedshift.common.adapters import backbone_stages
from fedshift.common.errors import ConfigError

# finetune -> what trains (the registry the run-config key and the CLI take their choices from)
FINETUNE_CHOICES: dict[str, str] = {
    "adapters": "LoRA on the pointwise layers of the last k stages, and the head (default)",
    "linear-probe": "the head only; the whole backbone and the input adapter stay frozen",
    "partial": "every weight of the last k stages and the layers after them, and the head",
    "norm-only": "the affine parameters of every norm layer (shared), and the head",
    "full": "every backbone weight, and the head (slow under DP: used with DP only when asked)",
}
DEFAULT_FINETUNE = "adapters"


def check_finetune(name: str) -> str:
    if name not in FINETUNE_CHOICES:
        listed = ", ".join(FINETUNE_CHOICES)
        raise ConfigError(
            f"Expected finetune to be one of {listed}, but got {name!r}; e.g. --finetune adapters"
        )
    return name


@dataclass(frozen=True)
class Regions:
    """A backbone cut along its depth: stem modules, stages (shallow to deep) and tail modules."""

    stem: list[nn.Module]
    stages: list[nn.Module]
    tail: list[nn.Module]

    def depth_of_stage(self, index: int) -> int:
        """Depth of stage ``index`` (0-based, shallow to deep): the last stage is 1."""
        return len(self.stages) - index

    @property
    def stem_depth(self) -> int:
        return len(self.stages) + 1


def backbone_regions(backbone: nn.Module) -> Regions:
    """Split ``backbone``'s direct children into stem, stages and tail by their order.

    The stages are :func:`fedshift.common.adapters.backbone_stages`; children
    registered before the first stage form the stem (e.g. ``conv_stem``, ``bn1``),
    children after the last form the tail (e.g. ``conv_head``, ``bn2``).
    """
    stages = backbone_stages(backbone)
    stage_ids = {id(s) for s in stages}
    stem: list[nn.Module] = []
    tail: list[nn.Module] = []
    seen_stage = False
    for child in backbone.children():
        contains = id(child) in stage_ids or any(id(m) in stage_ids for m in child.children())
        if contains:
            seen_stage = True
        elif seen_stage:
            tail.append(child)
        else:
            stem.append(child)
    return Regions(stem=stem, stages=stages, tail=tail)
