"""The site's side of the statistics stage, and the per-round statistics its training objective needs.

Stage ``statistics`` (a QUERY message before round 1): charge the ledger, then
release the site's label counts (when the run corrects label shift or adjusts
logits) and its feature moments (when it aligns features) through Gaussian
mechanisms. A release is kept in the state directory and sent again, not drawn
again, if the server asks twice in the same run (a fresh draw would be a second,
uncharged release). Stage ``global-statistics``: keep what the server
aggregated (:data:`fedshift.common.shift_statistics.GLOBAL_FILE`).

A site training with DP-SGD and the alignment loss also releases its moments
once per round (charged as ``dp-moments``, planned into the round's noise); the
release is the linearisation point of its loss and never leaves the site.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedshift.client.alignment import (
    MomentRelease,
    feature_matrix,
    moment_mechanism,
    private_moments,
    projection,
    site_objective,
)
from fedshift.client.correction import count_mechanism, private_label_counts
from fedshift.client.dp import RandomSource, Release, SecureSource, SeededSource, check_round, reserve
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.client.training import Objective, resolve_device
from fedshift.common.config import FederationConfig
from fedshift.common.errors import BudgetExhaustedError, ConfigError, RoundRefusedError
from fedshift.common.io import atomic_write_json
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism
from fedshift.common.protocol import (
    CONFIG_KEY,
    LABEL_COUNTS_KEY,
    MECHANISM_DP_LABEL_COUNTS,
    MECHANISM_DP_MOMENTS,
    METRICS_KEY,
    MOMENT_OUTER_KEY,
    MOMENT_SQUARE_KEY,
    MOMENT_SUM_KEY,
    SITE_KEY,
    STATUS_STATISTICS_LOST,
    WEIGHT_KEY,
    refusal,
    refusal_for,
    round_of,
    site_record,
)
from fedshift.common.shift_statistics import (
    GLOBAL_KEY,
    STAGE_GLOBAL,
    STAGE_KEY,
    STAGE_RELEASE,
    STATISTICS_KEY,
    GlobalStatistics,
    load_global_statistics,
    save_global_statistics,
)

logger = logging.getLogger(__name__)

RELEASE_FILE = "dp-statistics.json"  # this site's own releases of the current run (already charged)
RELEASE_SIZE = "n"  # in a release kept in RELEASE_FILE: the training split's size (sent as the weight)
STATISTICS_ROUND = 0  # the ledger's round of the first statistics stage (training rounds start at 1)


def _source(fed: FederationConfig, site: SiteSettings, what: str) -> RandomSource:
    if site.privacy.secure_rng:
        return SecureSource()
    return SeededSource(zlib.crc32(f"{fed.seed}:{what}:{site.name}".encode()))


def release_mechanisms(fed: FederationConfig, server_round: int = 0) -> list[Release]:
    """What the statistics stage of ``server_round`` releases (label counts once, before round 1)."""
    out: list[Release] = []
    if fed.shift.needs_counts and server_round == 0:
        out.append(Release(MECHANISM_DP_LABEL_COUNTS, count_mechanism(fed.shift.count_noise)))
    if fed.shift.align and (server_round == 0 or fed.shift.refreshes):
        out.append(Release(MECHANISM_DP_MOMENTS, moment_mechanism(fed.shift.align_noise)))
    return out


def model_projection(fed: FederationConfig, model: FedshiftModel) -> np.ndarray:
    """The run's public projection of the head's input features."""
    return projection(int(model.head.in_features), fed.shift.align_dim, fed.seed)


def _load_releases(state_dir: Path, run_id: str) -> dict[str, Any]:
    """This run's releases by round (``{"0": {...}, "3": {...}}``), empty for another run."""
    path = state_dir / RELEASE_FILE
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(saved.get("rounds", {})) if saved.get("run") == run_id else {}


def own_release(state_dir: Path, run_id: str, server_round: int) -> dict[str, Any] | None:
    """This site's own release of ``server_round`` (or the latest before it) in this run."""
    releases = _load_releases(state_dir, run_id)
    earlier = [int(r) for r in releases if int(r) <= server_round]
    return releases[str(max(earlier))] if earlier else None


def _release(
    msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel, server_round: int
) -> Message | dict[str, Any]:
    """Charge, then draw this site's releases (a dict), or a refusal message."""
    run_id = str(msg.metadata.run_id)
    privacy = site.privacy
    ledger = PrivacyLedger.at(site.state_dir, accountant=privacy.accountant)
    planned = release_mechanisms(fed, server_round)
    if any(ledger.find(run_id, server_round, r.mechanism) for r in planned):
        reason = (
            f"statistics of run {run_id} round {server_round} were charged but their release is not in "
            f"{RELEASE_FILE}; a fresh draw would be an uncharged second release: this site sends none"
        )
        logger.error("%s: %s", site.name, reason)
        return refusal(msg, site.name, STATUS_STATISTICS_LOST, reason)
    try:  # round 0 or a refresh before a round of this run, each after the last: before any charge
        for release in planned:
            check_round(
                ledger,
                run_id=run_id,
                server_round=server_round,
                num_rounds=fed.num_rounds,
                mechanism=release.mechanism,
            )
        load_site_data(site, fed.model)  # data the model cannot take: refused here, before the charges
        # the lifetime budget and the per-run cap (dp-epsilon-per-run), then the charges
        reserve(
            privacy, ledger, run_id=run_id, server_round=server_round, charges=planned, what="the statistics"
        )
    except RoundRefusedError as exc:
        logger.warning("%s: no statistics: %s", site.name, exc)
        return refusal_for(msg, site.name, exc)
    except BudgetExhaustedError as exc:
        logger.warning("%s: %s", site.name, exc)
        return refusal_for(msg, site.name, exc)
    train = load_site_data(site, fed.model).split("train")
    out: dict[str, Any] = {RELEASE_SIZE: len(train)}
    names = {r.mechanism for r in planned}
    if MECHANISM_DP_LABEL_COUNTS in names:
        counts = private_label_counts(
            train.labels, fed.model.num_classes, fed.shift.count_noise, _source(fed, site, "counts")
        )
        out[LABEL_COUNTS_KEY] = counts.counts.tolist()
    if MECHANISM_DP_MOMENTS in names:
        source = _source(fed, site, f"moments:{server_round}")
        moments = site_moments(fed, site, model, train.images, train.labels, source)
        out[MOMENT_SUM_KEY] = moments.class_sums.ravel().tolist()
        if moments.outer is not None:
            out[MOMENT_OUTER_KEY] = moments.outer.ravel().tolist()
        if moments.class_squares is not None:
            out[MOMENT_SQUARE_KEY] = moments.class_squares.tolist()
    releases = _load_releases(site.state_dir, run_id)
    releases[str(server_round)] = out
    atomic_write_json(site.state_dir / RELEASE_FILE, {"run": run_id, "rounds": releases})
    return out


