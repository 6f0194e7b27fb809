"""Run configuration: the Flower run config (kebab-case keys) turned into dataclasses once.

The ServerApp and the ClientApp read ``context.run_config`` at their entry point
and call :meth:`FederationConfig.from_run_config`; nothing below them sees the
raw dictionary. Every key is declared once, on its dataclass field
(:mod:`fedshift.common.settings`); the parts live in their own modules and are
re-exported here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedshift.common import settings
from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.backbones import list_backbones
from fedshift.common.ewc_config import (
    ANCHORS,
    FISHER_SOURCES,
    LABEL_MODES,
    EWCConfig,
    check_choice,
    check_lambda,
    is_number,
)
from fedshift.common.finetune import FINETUNE_CHOICES
from fedshift.common.model import HEAD_INITS, ModelConfig
from fedshift.common.privacy_config import PrivacyConfig
from fedshift.common.settings import SECTION, Setting, all_settings, check_fields, setting
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.train_config import TrainConfig

__all__ = [
    "ANCHORS",
    "DP_RECIPE",
    "FISHER_SOURCES",
    "LABEL_MODES",
    "RELEASE_PRIVACY_KEYS",
    "RUN_CONFIG_MAXIMUM",
    "AggregationConfig",
    "EWCConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "ShiftConfig",
    "TrainConfig",
    "add_arguments",
    "check_choice",
    "check_lambda",
    "is_number",
    "run_config_from_arguments",
    "with_recipe",
]

# ModelConfig lives with the model (common/model.py); its run-config keys are declared here
settings.declare(
    ModelConfig,
    {
        "backbone": Setting(
            "backbone", str, ModelConfig.backbone, "registry name or timm architecture", listed=list_backbones
        ),
        "weights": Setting(
            "backbone-weights",
            str,
            "",
            "local weights file; empty = the registered backbone's bundled weights",
        ),
        "num_classes": Setting(
            "num-classes", int, 2, "output classes of the head", minimum=2, maximum=1000, cap=True
        ),
        "image_size": Setting(
            "image-size",
            int,
            64,
            "side of the square input after resizing (pixels)",
            minimum=16,
            maximum=512,
            cap=True,
        ),
        "adapter_rank": Setting(
            "adapter-rank", int, 4, "LoRA rank; 0 = head only (linear probe)", minimum=0, maximum=64, cap=True
        ),
        "adapter_stages": Setting(
            "adapter-stages",
            int,
            2,
            "k: LoRA (adapters) or every weight (partial) in the last k stages",
            minimum=0,
        ),
        "in_chans": Setting(
            "image-channels",
            int,
            1,
            "channels of the images: 1 (grey, copied to the backbone's 3) or 3 (colour RGB); "
            "fedshift simulate sets it from the data",
            allowed=lambda v: v in (1, 3),
            what="1 (grey) or 3 (colour)",
            fix="set 1 for grey-scale data or 3 for RGB data",
        ),
        "local_norm": Setting(
            "local-norm",
            bool,
            True,
            "FedBN-style: norm affine parameters of the adapted stages stay at the site",
        ),
        "finetune": Setting(
            "finetune",
            str,
            ModelConfig.finetune,
            "fine-tuning: which parts of the backbone train",
            choices=FINETUNE_CHOICES,
        ),
        "head_init": Setting(
            "head-init",
            str,
            "random",
            "the head's initial weights: random (torch's default) or zero (no random logits to unlearn; "
            "data-independent, so it costs no privacy)",
            choices=HEAD_INITS,
        ),
    },
)

_WAIT_FIX = "set 0 to start as soon as min-nodes sites are online"


@dataclass(frozen=True)
class FederationConfig:
    """One federation: rounds, model, local training and where things live."""

    num_rounds: int = setting(
        "num-server-rounds", 10, help="federated rounds", minimum=1, maximum=1000, cap=True
    )
    min_nodes: int = setting("min-nodes", 2, help="fewest sites a round may run with", minimum=1)
    run_dir: str = setting("run-dir", "runs/flower", help="server: checkpoint and results go here")
    resume_from: str = setting(
        "resume-from", "", help='server: checkpoint directory to continue from (its round + 1 on); "" = fresh'
    )
    sites_root: str = setting(
        "sites-root", "", help="simulation: site k's data lives in <sites-root>/site-k/"
    )
    device: str = setting("device", "auto", help="simulation default for every site: auto, cpu or cuda:N")
    seed: int = setting("seed", 0, help="seeds the initial adapters and local shuffling")
    init_checkpoint: str = setting(
        "init-checkpoint", "", help="start from this checkpoint directory's adapters (e.g. an earlier phase)"
    )
    enrollment: str = setting(
        "enrollment",
        "",
        help='server: enrolled.json (node id of each site); "" = a name binds to its first node',
    )
    max_num_examples: int = setting(
        "max-num-examples",
        1_000_000,
        help="server: the largest FedAvg weight (num-examples) a reply may carry",
        minimum=1,
        fix="set it above the largest site's training split (default 1000000)",
    )
    enrolled_wait: float = setting(
        "enrolled-wait",
        600.0,
        help="server: seconds the first round waits for every enrolled site to be online",
        minimum=0,
        fix=_WAIT_FIX,
    )
    reply_timeout: float = setting(
        "reply-timeout",
        3600.0,
        help="server: seconds one message stage waits for the sites' replies",
        above=0,
        fix="the default is 3600",
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata=SECTION)
    train: TrainConfig = field(default_factory=TrainConfig, metadata=SECTION)
    # simulation: every site's privacy settings; deployment: ignored by the sites (their node config decides)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig, metadata=SECTION)
    ewc: EWCConfig = field(
        default_factory=EWCConfig, metadata=SECTION
    )  # EWC penalty at every site (lambda 0 = off)
    shift: ShiftConfig = field(
        default_factory=ShiftConfig, metadata=SECTION
    )  # label-shift correction, domain alignment
    aggregation: AggregationConfig = field(
        default_factory=AggregationConfig, metadata=SECTION
    )  # server: the aggregation rule, the update norm bound, secure aggregation

    def __post_init__(self) -> None:
        check_fields(self)

    def to_run_config(self) -> dict[str, int | float | str]:
        """The kebab-case run config that :meth:`from_run_config` reads back."""
        return settings.to_run_config(self)

    def with_release_privacy(self, values: Mapping[str, Any], source: str = "run-config") -> FederationConfig:
        """A copy with the :data:`RELEASE_PRIVACY_KEYS` present in ``values`` applied (and checked)."""
        own = {k: values[k] for k in RELEASE_PRIVACY_KEYS if k in values}
        return settings.with_values(self, own, source) if own else self  # type: ignore[no-any-return]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse a Flower run config; unknown keys, wrong types and out-of-range values are refused."""
        fed = settings.from_run_config(cls, run_config)
        return replace(fed, model=replace(fed.model, seed=fed.seed))  # type: ignore[no-any-return]


