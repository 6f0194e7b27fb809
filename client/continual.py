"""EWC at a site: the penalty's anchor and Fisher for a round, and the end-of-phase Fisher release.

* Anchor ``global``: the global adapters just received, with a Fisher estimated this
  round (under DP and charged, on public images, or F = 1).
* Anchor ``consolidated``: the anchor and Fisher the server sends with the training
  message, consolidated from the earlier phase's sites (already DP or public: using
  them costs this site nothing).
* ``query.fisher`` (run config ``ewc-consolidate``): after the last round the site
  estimates its Fisher at the final global adapters and sends it; under DP it is
  charged to the ledger first, and the budget planning kept room for it.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedshift.client.dp import Release, check_round, reserve
from fedshift.client.ewc import FISHER_PUBLIC, EWCTerm, fisher_mechanism, site_fisher
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.common.config import FederationConfig
from fedshift.common.errors import BudgetExhaustedError, ConfigError, RoundRefusedError
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism
from fedshift.common.protocol import (
    ANCHOR_KEY,
    FISHER_KEY,
    FISHER_SOURCE_FIELD,
    MECHANISM_DP_FISHER,
    MECHANISM_FIELD,
    MECHANISM_NONE,
    MECHANISM_PUBLIC,
    MECHANISM_UNIT,
    METRICS_KEY,
    PRIVACY_KEY,
    SITE_KEY,
    STATUS_REFUSED,
    WEIGHT_KEY,
    PrivacyReport,
    refusal,
    refusal_for,
    round_of,
    site_record,
)

logger = logging.getLogger(__name__)

CONSOLIDATED = "consolidated (sent by the server)"

# what protected a Fisher a site sends (the privacy record's "mechanism")
FISHER_RELEASES = {
    "dp": MECHANISM_DP_FISHER,
    "public": MECHANISM_PUBLIC,
    "none": MECHANISM_UNIT,
}


def round_releases(fed: FederationConfig, *, private: bool) -> list[Release]:
    """What EWC adds to a training round's releases: the DP Fisher estimated on the site's images."""
    return (
        [Release(MECHANISM_DP_FISHER, fisher_mechanism(fed.ewc))]
        if private and fed.ewc.spends_privacy
        else []
    )


def final_releases(fed: FederationConfig, *, private: bool) -> list[Mechanism]:
    """What EWC releases once after the run's last round (the Fisher for consolidation), under DP."""
    return [fisher_mechanism(fed.ewc)] if private and fed.ewc.consolidation_spends_privacy else []


def ewc_term(
    fed: FederationConfig,
    site: SiteSettings,
    model: FedshiftModel,
    msg: Message,
    images: np.ndarray,
    *,
    private: bool,
    seed: int,
) -> tuple[EWCTerm | None, str]:
    """This round's EWC term and where its Fisher came from (``(None, "")`` when EWC is off)."""
    if not fed.ewc.enabled:
        return None, ""
    if fed.ewc.anchor == "consolidated":
        records = msg.content.array_records
        if ANCHOR_KEY not in records or FISHER_KEY not in records:
            raise ConfigError(
                "Expected the server to send a consolidated anchor and Fisher for ewc-anchor='consolidated', "
                "but the training message has none; start the phase with init-checkpoint set to the "
                "earlier phase's checkpoint (written with ewc-consolidate=true)"
            )
        sent_anchor = dict(records[ANCHOR_KEY].to_torch_state_dict())
        sent_fisher = dict(records[FISHER_KEY].to_torch_state_dict())
        return EWCTerm(model, sent_anchor, sent_fisher, fed.ewc.lam), CONSOLIDATED
    anchor = {k: v.clone() for k, v in model.shared_state_dict().items()}
    fisher, source, _release = site_fisher(
        fed.ewc, model, images, private=private, seed=seed, secure_rng=site.privacy.secure_rng
    )
    return EWCTerm(model, anchor, fisher, fed.ewc.lam), source


