"""The server's side of the statistics stage: collect the sites' DP releases, add them, send the sums back.

The stage runs before round 1 when the run corrects label shift, adjusts logits or
aligns features, and with ``align-refresh`` again before every later round for the
feature moments only (:class:`StatisticsRefresh`, a strategy wrapper). The replies are
post-processings of Gaussian mechanisms the sites charged; the server only adds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshift.common.config import FederationConfig
from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LABEL_COUNTS_KEY,
    METRICS_KEY,
    MOMENT_OUTER_KEY,
    MOMENT_SQUARE_KEY,
    MOMENT_SUM_KEY,
    REASON_FIELD,
    SERVER_ROUND_KEY,
    STATUS_FIELD,
    STATUS_KEY,
    WEIGHT_KEY,
)
from fedshift.common.shift_statistics import (
    GLOBAL_KEY,
    STAGE_GLOBAL,
    STAGE_KEY,
    STAGE_RELEASE,
    STATISTICS_KEY,
    GlobalStatistics,
    aggregate_class_means,
    aggregate_moments,
    aggregate_prior,
    aggregate_within_variance,
    moment_noise_floor,
)
from fedshift.server.ask import ask_sites, send_to_all
from fedshift.server.enrollment import SiteNames
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import weight_problem

logger = logging.getLogger(__name__)

CORAL = "coral"  # the align-loss that aligns marginal moments (a second-moment matrix per site)


def expected_release(cfg: FederationConfig, server_round: int) -> dict[str, int]:
    """The keys (and their lengths) of a site's release in ``server_round``'s statistics stage."""
    shift, c, k = cfg.shift, cfg.model.num_classes, cfg.shift.align_dim
    wanted = {LABEL_COUNTS_KEY: c} if shift.needs_counts and server_round == 0 else {}
    if shift.align:
        wanted[MOMENT_SUM_KEY] = c * k
        wanted |= {MOMENT_OUTER_KEY: k * k} if shift.align_loss == CORAL else {MOMENT_SQUARE_KEY: c}
    return wanted


def _release_problem(msg: Message, cfg: FederationConfig, server_round: int) -> str | None:
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if STATUS_KEY in content.config_records:
        status = content.config_records[STATUS_KEY]
        return ": ".join(str(status.get(k)) for k in (STATUS_FIELD, REASON_FIELD))
    if STATISTICS_KEY not in content.config_records or METRICS_KEY not in content.metric_records:
        return f"expected records {STATISTICS_KEY!r} and {METRICS_KEY!r}"
    record = content.config_records[STATISTICS_KEY]
    problem = weight_problem(content.metric_records[METRICS_KEY].get(WEIGHT_KEY), cfg.max_num_examples)
    if problem is not None:
        return problem
    for key, size in expected_release(cfg, server_round).items():
        value = record.get(key)
        if not isinstance(value, list) or len(value) != size:
            return f"expected {key!r} with {size} numbers"
        if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            return f"{key!r} has NaN or infinite values"
    return None


@dataclass
class _Releases:
    """The checked releases of one statistics stage, as arrays."""

    sites: list[str] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)
    seconds: list[np.ndarray] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, replies: Iterable[tuple[str, Message]], cfg: FederationConfig) -> _Releases:
        shift, out = cfg.shift, cls()
        for name, msg in replies:
            record = msg.content.config_records[STATISTICS_KEY]
            out.sites.append(name)
            if LABEL_COUNTS_KEY in record:
                out.counts.append(np.asarray(record[LABEL_COUNTS_KEY], dtype=np.float64))
            if shift.align:
                sums = np.asarray(record[MOMENT_SUM_KEY], dtype=np.float64)
                out.sums.append(sums.reshape(-1, shift.align_dim))
                weight = msg.content.metric_records[METRICS_KEY][WEIGHT_KEY]
                out.sizes.append(float(weight))  # type: ignore[arg-type]
                key = MOMENT_OUTER_KEY if shift.align_loss == CORAL else MOMENT_SQUARE_KEY
                out.seconds.append(np.asarray(record[key], dtype=np.float64))
        return out


def collect_statistics(
    grid: Grid,
    arrays: ArrayRecord,
    cfg: FederationConfig,
    run_id: str,
    *,
    server_round: int = 0,
    previous: GlobalStatistics | None = None,
    names: SiteNames | None = None,
) -> GlobalStatistics | None:
    """Ask every site for its DP statistics, aggregate them, send the result to every site.

    ``server_round`` 0 is the stage before the first round; a later round
    refreshes the feature moments only and keeps ``previous``'s label counts.
    Returns ``None`` when the run needs no statistics (``previous`` when no site sent any).
    ``names`` tells the sites apart (the strategy's; a new claim-binding one if not given).
    """
    if not cfg.shift.needs_statistics:
        return None
    names = names if names is not None else SiteNames()
    config = ConfigRecord({STAGE_KEY: STAGE_RELEASE, SERVER_ROUND_KEY: server_round})
    replies = ask_sites(
        grid,
        RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
        MessageType.QUERY,
        names=names,
        timeout=cfg.reply_timeout,
        check=lambda msg: _release_problem(msg, cfg, server_round),
        left_out=f"Statistics stage (round {server_round}): left out",
    )
    releases = _Releases.of(replies, cfg)
    if not releases.sites:
        logger.warning("Statistics stage (round %d): no site sent statistics", server_round)
        return previous
    stats = _aggregate(releases, cfg, run_id, server_round, previous)
    logger.info(
        "Statistics stage (round %d): %d site(s) %s; global training prior %s",
        server_round,
        len(releases.sites),
        sorted(releases.sites),
        np.round(stats.train_prior, 4).tolist() if stats.train_prior is not None else "not released",
    )
    _broadcast(grid, stats, server_round, cfg.reply_timeout, names)
    return stats


def _aggregate(
    releases: _Releases,
    cfg: FederationConfig,
    run_id: str,
    server_round: int,
    previous: GlobalStatistics | None,
) -> GlobalStatistics:
    """The global statistics of ``releases``; what they do not hold is ``previous``'s."""
    counts = releases.counts
    class_counts = np.sum(counts, axis=0) if counts else (previous.class_counts if previous else None)
    stats = GlobalStatistics(
        run=run_id,
        sites=len(releases.sites),
        round=server_round,
        train_prior=aggregate_prior(counts) if counts else (previous.train_prior if previous else None),
        class_counts=class_counts,
    )
    if cfg.shift.align and class_counts is not None:
        within = previous.within_var if previous is not None else None
        stats = _with_moments(stats, cfg, releases, class_counts, within)
    return stats


def _with_moments(
    stats: GlobalStatistics,
    cfg: FederationConfig,
    releases: _Releases,
    class_counts: np.ndarray,
    previous_within: float | None = None,
) -> GlobalStatistics:
    """The global class means and within-class variance (prototype) or marginal moments (CORAL)."""
    shift = cfg.shift
    k, sums, seconds, sizes = shift.align_dim, releases.sums, releases.seconds, releases.sizes
    class_means = aggregate_class_means(sums, class_counts)
    if shift.align_loss == CORAL:
        outers = [o.reshape(k, k) for o in seconds]
        mean, cov = aggregate_moments([s.sum(axis=0) for s in sums], outers, sizes)
        floor = moment_noise_floor(shift.align_noise, shift.align_clip, k, len(sums), sum(sizes))
        logger.info(
            "Statistics stage: %d of %d feature directions have a variance above the DP noise level %.3g",
            int(np.sum(np.linalg.eigvalsh(cov) > floor)),
            k,
            floor,
        )
        return replace(stats, class_means=class_means, moment_mean=mean, moment_cov=cov)
    within = aggregate_within_variance(sums, seconds, class_counts, k)
    if previous_within is not None:
        # the scale stays round 0's: rescaled by its own shrinking variance, the pull would never let go
        within = previous_within
    return replace(stats, class_means=class_means, within_var=within)


def _broadcast(
    grid: Grid, stats: GlobalStatistics, server_round: int, timeout: float, names: SiteNames
) -> None:
    """Send the global statistics to every site; a site that does not take them is logged."""
    broadcast = RecordDict(
        {
            CONFIG_KEY: ConfigRecord({STAGE_KEY: STAGE_GLOBAL, SERVER_ROUND_KEY: server_round}),
            GLOBAL_KEY: ConfigRecord(stats.to_record()),
        }
    )
    for msg in send_to_all(grid, broadcast, MessageType.QUERY, timeout):
        if msg.has_error():
            logger.warning(
                "Statistics stage: %s did not take the global statistics: %s",
                names.name_of(msg.metadata.src_node_id),
                msg.error.reason,
            )


class StatisticsRefresh(Strategy):
    """Wraps an :class:`AdapterFedAvg`; refreshes the global feature moments before every round but the first.

    Everything else is the wrapped strategy's; ``statistics`` starts as the
    stage before round 1 left them and holds the latest.
    """

    def __init__(
        self, strategy: AdapterFedAvg, cfg: FederationConfig, statistics: GlobalStatistics | None
    ) -> None:
        self.strategy = strategy
        self.federation = cfg
        self.statistics = statistics

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round > 1:  # round 1 trains from the arrays the stage before it saw
            self.statistics = collect_statistics(
                grid,
                arrays,
                self.federation,
                str(grid.run.run_id),
                server_round=server_round + self.strategy.round_offset,  # the federation's round
                previous=self.statistics,
                names=self.strategy.names,
            )
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


def with_refresh(
    strategy: AdapterFedAvg, cfg: FederationConfig, statistics: GlobalStatistics | None
) -> Strategy:
    """``strategy``, wrapped in :class:`StatisticsRefresh` when ``cfg`` refreshes the moments every round."""
    if cfg.shift.refreshes:
        return StatisticsRefresh(strategy, cfg, statistics)
    return strategy


def statistics_summary(stats: GlobalStatistics | None) -> dict[str, Any] | None:
    """For results.json: the global prior and how many sites contributed (the moments are left out)."""
    if stats is None:
        return None
    return {
        "sites": stats.sites,
        "train_prior": stats.train_prior.tolist() if stats.train_prior is not None else None,
        "align_dim": int(stats.class_means.shape[1]) if stats.class_means is not None else None,
    }
