"""Run configuration: the Flower run config (kebab-case keys) turned into dataclasses once.

The ServerApp and the ClientApp read ``context.run_config`` at their entry point
and call :meth:`FederationConfig.from_run_config`; nothing below them sees the
raw dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from fedshift.common.errors import ConfigError, PrivacyError
from fedshift.common.model import ModelConfig
from fedshift.common.privacy import ACCOUNTANTS, MAX_DELTA, check_budget


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


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(str(value))
        except ValueError:
            raise PrivacyError(f"Expected {key} to be a number, but got {value!r}") from None
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"Expected {key} to be true or false, but got {value!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at a site: whether, how much budget, and how the noise is set.

    The budget (``epsilon``, ``delta``) is the site's *lifetime* budget: the
    ledger adds up every run, and a site refuses to train past it.
    """

    enabled: bool = False  # DP-SGD on; deployment turns it on unless the site sets dp=false
    epsilon: float = math.nan  # lifetime budget epsilon at this site; required when enabled
    delta: float = MAX_DELTA  # delta of the budget; <= 1/n_train and <= 1e-5
    clip_norm: float = 1.0  # per-sample gradient norm bound C
    noise_multiplier: float = 0.0  # sigma; 0 = smallest sigma fitting the budget over planned rounds
    accountant: str = "rdp"  # rdp or prv (Opacus accountants)
    secure_rng: bool = False  # noise and sampling from the OS CSPRNG; turn on in production

    # run-config / node-config key -> field
    KEYS: ClassVar[dict[str, str]] = {
        "dp": "enabled",
        "dp-epsilon": "epsilon",
        "dp-delta": "delta",
        "dp-clip-norm": "clip_norm",
        "dp-noise-multiplier": "noise_multiplier",
        "dp-accountant": "accountant",
        "dp-secure-rng": "secure_rng",
    }

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"Expected dp-accountant to be one of {sorted(ACCOUNTANTS)}, but got {self.accountant!r}"
            )
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PrivacyError(f"Expected dp-clip-norm to be a finite number > 0, but got {self.clip_norm!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(
                f"Expected dp-noise-multiplier to be >= 0 (0 = derive it from the budget), but got "
                f"{self.noise_multiplier!r}"
            )
        if self.enabled:
            check_budget(self.epsilon, self.delta)

    def with_values(self, values: Mapping[str, Any]) -> PrivacyConfig:
        """A copy with the ``dp-*`` keys present in ``values`` applied (parsed and checked)."""
        changes: dict[str, Any] = {}
        for key, name in self.KEYS.items():
            if key not in values:
                continue
            value = values[key]
            if name in ("enabled", "secure_rng"):
                changes[name] = _flag(key, value)
            elif name == "accountant":
                changes[name] = str(value)
            else:
                changes[name] = _number(key, value)
        return replace(self, **changes)

    def to_run_config(self) -> dict[str, int | float | str]:
        return {
            "dp": self.enabled,
            "dp-epsilon": self.epsilon if math.isfinite(self.epsilon) else 0.0,
            "dp-delta": self.delta,
            "dp-clip-norm": self.clip_norm,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-accountant": self.accountant,
            "dp-secure-rng": self.secure_rng,
        }


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
    # simulation: every site's privacy settings; deployment: defaults that the site config overrides
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

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
            **self.privacy.to_run_config(),
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
            privacy=_privacy_from_run_config(values),
        )


def _privacy_from_run_config(values: Mapping[str, Any]) -> PrivacyConfig:
    """The run config's dp-* keys; an epsilon of 0 there means "not set"."""
    eps = values.get("dp-epsilon", 0.0)
    present = {k: v for k, v in values.items() if k in PrivacyConfig.KEYS and k != "dp-epsilon"}
    base = PrivacyConfig()
    if _number("dp-epsilon", eps) != 0.0:
        base = replace(base, epsilon=_number("dp-epsilon", eps))
    return base.with_values(present)
