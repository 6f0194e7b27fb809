"""The server optimizer (FedOpt, Reddi et al. 2021): the global adapters stepped with the round's aggregate.

The round's pseudo-gradient is ``delta = aggregate - global``, where the aggregate
is what the aggregation rule (mean, median or trimmed mean, or secure
aggregation's unmasked mean) made of the accepted, bounded replies. A server
optimizer turns it into the new global adapters:

- ``fedavg``: the aggregate itself (no step);
- ``fedavgm``: ``v = momentum * v + delta; new = global + lr * v`` (Hsu et al. 2019, Flower's FedAvgM);
- ``fedadam``: ``m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta**2;
  new = global + lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + tau)`` at step ``t``;
- ``fedyogi``: as fedadam with ``v = v - (1 - b2) delta**2 sign(v - delta**2)`` and no bias correction
  (Flower's FedYogi).

It only post-processes what the sites released, so it costs no privacy. The math
is in pure functions (:func:`server_step`) so that it composes with every
aggregation rule; the state between rounds (:class:`ServerOptimizerState`) is
float64 and saved exactly in the round's checkpoint, so a federation resumed
after round k steps round k + 1 exactly as one that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.checkpoint import Checkpoint
from fedshift.common.errors import CheckpointError

logger = logging.getLogger(__name__)

BETA2 = 0.99  # fedadam / fedyogi: the second moment's decay (Reddi et al.; Flower's FedAdam/FedYogi default)
META_KEY = "server_optimizer"  # the checkpoint's extra: the optimizer's name, steps and settings

Arrays = Mapping[str, np.ndarray]
Tensors = dict[str, np.ndarray]  # tensor name -> float64 values
Moments = dict[str, dict[str, np.ndarray]]  # moment name ("momentum", "m", "v") -> tensor name -> float64


@dataclass(frozen=True)
class ServerParams:
    """One optimizer's settings, read once from :class:`AggregationConfig`."""

    name: str
    learning_rate: float
    momentum: float  # fedavgm's momentum; fedadam / fedyogi's beta1
    tau: float  # fedadam / fedyogi's adaptivity
    beta2: float = BETA2

    @classmethod
    def from_config(cls, cfg: AggregationConfig) -> ServerParams:
        return cls(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum, cfg.server_tau)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServerOptimizerState:
    """What the server optimizer carries from round to round: its step count and moments (float64)."""

    name: str = "fedavg"
    steps: int = 0  # server steps taken (rounds that produced a new global model)
    moments: Moments = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The moments as one flat dict for the checkpoint: ``"<moment>/<tensor>"`` -> values."""
        return {f"{m}/{k}": v for m, tensors in self.moments.items() for k, v in tensors.items()}

    def to_meta(self, params: ServerParams) -> dict[str, Any]:
        """For the checkpoint's extra: the name, the steps taken and the settings they were taken with."""
        return {**params.to_dict(), "steps": self.steps}


def _delta(current: Arrays, aggregate: Arrays) -> Tensors:
    """``aggregate - current`` per tensor in float64; the two must hold the same tensors and shapes."""
    if set(current) != set(aggregate):
        raise ValueError(
            f"Expected the aggregate to hold the global model's tensors, but it differs in "
            f"{sorted(set(current) ^ set(aggregate))[:3]}; pass the round's global adapters and its aggregate"
        )
    delta = {}
    for key, value in current.items():
        agg = np.asarray(aggregate[key], dtype=np.float64)
        if agg.shape != np.shape(value):
            raise ValueError(
                f"Expected aggregate {key!r} to have the global shape {np.shape(value)}, but got {agg.shape}"
            )
        delta[key] = agg - np.asarray(value, dtype=np.float64)
    return delta


def _previous(moments: Moments, name: str, delta: Tensors) -> Tensors:
    """The moment ``name`` before this step, zeros on the first."""
    old = moments.get(name, {})
    return {k: old[k] if k in old else np.zeros_like(d) for k, d in delta.items()}


# one optimizer's step: (settings, step number t, moments before, delta) -> (what it adds, moments after)
Step = Callable[[ServerParams, int, Moments, Tensors], tuple[Tensors, Moments]]


def _fedavgm(p: ServerParams, t: int, moments: Moments, delta: Tensors) -> tuple[Tensors, Moments]:
    velocity = {k: p.momentum * v + delta[k] for k, v in _previous(moments, "momentum", delta).items()}
    return {k: p.learning_rate * v for k, v in velocity.items()}, {"momentum": velocity}


def _first_moment(p: ServerParams, moments: Moments, delta: Tensors) -> Tensors:
    previous = _previous(moments, "m", delta)
    return {k: p.momentum * m + (1 - p.momentum) * delta[k] for k, m in previous.items()}


