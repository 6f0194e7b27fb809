"""The fedshift ClientApp: one hospital's side of a round, in simulation and deployment.

Each message builds the model afresh (Flower creates ClientApps per round); the
frozen backbone is cached per process, the site-local input adapter is kept on
disk in the site's state directory. The handlers, in the order a run calls them:
:func:`train` (planned and charged by :mod:`fedshift.client.round`), :func:`evaluate_split`,
and the two queries: the statistics stage (:mod:`fedshift.client.site_statistics`) and the
end-of-phase Fisher (:mod:`fedshift.client.continual`). Every reply leaves through the
egress guard (:mod:`fedshift.client.egress`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedshift.client.bundle import final_model_reply
from fedshift.client.continual import fisher_reply
from fedshift.client.correction import evaluate_with_shift, source_prior_for
from fedshift.client.egress import EgressPolicy, egress_guard
from fedshift.client.round import plan_training, run_training
from fedshift.client.secure_aggregation import (
    begin_masking,
    masked_arrays,
    setup_reply,
    share_reply,
    unmask_reply,
)
from fedshift.client.site import (
    SiteSettings,
    load_local_state,
    load_site_data,
    save_local_state,
)
from fedshift.client.site_statistics import handle_statistics, own_release
from fedshift.client.training import device_for, evaluate
from fedshift.common.config import FederationConfig
from fedshift.common.data import Dataset
from fedshift.common.errors import BudgetExhaustedError, RoundRefusedError
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.protocol import (
    ARRAYS_KEY,
    DEFAULT_METRICS,
    FINAL_MODEL_QUERY,
    FISHER_QUERY,
    LABEL_COUNTS_KEY,
    METRICS_KEY,
    PRIVACY_KEY,
    SAMPLES_PER_SECOND_KEY,
    SECAGG_MASKED_KEY,
    SECAGG_SETUP_QUERY,
    SECAGG_SHARE_QUERY,
    SECAGG_UNMASK_QUERY,
    SITE_KEY,
    SPLIT_VAL,
    WEIGHT_KEY,
    refusal_for,
    round_of,
    site_record,
    split_of,
)
from fedshift.common.shift_statistics import load_global_statistics

logger = logging.getLogger(__name__)


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``overrides`` take precedence over ``context.run_config``.

    ``mods`` are Flower client mods (``fn(msg, ctxt, call_next)``) wrapped around
    the handlers, inside the egress guard: whatever they add must pass it too.
    """
    settings = _Settings(dict(overrides or {}))

    def resolve(context: Context) -> tuple[str, Path, EgressPolicy]:
        fed, site = settings.parse(context)
        return site.name, site.state_dir, _policy(fed, site)

    app = ClientApp(mods=[egress_guard(resolve), *mods])

    @app.train()
    def train_(msg: Message, context: Context) -> Message:
        return train(msg, *_prepare(msg, settings(context)), context=context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return evaluate_split(msg, *_prepare(msg, settings(context)))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The statistics stage (DP label counts and feature moments; the global statistics)."""
        if ARRAYS_KEY in msg.content.array_records:  # the release stage: features of the global model
            fed, site, model = _prepare(msg, settings(context))
            device_for(site.device)
            return handle_statistics(msg, fed, site, model)
        fed, site = settings(context)
        return handle_statistics(msg, fed, site, None)

    @app.query(FISHER_QUERY)
    def fisher(msg: Message, context: Context) -> Message:
        """The end-of-phase Fisher at the final global adapters (run config ewc-consolidate)."""
        return fisher_reply(msg, *_prepare(msg, settings(context)))

    @app.query(SECAGG_SETUP_QUERY)
    def secagg_setup(msg: Message, context: Context) -> Message:
        """Secure aggregation, before a round: this round's keys (client/secure_aggregation.py)."""
        return setup_reply(msg, context, *settings(context))

    @app.query(SECAGG_SHARE_QUERY)
    def secagg_share(msg: Message, context: Context) -> Message:
        """Secure aggregation, before a round: the shares of this site's secrets, sealed to its neighbours."""
        return share_reply(msg, context, *settings(context))

    @app.query(SECAGG_UNMASK_QUERY)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        """Secure aggregation, after a round: the shares that unmask the survivors' sum."""
        return unmask_reply(msg, context, *settings(context))

    @app.query(FINAL_MODEL_QUERY)
    def final_model(msg: Message, context: Context) -> Message:
        """The final global adapters: the site writes its model bundle (:mod:`fedshift.client.bundle`)."""
        return final_model_reply(msg, *_prepare(msg, settings(context)))

    return app


def train(
    msg: Message,
    fed: FederationConfig,
    site: SiteSettings,
    model: FedshiftModel,
    context: Context | None = None,
) -> Message:
    """One training round: planned and charged, trained, the shared adapters sent (or a refusal).

    With secure aggregation (which needs the node's ``context``, where the round's secrets live) the
    adapters leave masked (:mod:`fedshift.client.secure_aggregation`).
    """
    server_round = round_of(msg)
    device = device_for(site.device)
    # progressive unfreezing: only the levels this round opens train (all of them when off)
    model.freeze_for_training(fed.train.trainable_depth(server_round))
    try:
        secure = begin_masking(msg, _context(context)) if fed.aggregation.secure else None
        plan = plan_training(msg, fed, site, model)
    except (RoundRefusedError, BudgetExhaustedError) as exc:
        doing = "refused" if isinstance(exc, RoundRefusedError) else "not training"
        logger.warning("%s round %d: %s: %s", site.name, server_round, doing, exc)
        return refusal_for(msg, site.name, exc)
    stats = run_training(plan, fed, site, model)
    report = plan.report(site)
    save_local_state(site.state_dir, model.local_state_dict())
    logger.info(  # the validation metrics come from the evaluate stage (once per round and split)
        "%s round %d: loss %.4f, %.0f samples/s on %s%s",
        site.name,
        server_round,
        stats.loss,
        stats.samples_per_second,
        device,
        f", epsilon {report.epsilon:.3f}" if report.epsilon is not None else "",
    )
    # the training loss is a statistic of the private batches without DP, and the val
    # metrics would be an evaluation outside the evaluate stage's once-per-round rule: both stay in
    # the site's log above. The weight is the training split's size (DP-SGD's sampling rate,
    # in the privacy record, discloses it anyway); the throughput is not computed from data.
    metrics = MetricRecord({WEIGHT_KEY: stats.num_examples, SAMPLES_PER_SECOND_KEY: stats.samples_per_second})
    shared = {k: v.cpu() for k, v in model.shared_state_dict().items()}
    content = RecordDict(
        {
            METRICS_KEY: metrics,
            SITE_KEY: site_record(site.name),
            PRIVACY_KEY: ConfigRecord(report.to_record()),
        }
    )
    if secure is None:
        content[ARRAYS_KEY] = ArrayRecord(shared)
    else:
        numpy = {k: v.numpy() for k, v in shared.items()}
        content[SECAGG_MASKED_KEY] = masked_arrays(
            msg, _context(context), secure, fed, numpy, stats.num_examples
        )
    return Message(content, reply_to=msg)


def _context(context: Context | None) -> Context:
    if context is None:  # a caller outside the ClientApp (a test) that runs secure aggregation
        raise ValueError("secure aggregation needs the node's Flower context")
    return context


def evaluate_split(msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel) -> Message:
    """The aggregate metrics of the split ``msg`` asks for (label-shift corrected when the run says so)."""
    split = split_of(msg)  # one of the site's eval-splits: the egress guard refused any other
    dataset = load_site_data(site, fed.model)
    data = dataset.split(split)
    device = device_for(site.device)
    shift = fed.shift
    if (shift.correction or shift.tta) and split != SPLIT_VAL and SPLIT_VAL in dataset.splits:
        result = _shift_corrected(msg, fed, site, model, dataset, split, device)
    else:
        result = {k.replace("_", "-"): v for k, v in evaluate(model, data, device).items()}
    metrics = MetricRecord({WEIGHT_KEY: len(data), **result})
    content = RecordDict({METRICS_KEY: metrics, SITE_KEY: site_record(site.name)})
    return Message(content, reply_to=msg)


def _shift_corrected(
    msg: Message,
    fed: FederationConfig,
    site: SiteSettings,
    model: FedshiftModel,
    dataset: Dataset,
    split: str,
    device: torch.device,
) -> dict[str, float]:
    """Calibrated on val, the prior estimated on this split's images (labels hidden)."""
    run_id = str(msg.metadata.run_id)
    shift = fed.shift
    stats = load_global_statistics(site.state_dir, run_id)
    labels = dataset.split("train").labels if "train" in dataset.splits else np.zeros(0)
    counts = None
    if site.privacy.enabled:  # the metrics leave, so the labels count only via DP
        own = own_release(site.state_dir, run_id, 0)
        labels = np.zeros(0)
        counts = np.asarray(own[LABEL_COUNTS_KEY]) if own and LABEL_COUNTS_KEY in own else None
    source, which = source_prior_for(
        stats.train_prior if stats is not None else None,
        labels,
        fed.model.num_classes,
        local_norm=fed.model.local_norm,
        logit_adjust=shift.logit_adjust,
        train_counts=counts,
    )
    logger.info("Label shift: correcting from the %s training prior %s", which, source)
    return evaluate_with_shift(
        model,
        dataset.split(SPLIT_VAL),
        dataset.split(split),
        source,
        shift,
        device,
        seed=zlib.crc32(f"{fed.seed}:label-shift:{site.name}".encode()),
        state_dir=site.state_dir,
        split=split,
        run=run_id,
    )


class _Settings:
    """The settings of the message in flight, parsed once: by the egress guard (:meth:`parse`), then
    handed to the handler (:meth:`__call__`), which gets the same context."""

    def __init__(self, fixed: Mapping[str, Any]) -> None:
        self.fixed = fixed  # take precedence over the run config
        self._pending: tuple[Context, tuple[FederationConfig, SiteSettings]] | None = None

    def parse(self, context: Context) -> tuple[FederationConfig, SiteSettings]:
        self._pending = None
        fed = FederationConfig.from_run_config({**context.run_config, **self.fixed})
        site = SiteSettings.from_node_config(context.node_config, fed)
        parsed = site.federation(fed), site  # the site's own noise for its Fisher, label counts and moments
        self._pending = (context, parsed)
        return parsed

    def __call__(self, context: Context) -> tuple[FederationConfig, SiteSettings]:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is context:
            return pending[1]
        parsed = self.parse(context)  # a context the guard did not see (a mod replaced it)
        self._pending = None
        return parsed


def _prepare(
    msg: Message, settings: tuple[FederationConfig, SiteSettings]
) -> tuple[FederationConfig, SiteSettings, FedshiftModel]:
    fed, site = settings
    model = build_model(fed.model)
    model.load_shared_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    local = load_local_state(site.state_dir)
    if local is not None:
        model.load_local_state_dict(local)
    return fed, site, model


def _policy(fed: FederationConfig, site: SiteSettings) -> EgressPolicy:
    allowed = site.egress_metrics if site.egress_metrics is not None else DEFAULT_METRICS
    return EgressPolicy(
        dp_required=site.privacy.enabled,
        allowed_metrics=allowed,
        eval_splits=site.eval_splits,
        num_rounds=fed.num_rounds,
    )


app = make_client_app()
