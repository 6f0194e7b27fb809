"""The fedshift ClientApp: one hospital's side of a round, in simulation and deployment.

Each message builds the model afresh (Flower creates ClientApps per round); the
frozen backbone is cached per process, the site-local input adapter is kept on
disk in the site's state directory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedshift.client.continual import ewc_term, fisher_reply
from fedshift.client.correction import evaluate_with_shift, source_prior_for
from fedshift.client.dp import check_round, plan_round
from fedshift.client.egress import (
    DEFAULT_METRICS,
    MECHANISM_DP,
    MECHANISM_DP_FISHER,
    EgressPolicy,
    egress_guard,
    refusal,
    round_of,
    split_of,
)
from fedshift.client.ewc import fisher_mechanism
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import (
    SiteSettings,
    load_local_state,
    load_site_data,
    save_local_state,
)
from fedshift.client.site_statistics import (
    handle_statistics,
    own_release,
    round_mechanisms,
    training_objective,
)
from fedshift.client.training import TrainStats, evaluate, resolve_device, train_local
from fedshift.common.config import FederationConfig
from fedshift.common.errors import BudgetExhaustedError, RoundRefusedError
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    PRIVACY_KEY,
    SITE_KEY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_ROUND_REFUSED,
    WEIGHT_KEY,
)
from fedshift.common.shift_statistics import load_global_statistics

logger = logging.getLogger(__name__)


def _settings(context: Context, fixed: Mapping[str, Any]) -> tuple[FederationConfig, SiteSettings]:
    fed = FederationConfig.from_run_config({**context.run_config, **fixed})
    site = SiteSettings.from_node_config(context.node_config, fed)
    return site.federation(fed), site  # the site's own noise for its Fisher, label counts and moments


def _prepare(
    msg: Message, context: Context, fixed: Mapping[str, Any]
) -> tuple[FederationConfig, SiteSettings, FedshiftModel]:
    fed, site = _settings(context, fixed)
    model = build_model(fed.model)
    model.load_shared_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    local = load_local_state(site.state_dir)
    if local is not None:
        model.load_local_state_dict(local)
    return fed, site, model


def _site_record(site: SiteSettings) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


def _policy(fed: FederationConfig, site: SiteSettings) -> EgressPolicy:
    allowed = site.egress_metrics if site.egress_metrics is not None else DEFAULT_METRICS
    return EgressPolicy(
        dp_required=site.privacy.enabled,
        allowed_metrics=allowed,
        eval_splits=site.eval_splits,
        num_rounds=fed.num_rounds,
    )


def _train_private(
    msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel, seed: int
) -> tuple[TrainStats, ConfigRecord]:
    """Plan the round under the budget, charge the ledger, then train (raises BudgetExhaustedError)."""
    privacy = site.privacy
    ledger = PrivacyLedger.at(site.state_dir, accountant=privacy.accountant)
    server_round = round_of(msg)
    run_id = str(msg.metadata.run_id)
    # a round out of order or beyond the run is refused before any data is read
    check_round(ledger, run_id=run_id, server_round=server_round, num_rounds=fed.num_rounds)
    train = load_site_data(site).split("train")
    fisher_cost = [fisher_mechanism(fed.ewc)] if fed.ewc.spends_privacy else []
    plan = plan_round(
        privacy,
        ledger,
        num_examples=len(train),
        train=fed.train,
        run_id=run_id,
        server_round=server_round,
        num_rounds=fed.num_rounds,
        seed=seed,
        extra=[*fisher_cost, *round_mechanisms(fed)],  # issue 5: + the refreshed DP moments per round
        final=[fisher_mechanism(fed.ewc)] if fed.ewc.consolidation_spends_privacy else [],
    )
    dp = plan.training
    # charged before the data is touched: a crash mid-round over-reports, never under-reports
    entry = ledger.charge(
        run_id=run_id,
        round=server_round,
        mechanism=MECHANISM_DP,
        noise_multiplier=dp.noise_multiplier,
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        delta=plan.delta,
    )
    for cost in fisher_cost:  # the DP Fisher release of this round, also before any access
        entry = ledger.charge_mechanism(
            run_id=run_id, round=server_round, mechanism=MECHANISM_DP_FISHER, cost=cost, delta=plan.delta
        )
    objective = training_objective(
        fed, site, model, train.images, train.labels, run_id=run_id, private=True, seed=seed
    )
    term, source = ewc_term(fed, site, model, msg, train.images, private=True, seed=seed)
    stats = train_local(
        model,
        train,
        fed.train,
        resolve_device(site.device),
        seed=seed,
        private=dp,
        gradient_term=term,
        objective=objective,
    )
    record = ConfigRecord(
        {
            "mechanism": MECHANISM_DP,
            "epsilon": entry.epsilon,
            "delta": plan.delta,
            "budget-epsilon": privacy.epsilon,
            "noise-multiplier": dp.noise_multiplier,
            "clip-norm": dp.clip_norm,
            "sample-rate": dp.sample_rate,
            "steps": dp.steps,
            "accountant": privacy.accountant,
            "secure-rng": dp.secure_rng,
            **({"ewc-fisher": source} if term else {}),
        }
    )
    # a statistic of the private training data without DP: it stays in the site's log
    logger.info(
        "%s round %d: %.0f%% of per-sample gradients clipped",
        site.name,
        server_round,
        100 * dp.clipped_fraction,
    )
    return stats, record


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``overrides`` take precedence over ``context.run_config``.

    ``mods`` are Flower client mods (``fn(msg, ctxt, call_next)``) wrapped around
    the handlers, inside the egress guard: whatever they add must pass it too.
    """
    fixed = dict(overrides or {})

    def resolve(context: Context) -> tuple[str, Path, EgressPolicy]:
        fed, site = _settings(context, fixed)
        return site.name, site.state_dir, _policy(fed, site)

    app = ClientApp(mods=[egress_guard(resolve), *mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fed, site, model = _prepare(msg, context, fixed)
        server_round = round_of(msg)
        seed = zlib.crc32(f"{fed.seed}:{server_round}:{site.name}".encode())
        device = resolve_device(site.device)
        # progressive unfreezing: only the levels this round opens train (all of them when off)
        model.freeze_for_training(fed.train.trainable_depth(server_round))
        if site.privacy.enabled:
            try:
                stats, privacy = _train_private(msg, fed, site, model, seed)
            except RoundRefusedError as exc:
                logger.warning("%s round %d: refused: %s", site.name, server_round, exc)
                return refusal(msg, site.name, STATUS_ROUND_REFUSED, str(exc))
            except BudgetExhaustedError as exc:
                logger.warning("%s round %d: not training: %s", site.name, server_round, exc)
                return refusal(msg, site.name, STATUS_BUDGET_EXHAUSTED, str(exc))
        else:
            logger.warning(
                "%s round %d: training WITHOUT differential privacy (dp=false); the egress log "
                "and the server's report say so",
                site.name,
                server_round,
            )
            data = load_site_data(site).split("train")
            term, source = ewc_term(fed, site, model, msg, data.images, private=False, seed=seed)
            objective = training_objective(  # issue 5: logit adjustment and/or feature alignment
                fed,
                site,
                model,
                data.images,
                data.labels,
                run_id=str(msg.metadata.run_id),
                private=False,
                seed=seed,
            )
            stats = train_local(
                model, data, fed.train, device, seed=seed, gradient_term=term, objective=objective
            )
            privacy = ConfigRecord({"mechanism": "none", **({"ewc-fisher": source} if term else {})})
        save_local_state(site.state_dir, model.local_state_dict())
        logger.info(  # the validation metrics come from the evaluate stage (once per round and split)
            "%s round %d: loss %.4f, %.0f samples/s on %s%s",
            site.name,
            server_round,
            stats.loss,
            stats.samples_per_second,
            device,
            f", epsilon {float(cast(float, privacy['epsilon'])):.3f}" if "epsilon" in privacy else "",
        )
        # the training loss is a statistic of the private batches without DP, and the val
        # metrics would be an evaluation outside the evaluate stage's once-per-round rule: both stay in
        # the site's log above. The weight is the training split's size (DP-SGD's sampling rate,
        # in the privacy record, discloses it anyway); the throughput is not computed from data.
        metrics = MetricRecord(
            {WEIGHT_KEY: stats.num_examples, "samples-per-second": stats.samples_per_second}
        )
        shared = {k: v.cpu() for k, v in model.shared_state_dict().items()}
        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord(shared),
                METRICS_KEY: metrics,
                SITE_KEY: _site_record(site),
                PRIVACY_KEY: privacy,
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        fed, site, model = _prepare(msg, context, fixed)
        split = split_of(msg)  # one of the site's eval-splits: the egress guard refused any other
        dataset = load_site_data(site)
        data = dataset.split(split)
        device = resolve_device(site.device)
        shift = fed.shift
        if (shift.correction or shift.tta) and split != "val" and "val" in dataset.splits:
            # issue 5: calibrated on val, the prior estimated on this split's images (labels hidden)
            run_id = str(msg.metadata.run_id)
            stats = load_global_statistics(site.state_dir, run_id)
            labels = dataset.split("train").labels if "train" in dataset.splits else np.zeros(0)
            counts = None
            if site.privacy.enabled:  # the metrics leave, so the labels count only via DP
                own = own_release(site.state_dir, run_id, 0)
                labels = np.zeros(0)
                counts = np.asarray(own["label-counts"]) if own and "label-counts" in own else None
            source, which = source_prior_for(
                stats.train_prior if stats is not None else None,
                labels,
                fed.model.num_classes,
                local_norm=fed.model.local_norm,
                logit_adjust=shift.logit_adjust,
                train_counts=counts,
            )
            logger.info("Label shift: correcting from the %s training prior %s", which, source)
            result = evaluate_with_shift(
                model,
                dataset.split("val"),
                data,
                source,
                shift,
                device,
                seed=zlib.crc32(f"{fed.seed}:label-shift:{site.name}".encode()),
                state_dir=site.state_dir,
                split=split,
            )
        else:
            result = {k.replace("_", "-"): v for k, v in evaluate(model, data, device).items()}
        metrics = MetricRecord({WEIGHT_KEY: len(data), **result})
        content = RecordDict({METRICS_KEY: metrics, SITE_KEY: _site_record(site)})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Issue 5: the statistics stage (DP label counts and feature moments; the global statistics)."""
        if ARRAYS_KEY in msg.content.array_records:  # the release stage: features of the global model
            fed, site, model = _prepare(msg, context, fixed)
            return handle_statistics(msg, fed, site, model)
        fed, site = _settings(context, fixed)
        return handle_statistics(msg, fed, site, None)

    @app.query("fisher")
    def fisher(msg: Message, context: Context) -> Message:
        """The end-of-phase Fisher at the final global adapters (run config ewc-consolidate)."""
        fed, site, model = _prepare(msg, context, fixed)
        return fisher_reply(msg, fed, site, model)

    return app


app = make_client_app()
