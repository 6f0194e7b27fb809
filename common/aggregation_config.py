"""How the server combines the sites' updates (AggregationConfig): secure aggregation and robust choices."""

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

    def __post_init__(self) -> None:
        check_fields(self)
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


def secagg_params(cfg: AggregationConfig, server_round: int) -> SecAggParams:
    """One round's protocol parameters, the same at the server and at every site (from the run config)."""
    from fedshift.common.secagg import SecAggParams

    return SecAggParams(
        round=server_round,
        threshold_fraction=cfg.secagg_threshold,
        neighbours=cfg.secagg_neighbours,
        clip_range=cfg.secagg_clip_range,
    )
