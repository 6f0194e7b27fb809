"""The server's side of the statistics stage: collect the sites' DP releases, add them, send the sums back.

Runs once before the first round when the run corrects label shift, adjusts
logits or aligns features (:attr:`fedshift.common.shift_config.ShiftConfig.needs_statistics`).
Every reply is a post-processing of Gaussian mechanisms the sites charged; the
server only adds them (:func:`fedshift.common.shift_statistics.aggregate_prior`,
:func:`~fedshift.common.shift_statistics.aggregate_moments`). A site that sends
nothing usable is logged and left out, like a failing node in a round.
"""

from __future__ import annotations

import logging
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
    moment_noise_floor,
)
from fedshift.server.strategy import site_name

logger = logging.getLogger(__name__)


def _query(grid: Grid, content: RecordDict, timeout: float) -> list[Message]:
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _release_problem(msg: Message, cfg: FederationConfig) -> str | None:
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if STATUS_KEY in content.config_records:
        status = content.config_records[STATUS_KEY]
        return ": ".join(str(status.get(k)) for k in ("status", "reason"))
    if STATISTICS_KEY not in content.config_records or METRICS_KEY not in content.metric_records:
        return f"expected records {STATISTICS_KEY!r} and {METRICS_KEY!r}"
    record = content.config_records[STATISTICS_KEY]
    n = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if isinstance(n, list) or n is None or not n > 0:
        return f"expected a positive {WEIGHT_KEY!r}, got {n!r}"
    shift, c, k = cfg.shift, cfg.model.num_classes, cfg.shift.align_dim
    wanted = {"label-counts": c} if shift.needs_counts else {}
    if shift.align:
        wanted["moment-sum"] = c * k
    if shift.align and shift.align_loss == "coral":
        wanted["moment-outer"] = k * k
    for key, size in wanted.items():
        value = record.get(key)
        if not isinstance(value, list) or len(value) != size:
            return f"expected {key!r} with {size} numbers"
        if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            return f"{key!r} has NaN or infinite values"
    return None


def collect_statistics(
    grid: Grid, arrays: ArrayRecord, cfg: FederationConfig, run_id: str, timeout: float = 3600
) -> GlobalStatistics | None:
    """Ask every site for its DP statistics, aggregate them, send the result to every site.

    Returns ``None`` when the run needs no statistics or no site sent any.
    """
    if not cfg.shift.needs_statistics:
        return None
    config = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": 0})
    replies = _query(grid, RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), timeout)
    counts: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    outers: list[np.ndarray] = []
    sizes: list[float] = []
    contributors: list[str] = []
    for msg in replies:
        problem = _release_problem(msg, cfg)
        if problem is not None:
            logger.warning("Statistics stage: left out %s: %s", site_name(msg), problem)
            continue
        record = msg.content.config_records[STATISTICS_KEY]
        contributors.append(site_name(msg))
        if cfg.shift.needs_counts:
            counts.append(np.asarray(record["label-counts"], dtype=np.float64))
        if cfg.shift.align:
            k = cfg.shift.align_dim
            sums.append(np.asarray(record["moment-sum"], dtype=np.float64).reshape(-1, k))
            sizes.append(float(msg.content.metric_records[METRICS_KEY][WEIGHT_KEY]))  # type: ignore[arg-type]
        if cfg.shift.per_round_moments:
            outers.append(np.asarray(record["moment-outer"], dtype=np.float64).reshape(k, k))
    if not contributors:
        logger.warning("Statistics stage: no site sent statistics; no correction or alignment in this run")
        return None
    mean, cov, class_means = None, None, None
    if cfg.shift.align:
        class_means = aggregate_class_means(sums, counts)
    if cfg.shift.per_round_moments:  # CORAL: the marginal moments
        sh = cfg.shift
        mean, cov = aggregate_moments([s.sum(axis=0) for s in sums], outers, sizes)
        floor = moment_noise_floor(sh.align_noise, sh.align_clip, sh.align_dim, len(sums), sum(sizes))
        above = int(np.sum(np.linalg.eigvalsh(cov) > floor))
        logger.info(
            "Statistics stage: %d of %d feature directions have a variance above the DP noise level %.3g",
            above,
            sh.align_dim,
            floor,
        )
    stats = GlobalStatistics(
        run=run_id,
        sites=len(contributors),
        train_prior=aggregate_prior(counts) if cfg.shift.needs_counts else None,
        class_means=class_means,
        moment_mean=mean,
        moment_cov=cov,
    )
    logger.info(
        "Statistics stage: %d site(s) %s; global training prior %s",
        len(contributors),
        sorted(contributors),
        np.round(stats.train_prior, 4).tolist() if stats.train_prior is not None else "not released",
    )
    broadcast = RecordDict(
        {
            CONFIG_KEY: ConfigRecord({STAGE_KEY: STAGE_GLOBAL, "server-round": 0}),
            GLOBAL_KEY: ConfigRecord(stats.to_record()),
        }
    )
    for msg in _query(grid, broadcast, timeout):
        if msg.has_error():
            logger.warning(
                "Statistics stage: %s did not take the global statistics: %s",
                site_name(msg),
                msg.error.reason,
            )
    return stats


def statistics_summary(stats: GlobalStatistics | None) -> dict[str, Any] | None:
    """For results.json: the global prior and how many sites contributed (the moments are left out)."""
    if stats is None:
        return None
    return {
        "sites": stats.sites,
        "train_prior": stats.train_prior.tolist() if stats.train_prior is not None else None,
        "moment_dim": int(stats.moment_mean.shape[0]) if stats.moment_mean is not None else None,
    }
