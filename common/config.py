"""Run configuration: the Flower run config (kebab-case keys) turned into dataclasses once.

The ServerApp and the ClientApp read ``context.run_config`` at their entry point
and call :meth:`FederationConfig.from_run_config`; nothing below them sees the
raw dictionary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings, identical at every site."""

    local_epochs: int = 1  # passes over the site's training split per round
    batch_size: int = 32  # samples per step
    learning_rate: float = 1e-3  # AdamW learning rate for the trainable parameters
    weight_decay: float = 0.0  # AdamW weight decay

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError(
                "Expected local-epochs >= 1, batch-size >= 1 and learning-rate > 0, but got "
                f"{self.local_epochs}, {self.batch_size}, {self.learning_rate}"
            )


@dataclass(frozen=True)
class FederationConfig:
    """One federation: rounds, model, local training and where things live."""

    num_rounds: int = 10  # federated rounds
    min_nodes: int = 2  # fewest sites a round may run with
    run_dir: str = "runs/flower"  # server: checkpoint and results go here
    sites_root: str = ""  # simulation: site k's data lives in <sites-root>/site-k/
    device: str = "auto"  # simulation default for every site: auto, cpu or cuda:N
    seed: int = 0  # seeds initial adapters and local shuffling
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"Expected num-server-rounds >= 1, but got {self.num_rounds}")
        if self.min_nodes < 1:
            raise ConfigError(f"Expected min-nodes >= 1, but got {self.min_nodes}")

    def to_run_config(self) -> dict[str, int | float | str]:
        """The kebab-case run config that :meth:`from_run_config` reads back."""
        m, t = self.model, self.train
        return {
            "num-server-rounds": self.num_rounds,
            "min-nodes": self.min_nodes,
            "run-dir": self.run_dir,
            "sites-root": self.sites_root,
            "device": self.device,
            "seed": self.seed,
            "backbone": m.backbone,
            "backbone-weights": m.weights,
            "num-classes": m.num_classes,
            "image-size": m.image_size,
            "adapter-rank": m.adapter_rank,
            "adapter-stages": m.adapter_stages,
            "local-norm": m.local_norm,
            "local-epochs": t.local_epochs,
            "batch-size": t.batch_size,
            "learning-rate": t.learning_rate,
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse a Flower run config; unknown keys and wrong types are refused."""
        defaults = cls().to_run_config()
        unknown = sorted(set(run_config) - set(defaults))
        if unknown:
            raise ConfigError(
                f"Expected run-config keys among {sorted(defaults)}, but got unknown {unknown}; "
                "check the spelling (keys are kebab-case)"
            )
        values = {**defaults, **run_config}

        def get(key: str) -> Any:
            want = type(defaults[key])
            value = values[key]
            if want is float and isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if want is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                raise ConfigError(f"Expected run-config {key!r} to be {want.__name__}, but got {value!r}")
            return value

        seed = get("seed")
        return cls(
            num_rounds=get("num-server-rounds"),
            min_nodes=get("min-nodes"),
            run_dir=get("run-dir"),
            sites_root=get("sites-root"),
            device=get("device"),
            seed=seed,
            model=ModelConfig(
                backbone=get("backbone"),
                weights=get("backbone-weights"),
                num_classes=get("num-classes"),
                image_size=get("image-size"),
                adapter_rank=get("adapter-rank"),
                adapter_stages=get("adapter-stages"),
                local_norm=get("local-norm"),
                seed=seed,
            ),
            train=TrainConfig(
                local_epochs=get("local-epochs"),
                batch_size=get("batch-size"),
                learning_rate=get("learning-rate"),
            ),
        )
