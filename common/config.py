"""Run configuration: the Flower run config (kebab-case keys) turned into dataclasses once.

The ServerApp and the ClientApp read ``context.run_config`` at their entry point
and call :meth:`FederationConfig.from_run_config`; nothing below them sees the
raw dictionary.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from fedshift.common.errors import ConfigError, PrivacyError
from fedshift.common.model import ModelConfig
from fedshift.common.privacy import ACCOUNTANTS, MAX_DELTA, check_budget
from fedshift.common.shift_config import ShiftConfig


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings, identical at every site."""

    local_epochs: int = 1  # passes over the site's training split per round
    batch_size: int = 32  # samples per step
    learning_rate: float = 1e-3  # AdamW learning rate for the trainable parameters
    weight_decay: float = 0.0  # AdamW weight decay
    lr_decay: float = 1.0  # discriminative learning rates: lr * lr_decay ** depth (head 0); 1 = off
    unfreeze_every: int = 0  # progressive unfreezing: one level deeper every N rounds; 0 = off

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError(
                "Expected local-epochs >= 1, batch-size >= 1 and learning-rate > 0, but got "
                f"{self.local_epochs}, {self.batch_size}, {self.learning_rate}"
            )
        if not (is_number(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ConfigError(
                f"Expected lr-decay to be a number in (0, 1], but got {self.lr_decay!r}; e.g. 0.5 "
                "(each level deeper learns at half the rate), or 1 for one learning rate"
            )
        if (
            isinstance(self.unfreeze_every, bool)
            or not isinstance(self.unfreeze_every, int)
            or (self.unfreeze_every < 0)
        ):
            raise ConfigError(
                f"Expected unfreeze-every to be an integer >= 0, but got {self.unfreeze_every!r}; "
                "e.g. 2 (the head trains alone for 2 rounds, then one stage more every 2 rounds), or 0"
            )

    def trainable_depth(self, server_round: int) -> int | None:
        """Progressive unfreezing: the deepest level that trains in ``server_round`` (None = all)."""
        if self.unfreeze_every == 0:
            return None
        return max(0, server_round - 1) // self.unfreeze_every


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
    secure_rng: bool = False  # noise and sampling from the OS CSPRNG; always on in deployment
    epsilon_per_run: float = math.inf  # cap on what one run may spend at this site; inf = the lifetime budget

    # run-config / node-config key -> field
    KEYS: ClassVar[dict[str, str]] = {
        "dp": "enabled",
        "dp-epsilon": "epsilon",
        "dp-delta": "delta",
        "dp-clip-norm": "clip_norm",
        "dp-noise-multiplier": "noise_multiplier",
        "dp-accountant": "accountant",
        "dp-secure-rng": "secure_rng",
        "dp-epsilon-per-run": "epsilon_per_run",
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
        cap = self.epsilon_per_run
        if not cap > 0:
            raise PrivacyError(
                f"Expected dp-epsilon-per-run to be a finite number > 0, but got {cap!r}; set it to the "
                "most one run may spend at this site (e.g. 2.0), or leave it out (the lifetime dp-epsilon "
                "bounds every run)"
            )
        if self.enabled:
            check_budget(self.epsilon, self.delta)

    @property
    def run_cap(self) -> float | None:
        """The per-run epsilon cap, or ``None`` when only the lifetime budget bounds a run."""
        return self.epsilon_per_run if math.isfinite(self.epsilon_per_run) else None

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
            "dp-epsilon-per-run": self.epsilon_per_run if math.isfinite(self.epsilon_per_run) else 0.0,
        }


# fisher_source -> where the Fisher diagonal comes from
FISHER_SOURCES: dict[str, str] = {
    "dp": "estimated on the site's private data under DP and charged to the ledger",
    "public": "estimated on public or synthetic data (no privacy cost)",
    "none": "no estimate: F = 1 everywhere (a plain L2 pull towards the anchor)",
}
# anchor -> which parameters the penalty pulls towards
ANCHORS: dict[str, str] = {
    "global": "the global adapters received this round",
    "consolidated": "parameters consolidated at the end of an earlier phase",
}
# labels -> how the Fisher's expectation over the model's predictive distribution is taken
LABEL_MODES: dict[str, str] = {
    "expected": "exact sum over the classes, weighted by p(y|x)",
    "sampled": "one label per image drawn from p(y|x) (Monte Carlo, seeded)",
}

_LAMBDA_FIX = "set ewc-lambda to a finite number such as 100.0, or to 0 to turn EWC off"


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lambda(lam: object) -> float:
    """``lam`` as a float, or :class:`ConfigError` when it is not a finite number >= 0."""
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        value = float(lam)
        if math.isfinite(value) and value >= 0:
            return value
    raise ConfigError(f"Expected ewc-lambda to be a number >= 0, but got {lam!r}; {_LAMBDA_FIX}")


def check_choice(key: str, value: object, choices: Mapping[str, str]) -> None:
    if value not in choices:
        listed = "; ".join(f"{name!r} ({what})" for name, what in choices.items())
        raise ConfigError(f"Expected {key} to be one of {listed}, but got {value!r}")


@dataclass(frozen=True)
class EWCConfig:
    """EWC at a site: how strong the pull is, towards what, and where the Fisher comes from."""

    lam: float = 0.0  # penalty strength lambda; 0 = EWC off
    fisher_source: str = (
        "dp"  # dp (private data, DP, charged), public (public/synthetic data) or none (F = 1)
    )
    fisher_samples: int = 512  # images used for one Fisher estimate
    fisher_clip: float = 1.0  # dp: L2 bound on each image's squared-gradient vector (the sensitivity)
    fisher_noise_multiplier: float = 5.0  # dp: Gaussian noise std / fisher_clip, added to the sum
    fisher_labels: str = "expected"  # expected (exact over classes) or sampled (y ~ p(y|x))
    anchor: str = "global"  # global (this round's global adapters) or consolidated (an earlier phase's)
    consolidate: bool = False  # after the last round, gather every site's Fisher at the final adapters

    # run-config / node-config key -> field
    KEYS: ClassVar[dict[str, str]] = {
        "ewc-lambda": "lam",
        "ewc-fisher-source": "fisher_source",
        "ewc-fisher-samples": "fisher_samples",
        "ewc-fisher-clip": "fisher_clip",
        "ewc-fisher-noise-multiplier": "fisher_noise_multiplier",
        "ewc-fisher-labels": "fisher_labels",
        "ewc-anchor": "anchor",
        "ewc-consolidate": "consolidate",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "lam", check_lambda(self.lam))
        check_choice("ewc-fisher-source", self.fisher_source, FISHER_SOURCES)
        check_choice("ewc-anchor", self.anchor, ANCHORS)
        check_choice("ewc-fisher-labels", self.fisher_labels, LABEL_MODES)
        samples = self.fisher_samples
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigError(
                f"Expected ewc-fisher-samples to be an integer >= 1, but got {samples!r}; e.g. 512"
            )
        clip = self.fisher_clip
        if not is_number(clip) or not (math.isfinite(clip) and clip > 0):
            raise ConfigError(
                f"Expected ewc-fisher-clip to be a finite number > 0, but got {clip!r}; e.g. 1.0"
            )
        sigma = self.fisher_noise_multiplier
        if not is_number(sigma) or not (math.isfinite(sigma) and sigma >= 0):
            raise ConfigError(
                f"Expected ewc-fisher-noise-multiplier to be a finite number >= 0, but got {sigma!r}"
            )
        if self.enabled and self.fisher_source == "dp" and sigma == 0:
            raise PrivacyError(
                "Expected ewc-fisher-noise-multiplier > 0 for a Fisher estimated on private data, but got 0 "
                "(it would leak patient data through the penalty); set it (e.g. 5.0), or use "
                "ewc-fisher-source='public' or 'none'"
            )
        object.__setattr__(self, "fisher_clip", float(clip))
        object.__setattr__(self, "fisher_noise_multiplier", float(sigma))

    @property
    def enabled(self) -> bool:
        return self.lam > 0

    @property
    def spends_privacy(self) -> bool:
        """True when each round's Fisher estimate is a DP release the ledger must charge.

        A consolidated anchor comes with its Fisher from the server: nothing to estimate.
        """
        return self.enabled and self.fisher_source == "dp" and self.anchor == "global"

    @property
    def consolidation_spends_privacy(self) -> bool:
        """True when the end-of-run Fisher (``ewc-consolidate``) is a DP release the ledger must charge."""
        return self.consolidate and self.fisher_source == "dp"

    def with_values(self, values: Mapping[str, Any]) -> EWCConfig:
        """A copy with the ``ewc-*`` keys present in ``values`` applied; unknown ``ewc-*`` keys refused."""
        unknown = sorted(k for k in values if k.startswith("ewc-") and k not in self.KEYS)
        if unknown:
            raise ConfigError(
                f"Expected ewc keys among {sorted(self.KEYS)}, but got unknown {unknown}; check the spelling"
            )
        changes = {name: values[key] for key, name in self.KEYS.items() if key in values}
        if "consolidate" in changes:
            changes["consolidate"] = _flag("ewc-consolidate", changes["consolidate"])
        samples = changes.get("fisher_samples")
        if isinstance(samples, float) and samples.is_integer():  # TOML/JSON may give 512.0
            changes["fisher_samples"] = int(samples)
        return replace(self, **changes)

    def to_run_config(self) -> dict[str, int | float | str]:
        return {key: getattr(self, name) for key, name in self.KEYS.items()}


# Upper limits of the run-config values that set how much work, memory or time a round costs a site.
# The coordinator chooses the run config; these bound what it can make a hospital's machine do.
RUN_CONFIG_MAXIMUM: dict[str, int] = {
    "num-server-rounds": 1000,  # rounds of one run (each one trains and is charged)
    "local-epochs": 20,  # passes over the training split per round
    "batch-size": 1024,  # expected Poisson batch (per-sample gradients of the whole batch live at once)
    "image-size": 512,  # side of the input: memory and compute grow with its square
    "num-classes": 1000,  # outputs of the head
    "adapter-rank": 64,  # LoRA rank
    "ewc-fisher-samples": 10_000,  # images of one Fisher estimate (per-sample gradients)
    "ls-bootstrap": 2000,  # EM refits of the label-shift bootstrap at each evaluation
    "align-dim": 256,  # projected feature dimensions (second moments are align-dim squared)
}


def check_maximum(key: str, value: float) -> None:
    """Refuse a run-config value above :data:`RUN_CONFIG_MAXIMUM`, naming the key, the value and the fix."""
    most = RUN_CONFIG_MAXIMUM.get(key)
    if most is not None and value > most:
        raise ConfigError(
            f"Expected run-config {key!r} to be at most {most}, but got {value!r}; lower it (sites "
            "refuse larger values, which could exhaust a hospital's machine)"
        )


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


@dataclass(frozen=True)
class FederationConfig:
    """One federation: rounds, model, local training and where things live."""

    num_rounds: int = 10  # federated rounds
    min_nodes: int = 2  # fewest sites a round may run with
    run_dir: str = "runs/flower"  # server: checkpoint and results go here
    resume_from: str = ""  # server: checkpoint directory to continue from (its round + 1 on); "" = fresh
    sites_root: str = ""  # simulation: site k's data lives in <sites-root>/site-k/
    device: str = "auto"  # simulation default for every site: auto, cpu or cuda:N
    seed: int = 0  # seeds initial adapters and local shuffling
    init_checkpoint: str = ""  # start from this checkpoint directory's adapters (e.g. an earlier phase)
    enrollment: str = ""  # server: enrolled.json (node id of each site); "" = a name binds to its first node
    max_num_examples: int = 1_000_000  # server: the largest FedAvg weight (num-examples) a reply may carry
    enrolled_wait: float = 600.0  # server: seconds the first round waits for every enrolled site to be online
    reply_timeout: float = 3600.0  # server: seconds one message stage waits for the sites' replies
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # simulation: every site's privacy settings; deployment: ignored by the sites (their node config decides)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)  # EWC penalty at every site (lambda 0 = off)
    shift: ShiftConfig = field(default_factory=ShiftConfig)  # label-shift correction, domain alignment

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"Expected num-server-rounds >= 1, but got {self.num_rounds}")
        if self.min_nodes < 1:
            raise ConfigError(f"Expected min-nodes >= 1, but got {self.min_nodes}")
        if not 0 <= self.enrolled_wait < float("inf"):
            raise ConfigError(
                "Expected enrolled-wait to be a finite number of seconds >= 0, but got "
                f"{self.enrolled_wait}; "
                "set 0 to start as soon as min-nodes sites are online"
            )
        if not 0 < self.reply_timeout < float("inf"):
            raise ConfigError(
                f"Expected reply-timeout to be a finite number of seconds > 0, but got {self.reply_timeout}; "
                "the default is 3600"
            )
        if self.max_num_examples < 1:
            raise ConfigError(
                f"Expected max-num-examples >= 1, but got {self.max_num_examples}; set it above the "
                "largest site's training split (default 1000000)"
            )

    def to_run_config(self) -> dict[str, int | float | str]:
        """The kebab-case run config that :meth:`from_run_config` reads back."""
        m, t = self.model, self.train
        return {
            "num-server-rounds": self.num_rounds,
            "min-nodes": self.min_nodes,
            "run-dir": self.run_dir,
            "resume-from": self.resume_from,
            "sites-root": self.sites_root,
            "device": self.device,
            "seed": self.seed,
            "init-checkpoint": self.init_checkpoint,
            "enrollment": self.enrollment,
            "max-num-examples": self.max_num_examples,
            "enrolled-wait": self.enrolled_wait,
            "reply-timeout": self.reply_timeout,
            "backbone": m.backbone,
            "backbone-weights": m.weights,
            "num-classes": m.num_classes,
            "image-size": m.image_size,
            "adapter-rank": m.adapter_rank,
            "adapter-stages": m.adapter_stages,
            "local-norm": m.local_norm,
            "finetune": m.finetune,
            "local-epochs": t.local_epochs,
            "batch-size": t.batch_size,
            "learning-rate": t.learning_rate,
            "lr-decay": t.lr_decay,
            "unfreeze-every": t.unfreeze_every,
            **self.privacy.to_run_config(),
            **self.ewc.to_run_config(),
            **self.shift.to_run_config(),
        }

    def with_release_privacy(self, values: Mapping[str, Any]) -> FederationConfig:
        """A copy with the :data:`RELEASE_PRIVACY_KEYS` present in ``values`` applied (and checked)."""
        own = {k: values[k] for k in RELEASE_PRIVACY_KEYS if k in values}
        if not own:
            return self
        return replace(self, ewc=self.ewc.with_values(own), shift=self.shift.with_values(own))

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

        for key in RUN_CONFIG_MAXIMUM:  # before any parsing (types are checked below)
            if isinstance(values[key], int | float) and not isinstance(values[key], bool):
                check_maximum(key, values[key])

        seed = get("seed")
        return cls(
            num_rounds=get("num-server-rounds"),
            min_nodes=get("min-nodes"),
            run_dir=get("run-dir"),
            resume_from=get("resume-from"),
            sites_root=get("sites-root"),
            device=get("device"),
            seed=seed,
            init_checkpoint=get("init-checkpoint"),
            enrollment=get("enrollment"),
            max_num_examples=get("max-num-examples"),
            enrolled_wait=get("enrolled-wait"),
            reply_timeout=get("reply-timeout"),
            model=ModelConfig(
                backbone=get("backbone"),
                weights=get("backbone-weights"),
                num_classes=get("num-classes"),
                image_size=get("image-size"),
                adapter_rank=get("adapter-rank"),
                adapter_stages=get("adapter-stages"),
                local_norm=get("local-norm"),
                seed=seed,
                finetune=get("finetune"),
            ),
            train=TrainConfig(
                local_epochs=get("local-epochs"),
                batch_size=get("batch-size"),
                learning_rate=get("learning-rate"),
                lr_decay=get("lr-decay"),
                unfreeze_every=get("unfreeze-every"),
            ),
            privacy=_privacy_from_run_config(values),
            ewc=EWCConfig().with_values({k: v for k, v in values.items() if k in EWCConfig.KEYS}),
            shift=ShiftConfig().with_values(values),
        )


def _privacy_from_run_config(values: Mapping[str, Any]) -> PrivacyConfig:
    """The run config's dp-* keys; an epsilon (or per-run cap) of 0 there means "not set"."""
    unset = ("dp-epsilon", "dp-epsilon-per-run")
    present = {k: v for k, v in values.items() if k in PrivacyConfig.KEYS and k not in unset}
    present.update({k: values[k] for k in unset if k in values and _number(k, values[k]) != 0.0})
    return PrivacyConfig().with_values(present)
