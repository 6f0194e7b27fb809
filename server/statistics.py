"""The server's side of the statistics stage: collect the sites' DP releases, add them, send the sums back.

Runs before the first round when the run corrects label shift, adjusts logits
or aligns features (:attr:`fedshift.common.shift_config.ShiftConfig.needs_statistics`),
and, with ``align-refresh``, again before every later round for the feature
moments only (:class:`StatisticsFedAvg`): features move as the adapters train,
and a target from round 0 would pull them back.
Every reply is a post-processing of Gaussian mechanisms the sites charged; the
server only adds them (:func:`fedshift.common.shift_statistics.aggregate_prior`,
:func:`~fedshift.common.shift_statistics.aggregate_moments`). A site that sends
nothing usable is logged and left out, like a failing node in a round.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedshift.common.config import FederationConfig
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, STATUS_KEY, WEIGHT_KEY
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
from fedshift.server.enrollment import SiteNames
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import weight_problem

logger = logging.getLogger(__name__)


def _query(grid: Grid, content: RecordDict, timeout: float) -> list[Message]:
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _release_problem(msg: Message, cfg: FederationConfig, server_round: int) -> str | None:
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if STATUS_KEY in content.config_records:
        status = content.config_records[STATUS_KEY]
        return ": ".join(str(status.get(k)) for k in ("status", "reason"))
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


def expected_release(cfg: FederationConfig, server_round: int) -> dict[str, int]:
    """The keys (and their lengths) of a site's release in ``server_round``'s statistics stage."""
    shift, c, k = cfg.shift, cfg.model.num_classes, cfg.shift.align_dim
    wanted = {"label-counts": c} if shift.needs_counts and server_round == 0 else {}
    if shift.align:
        wanted["moment-sum"] = c * k
        wanted |= {"moment-outer": k * k} if shift.align_loss == "coral" else {"moment-square": c}
    return wanted


def _broadcast(
    grid: Grid, stats: GlobalStatistics, server_round: int, timeout: float, names: SiteNames
) -> None:
    broadcast = RecordDict(
        {
            CONFIG_KEY: ConfigRecord({STAGE_KEY: STAGE_GLOBAL, "server-round": server_round}),
            GLOBAL_KEY: ConfigRecord(stats.to_record()),
        }
    )
    for msg in _query(grid, broadcast, timeout):
        if msg.has_error():
            logger.warning(
                "Statistics stage: %s did not take the global statistics: %s",
                names.name_of(msg.metadata.src_node_id),
                msg.error.reason,
            )


def collect_statistics(
    grid: Grid,
    arrays: ArrayRecord,
    cfg: FederationConfig,
    run_id: str,
    timeout: float = 3600,
    *,
    server_round: int = 0,
    previous: GlobalStatistics | None = None,
    names: SiteNames | None = None,
) -> GlobalStatistics | None:
    """Ask every site for its DP statistics, aggregate them, send the result to every site.

    ``server_round`` 0 is the stage before the first round; a later round
    refreshes the feature moments only and keeps ``previous``'s label counts.
    Returns ``None`` when the run needs no statistics or no site sent any.
    ``names`` tells the sites apart (the strategy's; a new claim-binding one if not given).
    """
    names = names if names is not None else SiteNames()
    shift = cfg.shift
    if not shift.needs_statistics:
        return None
    config = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": server_round})
    replies = _query(grid, RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), timeout)
    counts: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    sizes: list[float] = []
    contributors: list[str] = []
    k = shift.align_dim
    for msg in replies:
        name, problem = names.resolve(msg)
        if problem is None and name in contributors:
            problem = "a second reply from the same site"
        if problem is None:
            problem = _release_problem(msg, cfg, server_round)
        if problem is not None:
            logger.warning("Statistics stage (round %d): left out %s: %s", server_round, name, problem)
            continue
        record = msg.content.config_records[STATISTICS_KEY]
        contributors.append(name)
        if "label-counts" in record:
            counts.append(np.asarray(record["label-counts"], dtype=np.float64))
        if shift.align:
            sums.append(np.asarray(record["moment-sum"], dtype=np.float64).reshape(-1, k))
            sizes.append(float(msg.content.metric_records[METRICS_KEY][WEIGHT_KEY]))  # type: ignore[arg-type]
            key = "moment-outer" if shift.align_loss == "coral" else "moment-square"
            seconds.append(np.asarray(record[key], dtype=np.float64))
    if not contributors:
        logger.warning("Statistics stage (round %d): no site sent statistics", server_round)
        return previous
    class_counts = np.sum(counts, axis=0) if counts else (previous.class_counts if previous else None)
    stats = GlobalStatistics(
        run=run_id,
        sites=len(contributors),
        round=server_round,
        train_prior=aggregate_prior(counts) if counts else (previous.train_prior if previous else None),
        class_counts=class_counts,
    )
    if shift.align and class_counts is not None:
        within = previous.within_var if previous is not None else None
        stats = _with_moments(stats, cfg, sums, seconds, sizes, class_counts, within)
    logger.info(
        "Statistics stage (round %d): %d site(s) %s; global training prior %s",
        server_round,
        len(contributors),
        sorted(contributors),
        np.round(stats.train_prior, 4).tolist() if stats.train_prior is not None else "not released",
    )
    _broadcast(grid, stats, server_round, timeout, names)
    return stats


def _with_moments(
    stats: GlobalStatistics,
    cfg: FederationConfig,
    sums: list[np.ndarray],
    seconds: list[np.ndarray],
    sizes: list[float],
    class_counts: np.ndarray,
    previous_within: float | None = None,
) -> GlobalStatistics:
    """The global class means and within-class variance (prototype) or marginal moments (CORAL)."""
    shift = cfg.shift
    k = shift.align_dim
    class_means = aggregate_class_means(sums, class_counts)
    if shift.align_loss == "coral":
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


class StatisticsFedAvg(AdapterFedAvg):
    """:class:`AdapterFedAvg` that refreshes the global feature moments before every round after the first."""

    def __init__(self, *, federation: FederationConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.federation = federation
        self.statistics: GlobalStatistics | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round > 1:  # round 1 trains from the arrays the stage before it saw
            self.statistics = collect_statistics(
                grid,
                arrays,
                self.federation,
                str(grid.run.run_id),
                server_round=server_round + self.round_offset,  # the federation's round, also on resume
                previous=self.statistics,
                names=self.names,
            )
        return super().configure_train(server_round, arrays, config, grid)


def statistics_strategy(cfg: FederationConfig) -> Callable[..., AdapterFedAvg]:
    """The strategy class for ``cfg``: :class:`StatisticsFedAvg` when it refreshes moments every round."""
    if cfg.shift.align and cfg.shift.align_refresh:
        return functools.partial(StatisticsFedAvg, federation=cfg)
    return AdapterFedAvg


def initial_statistics(
    strategy: AdapterFedAvg, grid: Grid, arrays: ArrayRecord, cfg: FederationConfig
) -> GlobalStatistics | None:
    """The statistics stage before round 1; a refreshing strategy keeps its result for the later rounds."""
    stats = collect_statistics(grid, arrays, cfg, str(grid.run.run_id), names=strategy.names)
    if isinstance(strategy, StatisticsFedAvg):
        strategy.statistics = stats
    return stats


def statistics_summary(stats: GlobalStatistics | None) -> dict[str, Any] | None:
    """For results.json: the global prior and how many sites contributed (the moments are left out)."""
    if stats is None:
        return None
    return {
        "sites": stats.sites,
        "train_prior": stats.train_prior.tolist() if stats.train_prior is not None else None,
        "align_dim": int(stats.class_means.shape[1]) if stats.class_means is not None else None,
    }