def site_moments(
    fed: FederationConfig,
    site: SiteSettings,
    model: FedshiftModel,
    images: np.ndarray,
    labels: np.ndarray,
    source: RandomSource,
) -> MomentRelease:
    """The DP moment release of the site's projected features under ``model`` (charge it first):
    per-class sums, and for CORAL the outer products."""
    features = feature_matrix(model, images, resolve_device(site.device))
    projected = features @ model_projection(fed, model)
    shift = fed.shift
    return private_moments(
        projected,
        labels,
        fed.model.num_classes,
        shift.align_clip,
        shift.align_noise,
        source,
        outer=shift.align_loss == "coral",
    )


def handle_statistics(
    msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel | None
) -> Message:
    """The QUERY handler: release this site's statistics, or keep the global ones."""
    config = msg.content.config_records.get(CONFIG_KEY)
    stage = str(config.get(STAGE_KEY, "")) if config is not None else ""
    if stage == STAGE_GLOBAL:
        stats = GlobalStatistics.from_record(msg.content.config_records[GLOBAL_KEY])
        save_global_statistics(site.state_dir, stats)
        logger.info(
            "%s: received global statistics of run %s (round %d) from %d site(s)",
            site.name,
            stats.run,
            stats.round,
            stats.sites,
        )
        return Message(RecordDict({SITE_KEY: site_record(site.name)}), reply_to=msg)
    if stage != STAGE_RELEASE:
        raise ConfigError(
            f"Expected a query stage {STAGE_RELEASE!r} or {STAGE_GLOBAL!r}, but got {stage!r}; the server "
            "and the site run different fedshift versions"
        )
    if not fed.shift.needs_statistics:
        raise ConfigError(
            "Expected the run config to turn on ls-correction, ls-logit-adjust or align-weight for a "
            "statistics stage, but all are off"
        )
    if model is None:
        raise ConfigError(
            "Expected the global adapters in a statistics query (feature moments need the model), but the "
            "message has none; the server and the site run different fedshift versions"
        )
    run_id = str(msg.metadata.run_id)
    server_round = round_of(msg)
    released = _load_releases(site.state_dir, run_id).get(str(server_round))
    if released is None:
        outcome = _release(msg, fed, site, model, server_round)
        if isinstance(outcome, Message):
            return outcome
        released = outcome
    else:
        logger.info(
            "%s: sending the statistics already released in run %s round %d again (no new draw)",
            site.name,
            run_id,
            server_round,
        )
    record = ConfigRecord({k: v for k, v in released.items() if k != RELEASE_SIZE})
    content = RecordDict(
        {
            STATISTICS_KEY: record,
            METRICS_KEY: MetricRecord({WEIGHT_KEY: int(released[RELEASE_SIZE])}),
            SITE_KEY: site_record(site.name),
        }
    )
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- training


def round_mechanisms(fed: FederationConfig) -> list[Mechanism]:
    """The releases that come with every later round (the refreshed moments), for planning DP-SGD's noise.

    They are charged in the statistics stage before the round, not in training.
    """
    return [moment_mechanism(fed.shift.align_noise)] if fed.shift.refreshes else []


def training_objective(
    fed: FederationConfig,
    site: SiteSettings,
    model: FedshiftModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    run_id: str,
    private: bool,
    seed: int,
) -> Objective:
    """This round's per-sample objective (cross-entropy unless the run adjusts logits or aligns).

    With DP-SGD and alignment, the linearisation point is a fresh DP moment
    release, which the caller charged with the round (:func:`round_mechanisms`).
    """
    if not (fed.shift.align or fed.shift.logit_adjust > 0):
        from fedshift.client.training import cross_entropy

        return cross_entropy
    stats = load_global_statistics(site.state_dir, run_id)
    proj = model_projection(fed, model) if fed.shift.align else None
    point = None
    if fed.shift.align and fed.shift.align_loss == "coral" and private and stats is not None:
        # CORAL's linearisation point under DP: this site's own latest release (post-processing, free)
        own = own_release(site.state_dir, run_id, stats.round)
        if own is not None and MOMENT_OUTER_KEY in own:
            k = fed.shift.align_dim
            n = max(int(own[RELEASE_SIZE]), 1)
            sums = np.asarray(own[MOMENT_SUM_KEY], dtype=np.float64).reshape(-1, k)
            point = (
                sums.sum(axis=0) / n,
                np.asarray(own[MOMENT_OUTER_KEY], dtype=np.float64).reshape(k, k) / n,
            )
    model.train(True)
    return site_objective(fed.shift, stats, projection_matrix=proj, point=point, site=site.name)