def _fedadam(p: ServerParams, t: int, moments: Moments, delta: Tensors) -> tuple[Tensors, Moments]:
    m = _first_moment(p, moments, delta)
    v = {k: p.beta2 * v + (1 - p.beta2) * delta[k] ** 2 for k, v in _previous(moments, "v", delta).items()}
    rate = p.learning_rate * np.sqrt(1 - p.beta2**t) / (1 - p.momentum**t)  # Kingma & Ba's bias correction
    return {k: rate * m[k] / (np.sqrt(v[k]) + p.tau) for k in delta}, {"m": m, "v": v}


def _fedyogi(p: ServerParams, t: int, moments: Moments, delta: Tensors) -> tuple[Tensors, Moments]:
    m = _first_moment(p, moments, delta)
    v = {
        k: v - (1 - p.beta2) * delta[k] ** 2 * np.sign(v - delta[k] ** 2)
        for k, v in _previous(moments, "v", delta).items()
    }
    return {k: p.learning_rate * m[k] / (np.sqrt(v[k]) + p.tau) for k in delta}, {"m": m, "v": v}


STEPS: dict[str, Step] = {"fedavgm": _fedavgm, "fedadam": _fedadam, "fedyogi": _fedyogi}
MOMENTS = {"fedavg": (), "fedavgm": ("momentum",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}


def server_step(
    params: ServerParams, state: ServerOptimizerState, current: Arrays, aggregate: Arrays
) -> tuple[dict[str, np.ndarray], ServerOptimizerState]:
    """The new global adapters (each tensor in ``current``'s dtype) and the optimizer's next state.

    ``current`` is the round's global model, ``aggregate`` the aggregation rule's
    result on the accepted replies; both hold exactly the shared tensors. Pure:
    neither ``state`` nor the inputs change, so a refused round keeps the old state.
    ``fedavg`` returns the aggregate's own arrays.
    """
    if params.name != state.name:
        raise ValueError(f"Expected a {params.name} state, but got one of {state.name!r}")
    if params.name == "fedavg":
        return dict(aggregate), state
    delta = _delta(current, aggregate)
    if params.name not in STEPS:
        raise ValueError(f"Expected server-optimizer to be one of {sorted(MOMENTS)}, but got {params.name!r}")
    t = state.steps + 1
    update, moments = STEPS[params.name](params, t, state.moments, delta)
    with np.errstate(over="ignore"):  # a step past float32's range is inf, which the strategy refuses
        new = {
            k: (np.asarray(value, dtype=np.float64) + update[k]).astype(np.asarray(value).dtype)
            for k, value in current.items()
        }
    return new, ServerOptimizerState(params.name, t, moments)


def restored_state(params: ServerParams, checkpoint: Checkpoint | None, source: str) -> ServerOptimizerState:
    """The optimizer state a resumed federation continues with: the checkpoint's, checked against ``params``.

    A checkpoint written before server optimizers existed (no record) is one of
    ``fedavg``. The optimizer must be the one the checkpoint was written with;
    a changed learning rate, momentum or tau is allowed and logged.
    """
    if checkpoint is None:
        return ServerOptimizerState(params.name)
    meta = checkpoint.extra.get(META_KEY) or {"name": "fedavg", "steps": 0}
    if meta.get("name") != params.name:
        raise CheckpointError(
            f"Expected the checkpoint in {source!r} to continue server-optimizer {params.name!r}, but it was "
            f"written with {meta.get('name')!r}; resume with the run config the federation started with, "
            "or start a new federation from its adapters with init-checkpoint (a fresh optimizer state)"
        )
    changed = {k: (meta[k], v) for k, v in params.to_dict().items() if k in meta and meta[k] != v}
    if changed:
        logger.warning("Resuming %s with changed server optimizer settings (was, now): %s", source, changed)
    steps = int(meta.get("steps", 0))
    shared = sorted(checkpoint.arrays)
    expected = sorted(f"{m}/{k}" for m in MOMENTS[params.name] for k in shared) if steps > 0 else []
    if sorted(checkpoint.state) != expected:
        raise CheckpointError(
            f"Expected the checkpoint in {source!r} to hold the {params.name} moments of its {len(shared)} "
            f"tensors after {steps} steps, but its server state holds {len(checkpoint.state)} other arrays; "
            "the checkpoint is incomplete: resume from an intact one"
        )
    moments: Moments = {m: {} for m in MOMENTS[params.name]} if steps > 0 else {}
    for name, value in checkpoint.state.items():
        moment, key = name.split("/", 1)
        if value.shape != checkpoint.arrays[key].shape:
            raise CheckpointError(
                f"Expected the checkpoint's {name!r} to have shape {checkpoint.arrays[key].shape}, but got "
                f"{value.shape}; the checkpoint is corrupt"
            )
        moments[moment][key] = np.asarray(value, dtype=np.float64)
    return ServerOptimizerState(params.name, steps, moments)
