"""Local optimisation settings (TrainConfig): the same at every site, declared once per run-config key."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedshift.common.settings import check_fields, setting


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings, identical at every site."""

    local_epochs: int = setting(
        "local-epochs",
        1,
        help="passes over the site's training split per round",
        minimum=1,
        maximum=20,
        cap=True,
    )
    batch_size: int = setting(
        "batch-size",
        32,
        help="expected (Poisson) batch size, samples per step",
        minimum=1,
        maximum=1024,
        cap=True,
    )
    learning_rate: float = setting(
        "learning-rate", 1e-3, help="AdamW learning rate of the trainable parameters", above=0
    )
    weight_decay: float = field(default=0.0)  # AdamW weight decay (not a run-config key)
    lr_decay: float = setting(
        "lr-decay",
        1.0,
        help="discriminative learning rates: lr * lr-decay ** depth (head 0); 1 = one learning rate",
        above=0,
        maximum=1,
        fix="e.g. 0.5 (each level deeper learns at half the rate), or 1 for one learning rate",
    )
    unfreeze_every: int = setting(
        "unfreeze-every",
        0,
        help="progressive unfreezing: one level deeper every N rounds; 0 = off",
        minimum=0,
        fix="e.g. 2 (the head trains alone for 2 rounds, then one stage more every 2 rounds), or 0",
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def trainable_depth(self, server_round: int) -> int | None:
        """Progressive unfreezing: the deepest level that trains in ``server_round`` (None = all)."""
        if self.unfreeze_every == 0:
            return None
        return max(0, server_round - 1) // self.unfreeze_every
