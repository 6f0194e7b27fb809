"""One training round at a site, planned before it runs.

:func:`plan_training` turns the server's training message and the site's settings into a
:class:`RoundPlan`: the DP-SGD round (or none, with ``dp=false``), every privacy mechanism the
round releases, charged to the ledger by the one reserve step (:func:`fedshift.client.dp.reserve`)
before any data is read, the per-sample training objective and the data-independent gradient
term (EWC). Each feature answers what it adds to the round: EWC its DP Fisher and its end-of-run
release (:mod:`fedshift.client.continual`), alignment its refreshed moments and its loss
(:mod:`fedshift.client.site_statistics`). :func:`run_training` trains by the plan and says what
protected the result (:class:`~fedshift.common.protocol.PrivacyReport`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from flwr.app import Message

from fedshift.client.continual import ewc_term, final_releases, round_releases
from fedshift.client.dp import PrivateTraining, Release, check_round, plan_round, reserve
from fedshift.client.ewc import EWCTerm
from fedshift.client.ledger import LedgerEntry, PrivacyLedger
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.client.site_statistics import round_mechanisms, training_objective
from fedshift.client.training import Objective, TrainStats, resolve_device, train_local
from fedshift.common.config import FederationConfig
from fedshift.common.data import ImageSet
from fedshift.common.model import FedshiftModel
from fedshift.common.privacy import Mechanism
from fedshift.common.protocol import MECHANISM_DP_SGD, MECHANISM_NONE, PrivacyReport, round_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Releases:
    """Every privacy mechanism a training round releases, and the ledger entries written for them."""

    charged: tuple[Release, ...] = ()  # DP-SGD and what comes with it, charged before any data is read
    counted: tuple[Mechanism, ...] = ()  # planned into the noise, charged by the statistics stage
    final: tuple[Mechanism, ...] = ()  # released once after the run's last round: the budget keeps room
    entries: tuple[LedgerEntry, ...] = ()  # the charges written, in order


@dataclass(frozen=True)
class RoundPlan:
    """What one training round at this site does, decided (and charged) before it trains."""

    run_id: str
    server_round: int
    seed: int  # of the round's Poisson sampling, noise and Fisher sample
    train: ImageSet  # the site's training split
    private: PrivateTraining | None  # the DP-SGD round; None: dp=false at this site
    releases: Releases  # none with dp=false
    objective: Objective  # the per-sample training loss
    gradient_term: EWCTerm | None  # EWC's penalty gradient (None: EWC off)
    fisher_source: str  # where the EWC Fisher came from ("" when EWC is off)

    def report(self, site: SiteSettings) -> PrivacyReport:
        """The privacy record of the round's update: the mechanism, and under DP the site's accounting."""
        source = self.fisher_source if self.gradient_term is not None else None
        dp = self.private
        if dp is None:
            return PrivacyReport(MECHANISM_NONE, ewc_fisher=source)
        privacy = site.privacy
        return PrivacyReport(
            MECHANISM_DP_SGD,
            epsilon=self.releases.entries[-1].epsilon,
            delta=privacy.delta,
            budget_epsilon=privacy.epsilon,
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            sample_rate=dp.sample_rate,
            steps=dp.steps,
            accountant=privacy.accountant,
            secure_rng=dp.secure_rng,
            ewc_fisher=source,
        )


def plan_training(msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel) -> RoundPlan:
    """The round ``msg`` asks for, charged; :class:`RoundRefusedError` (a round out of order or beyond
    the run) or :class:`BudgetExhaustedError` (it does not fit) before any data is read."""
    run_id, server_round = str(msg.metadata.run_id), round_of(msg)
    seed = zlib.crc32(f"{fed.seed}:{server_round}:{site.name}".encode())
    private = site.privacy.enabled
    ledger = PrivacyLedger.at(site.state_dir, accountant=site.privacy.accountant) if private else None
    if ledger is not None:  # a round out of order or beyond the run is refused before any data is read
        check_round(ledger, run_id=run_id, server_round=server_round, num_rounds=fed.num_rounds)
    else:
        logger.warning(
            "%s round %d: training WITHOUT differential privacy (dp=false); the egress log "
            "and the server's report say so",
            site.name,
            server_round,
        )
    train = load_site_data(site, model.config).split("train")  # data the model cannot take: refused here
    dp, releases = (
        (None, Releases()) if ledger is None else _reserve(fed, site, ledger, len(train), msg, seed)
    )
    objective = training_objective(
        fed, site, model, train.images, train.labels, run_id=run_id, private=private, seed=seed
    )
    term, source = ewc_term(fed, site, model, msg, train.images, private=private, seed=seed)
    return RoundPlan(run_id, server_round, seed, train, dp, releases, objective, term, source)


def _reserve(
    fed: FederationConfig,
    site: SiteSettings,
    ledger: PrivacyLedger,
    num_examples: int,
    msg: Message,
    seed: int,
) -> tuple[PrivateTraining, Releases]:
    """Plan the round's noise under the budget and charge its releases: DP-SGD, then what comes with it."""
    run_id, server_round = str(msg.metadata.run_id), round_of(msg)
    with_round = round_releases(fed, private=True)  # charged with this round (a DP Fisher)
    counted = round_mechanisms(fed)  # the refreshed moments, charged in the statistics stage
    extra = [*(r.cost for r in with_round), *counted]  # released with every round of the run
    final = final_releases(fed, private=True)  # the end-of-run release the run keeps room for
    dp = plan_round(
        site.privacy,
        ledger,
        num_examples=num_examples,
        train=fed.train,
        run_id=run_id,
        server_round=server_round,
        num_rounds=fed.num_rounds,
        seed=seed,
        extra=extra,
        final=final,
    )
    charged = (Release(MECHANISM_DP_SGD, dp.cost), *with_round)
    entries = reserve(
        site.privacy,
        ledger,
        run_id=run_id,
        server_round=server_round,
        charges=charged,
        planned=[*extra, dp.cost],
        final=final,
        what=f"round {server_round}",
    )
    return dp, Releases(charged, tuple(counted), tuple(final), tuple(entries))


def run_training(
    plan: RoundPlan, fed: FederationConfig, site: SiteSettings, model: FedshiftModel
) -> TrainStats:
    """Train ``model`` by the plan, on the site's device."""
    stats = train_local(
        model,
        plan.train,
        fed.train,
        resolve_device(site.device),
        seed=plan.seed,
        private=plan.private,
        gradient_term=plan.gradient_term,
        objective=plan.objective,
    )
    if plan.private is not None:  # a statistic of the private training data without DP: it stays here
        logger.info(
            "%s round %d: %.0f%% of per-sample gradients clipped",
            site.name,
            plan.server_round,
            100 * plan.private.clipped_fraction,
        )
    return stats
