"""How the server combines the sites' updates (AggregationConfig): secure aggregation, robust choices and
the server optimizer that steps the global adapters with the aggregate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedshift.common.errors import ConfigError
from fedshift.common.settings import check_fields, setting

if TYPE_CHECKING:
    from fedshift.common.secagg import SecAggParams

# aggregation rule -> what it does
AGGREGATIONS = {
    "mean": "FedAvg: the mean weighted by each site's num-examples",
    "median": "coordinate-wise median of the updates (unweighted; Flower's FedMedian)",
    "trimmed-mean": "coordinate-wise mean without the trim-fraction largest and smallest (FedTrimmedAvg)",
}
NORM_ACTIONS = {
    "reject": "an update above the bound is left out of the round, the reason logged and recorded",
    "clip": "an update above the bound is scaled down to the bound",
}
# server-optimizer -> what it does with the round's pseudo-gradient delta = aggregate - global
# (Reddi et al. 2021, "Adaptive Federated Optimization"; the arithmetic in server/server_optimizer.py)
SERVER_OPTIMIZERS = {
    "fedavg": "the aggregate is the new global model (no server step)",
    "fedavgm": "server momentum (Hsu et al. 2019): v = momentum * v + delta; global += lr * v",
    "fedadam": "Adam on delta at the server (bias-corrected), beta1 = server-momentum, beta2 0.99",
    "fedyogi": "Yogi on delta at the server (FedAdam with a sign-controlled second moment)",
}
# server-learning-rate 0 = the optimizer's own default:
# - fedavgm 1.0: Hsu et al. 2019's server SGD with momentum (lr 1, momentum 0.9);
# - fedadam / fedyogi 1e-2: Reddi et al.'s well-performing region (server lr ~1e-2 with tau 1e-3); Adam moves
#   each coordinate by at most ~lr per round, and an honest fedshift site moves one by at most about
#   learning-rate 1e-3 x ~10 AdamW steps = 1e-2, so a server step stays the size of one round's local work.
DEFAULT_SERVER_TAU = 1e-3  # Reddi et al.'s recommended adaptivity, Flower's FedAdam/FedYogi default
DEFAULT_SERVER_LEARNING_RATE = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}
# the robust choices that see individual updates, which secure aggregation hides from the server
NEEDS_INDIVIDUAL_UPDATES = ("median", "trimmed-mean")


@dataclass(frozen=True)
class AggregationConfig:
    """The server's aggregation: the rule, the per-update norm bound and secure aggregation."""

    rule: str = setting("aggregation", "mean", help="how the updates are combined", choices=AGGREGATIONS)
    trim_fraction: float = setting(
        "trim-fraction",
        0.2,
        help="trimmed-mean: the fraction cut at each end of every coordinate",
        minimum=0,
        maximum=0.45,
        fix="e.g. 0.2 (with 5 sites: the largest and smallest value of each coordinate are cut)",
    )
    norm_bound: float = setting(
        "update-norm-bound",
        0.0,
        help="server: the largest L2 norm of a site's update (its adapters minus the global ones); 0 = off",
        minimum=0,
        fix="e.g. lr * steps * sqrt(shared values) (server.robust.adam_update_bound), or 0 to turn it off",
    )
    norm_action: str = setting(
        "update-norm-action",
        "reject",
        help="what the server does with an update above update-norm-bound",
        choices=NORM_ACTIONS,
    )
    secure: bool = setting(
        "secure-aggregation",
        False,
        help="SecAgg+: the server learns only the sum of the sites' updates, never one site's",
    )
    secagg_threshold: float = setting(
        "secagg-threshold",
        0.6,
        help="secure aggregation: the fraction of each site's share holders (itself and its neighbours: "
        "all the round's sites with secagg-neighbours 0) that must stay for the sum to be "
        "recovered (Shamir threshold t = ceil(fraction * holders), at least 2)",
        above=0.5,
        maximum=1,
        fix="e.g. 0.6; above 0.5, a majority of each site's holders",
    )
    secagg_clip_range: float = setting(
        "secagg-clip-range",
        1.0,
        help="secure aggregation: each coordinate of a site's weighted update is clipped to [-r, r] "
        "before it is quantised",
        above=0,
        fix="e.g. 1.0 (an adapter changes by far less than 1 per round)",
    )
    secagg_neighbours: int = setting(
        "secagg-neighbours",
        0,
        help="secure aggregation: how many peers share each site's secrets (SecAgg+'s graph); "
        "0 = every other site",
        minimum=0,
        allowed=lambda v: v % 2 == 0,
        what="an even number >= 0 (half the neighbours on each side of the ring)",
        fix="e.g. 0 (all) or an even number such as 10 for large federations",
    )
    server_optimizer: str = setting(
        "server-optimizer",
        "fedavg",
        help="how the server steps the global adapters with the round's aggregate (post-processing of "
        "what the sites released: no privacy cost); fedavg = the aggregate as is",
        choices=SERVER_OPTIMIZERS,
    )
    server_learning_rate: float = setting(
        "server-learning-rate",
        0.0,
        help="the server optimizer's step size; 0 = its own default: fedavgm 1.0 (Hsu et al. 2019), "
        "fedadam/fedyogi 0.01 (Reddi et al. 2021; at most ~0.01 per coordinate per round, the size of "
        "one round of a site's AdamW work at learning-rate 1e-3)",
        minimum=0,
        what="a finite number > 0, or 0 for the optimizer's own default",
        fix="e.g. 1.0 for fedavgm or 0.01 for fedadam/fedyogi (or 0 for those defaults)",
    )
    server_momentum: float = setting(
        "server-momentum",
        0.9,
        help="fedavgm: the momentum of the server's velocity (0.9, Hsu et al. 2019); fedadam/fedyogi: "
        "beta1, the decay of the first moment (0.9, Reddi et al. and Flower's FedAdam/FedYogi)",
        minimum=0,
        allowed=lambda v: v < 1,
        what="a number in [0, 1)",
        fix="e.g. 0.9 (0 = no momentum: fedavgm is then server SGD)",
    )
    server_tau: float = setting(
        "server-tau",
        DEFAULT_SERVER_TAU,
        help="fedadam/fedyogi: the adaptivity tau added to the root of the second moment (1e-3, Reddi et "
        "al.'s recommended value and Flower's default); larger = closer to server SGD with lr/tau",
        above=0,
        fix="e.g. 1e-3",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.server_optimizer == "fedavg" and (
            self.server_learning_rate not in (0.0, 1.0) or self.server_momentum != 0.9
        ):
            raise ConfigError(
                "Expected run-config 'server-optimizer' to be fedavgm, fedadam or fedyogi with "
                f"server-learning-rate {self.server_learning_rate:g} and server-momentum "
                f"{self.server_momentum:g}, but got 'fedavg', which takes the aggregate as is and would "
                'ignore them; set server-optimizer = "fedavgm" (server-momentum = 0: plain server SGD) or '
                "leave both keys out"
            )
        if self.server_optimizer in ("fedavg", "fedavgm") and self.server_tau != DEFAULT_SERVER_TAU:
            raise ConfigError(
                f"Expected run-config 'server-tau' only with server-optimizer fedadam or fedyogi, but got "
                f"server-tau {self.server_tau:g} with {self.server_optimizer!r}, which has no second moment "
                'and would ignore it; set server-optimizer = "fedadam" or "fedyogi", or leave server-tau out'
            )
        if self.secure and self.rule in NEEDS_INDIVIDUAL_UPDATES:
            raise ConfigError(
                f"Expected run-config 'aggregation' to be 'mean' with secure-aggregation, but got "
                f"{self.rule!r}: {self.rule} needs every site's update and secure aggregation shows the "
                'server only their sum; set aggregation = "mean" or secure-aggregation = false'
            )
        if self.secure and self.norm_bound > 0 and self.norm_action == "reject":
            raise ConfigError(
                "Expected run-config 'update-norm-action' to be 'clip' with secure-aggregation, but got "
                "'reject': the server cannot see an update to reject it; set update-norm-action = \"clip\" "
                "(each site clips its own update to the bound before masking it)"
            )

    @property
    def server_lr(self) -> float:
        """The server optimizer's step size: server-learning-rate, or its own default when that is 0."""
        if self.server_learning_rate > 0:
            return self.server_learning_rate
        return DEFAULT_SERVER_LEARNING_RATE[self.server_optimizer]


def secagg_params(cfg: AggregationConfig, server_round: int) -> SecAggParams:
    """One round's protocol parameters, the same at the server and at every site (from the run config)."""
    from fedshift.common.secagg import SecAggParams

    return SecAggParams(
        round=server_round,
        threshold_fraction=cfg.secagg_threshold,
        neighbours=cfg.secagg_neighbours,
        clip_range=cfg.secagg_clip_range,
    )