# Upper limits of the run-config values that set how much work, memory or time a round costs a site.
# The coordinator chooses the run config; these bound what it can make a hospital's machine do.
RUN_CONFIG_MAXIMUM: dict[str, int] = {
    s.key: int(s.maximum) for s in all_settings(FederationConfig) if s.cap and s.maximum is not None
}

# Run-config keys that set the privacy of a site's DP releases besides DP-SGD: the EWC Fisher, the label
# counts and the feature moments (noise multipliers and the clip norms that are their sensitivities).
# Like the dp-* keys (PrivacyConfig.KEYS), a deployed site takes them only from its own node config.
RELEASE_PRIVACY_KEYS = (
    "ewc-fisher-clip",
    "ewc-fisher-noise-multiplier",
    "ls-count-noise-multiplier",
    "align-clip",
    "align-noise-multiplier",
)


# The DP-aware recipe (issue 14): the run-config values a federation with DP-SGD takes unless it sets them;
# without DP the declared defaults stay. Chosen on SYNTHETIC images and by reasoning, never by tuning on a
# site's data (that choice would itself depend on private data): the privacy_curve benchmark measures it.
# - server-optimizer fedavgm: server momentum averages the sites' DP noise over rounds (post-processing,
#   no privacy cost);
# - head-init zero: no random logits to unlearn under noisy steps (data-independent, free under DP);
# - learning-rate 3e-3: AdamW's per-coordinate scaling is set by the noise under DP, so a step moves
#   about lr whatever the signal; at 1e-3 the budget's ~100 steps end before the adapters have moved
#   (measured on SYNTHETIC sites: 1e-3 0.876, 2e-3 0.890, 3e-3 0.907, 1e-2 diverges, at epsilon 8).
DP_RECIPE: dict[str, Any] = {"server-optimizer": "fedavgm", "head-init": "zero", "learning-rate": 3e-3}


def with_recipe(values: Mapping[str, Any], private: bool) -> dict[str, Any]:
    """``values`` (run-config keys) over the recipe of a federation with (``private``) or without DP."""
    return {**(DP_RECIPE if private else {}), **values}


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    keys: Iterable[str] | None = None,
    flags: Mapping[str, Sequence[str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Register ``--<key>`` flags for the run-config ``keys`` (default: every key), from their declarations.

    Help text, type, range and choices are the declaration's; ``flags`` renames a key's flags
    (``{"learning-rate": ["--lr", "--learning-rate"]}``). Nothing is set unless the user gives it,
    except the keys in ``defaults`` (the CLI's own default values, shown in ``--help``).
    """
    declared = {s.key: s for s in all_settings(FederationConfig)}
    wanted = list(declared) if keys is None else list(keys)
    settings.check_known(wanted, declared, "flag for run-config")
    settings.add_arguments(parser, [declared[k] for k in wanted], flags=flags, defaults=defaults)


def run_config_from_arguments(namespace: argparse.Namespace) -> dict[str, Any]:
    """The run-config overrides the user set with the flags of :func:`add_arguments` (key -> value)."""
    return settings.run_config_from_arguments(namespace)


def run_config_keys() -> list[str]:
    """Every run-config key, in :meth:`FederationConfig.to_run_config` order."""
    return [s.key for s in all_settings(FederationConfig)]