def fisher_reply(msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel) -> Message:
    """The site's Fisher at the adapters in ``msg`` (already loaded into ``model``), as a reply.

    Under DP (``ewc-fisher-source = "dp"`` at a site with DP on) the release is
    charged to the ledger before the data is read; a release that was already
    charged, or that the budget cannot hold, is refused with the reason.
    """
    server_round = round_of(msg)
    seed = zlib.crc32(f"{fed.seed}:fisher:{server_round}:{site.name}".encode())
    source = fed.ewc.fisher_source
    private = site.privacy.enabled
    accounting = PrivacyReport(MECHANISM_NONE)
    if private and source == "dp":
        reserved = _reserve_fisher(msg, fed, site)
        if isinstance(reserved, Message):
            return reserved
        accounting = reserved
    train = load_site_data(site, fed.model).split("train")
    fisher, label, _release = site_fisher(
        fed.ewc, model, train.images, private=private, seed=seed, secure_rng=site.privacy.secure_rng
    )
    mechanism = FISHER_RELEASES[source] if (private or source != "dp") else MECHANISM_NONE
    used = len(train) if label in ("none", FISHER_PUBLIC) else min(len(train), fed.ewc.fisher_samples)
    logger.info("%s: Fisher for consolidation (%s) at round %d", site.name, label, server_round)
    values = {k: v.detach().cpu().to(torch.float32) for k, v in fisher.items()}
    if not all(bool(torch.isfinite(v).all()) for v in values.values()):
        return refusal(msg, site.name, STATUS_REFUSED, "the Fisher estimate is not finite")
    report = dataclasses.replace(accounting, mechanism=mechanism, ewc_fisher=label)
    # the Fisher reply's field order: what protected it and where it came from, then the accounting
    record = {MECHANISM_FIELD: mechanism, FISHER_SOURCE_FIELD: label, **report.to_record()}
    content = RecordDict(
        {
            FISHER_KEY: ArrayRecord(values),
            METRICS_KEY: MetricRecord({WEIGHT_KEY: max(1, used)}),
            SITE_KEY: site_record(site.name),
            PRIVACY_KEY: ConfigRecord(record),
        }
    )
    return Message(content, reply_to=msg)


def _reserve_fisher(msg: Message, fed: FederationConfig, site: SiteSettings) -> PrivacyReport | Message:
    """Charge the end-of-run DP Fisher (its accounting), or the refusal: a repeat, out of order, or
    over the budget."""
    server_round, run_id = round_of(msg), str(msg.metadata.run_id)
    privacy = site.privacy
    ledger = PrivacyLedger.at(site.state_dir, accountant=privacy.accountant)
    if ledger.find(run_id, server_round, MECHANISM_DP_FISHER) is not None:
        return refusal(msg, site.name, STATUS_REFUSED, "this Fisher was already released once in this run")
    cost = fisher_mechanism(fed.ewc)
    try:  # the end of the run only (round num-server-rounds + 1), once: before any charge or data read
        check_round(
            ledger,
            run_id=run_id,
            server_round=server_round,
            num_rounds=fed.num_rounds,
            mechanism=MECHANISM_DP_FISHER,
        )
        load_site_data(site, fed.model)  # data the model cannot take: refused here, before the charge
        [entry] = reserve(
            privacy,
            ledger,
            run_id=run_id,
            server_round=server_round,
            charges=[Release(MECHANISM_DP_FISHER, cost)],
            what="the Fisher",
        )
    except (RoundRefusedError, BudgetExhaustedError) as exc:
        logger.warning("%s: no consolidation Fisher: %s", site.name, exc)
        return refusal_for(msg, site.name, exc)
    return PrivacyReport(
        MECHANISM_DP_FISHER, epsilon=entry.epsilon, delta=privacy.delta, noise_multiplier=cost[0]
    )
