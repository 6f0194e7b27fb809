"""The fedshift ClientApp: one hospital's side of a round, in simulation and deployment.

Each message builds the model afresh (Flower creates ClientApps per round); the
frozen backbone is cached per process, the site-local input adapter is kept on
disk in the site's state directory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedshift.client.site import (
    SiteSettings,
    load_local_state,
    load_site_data,
    save_local_state,
)
from fedshift.client.training import evaluate, resolve_device, train_local
from fedshift.common.config import FederationConfig
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY, WEIGHT_KEY

logger = logging.getLogger(__name__)


def _prepare(
    msg: Message, context: Context, fixed: Mapping[str, Any]
) -> tuple[FederationConfig, SiteSettings, FedshiftModel]:
    fed = FederationConfig.from_run_config({**context.run_config, **fixed})
    site = SiteSettings.from_node_config(context.node_config, fed)
    model = build_model(fed.model)
    model.load_shared_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    local = load_local_state(site.state_dir)
    if local is not None:
        model.load_local_state_dict(local)
    return fed, site, model


def _site_record(site: SiteSettings) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``overrides`` take precedence over ``context.run_config``.

    ``mods`` are Flower client mods (``fn(msg, ctxt, call_next)``) wrapped around it.
    """
    fixed = dict(overrides or {})
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fed, site, model = _prepare(msg, context, fixed)
        data = load_site_data(site)
        device = resolve_device(site.device)
        server_round = int(cast(int, msg.content.config_records[CONFIG_KEY].get("server-round", 0)))
        seed = zlib.crc32(f"{fed.seed}:{server_round}:{site.name}".encode())
        stats = train_local(model, data.split("train"), fed.train, device, seed=seed)
        save_local_state(site.state_dir, model.local_state_dict())
        val = evaluate(model, data.split("val"), device)
        logger.info(
            "%s round %d: loss %.4f, val AUC %.3f, %.0f samples/s on %s",
            site.name,
            server_round,
            stats.loss,
            val["auc"],
            stats.samples_per_second,
            device,
        )
        metrics = MetricRecord(
            {
                WEIGHT_KEY: stats.num_examples,
                "train-loss": stats.loss,
                "val-auc": val["auc"],
                "val-accuracy": val["accuracy"],
                "samples-per-second": stats.samples_per_second,
            }
        )
        shared = {k: v.cpu() for k, v in model.shared_state_dict().items()}
        content = RecordDict(
            {ARRAYS_KEY: ArrayRecord(shared), METRICS_KEY: metrics, SITE_KEY: _site_record(site)}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        _fed, site, model = _prepare(msg, context, fixed)
        split = str(msg.content.config_records[CONFIG_KEY].get("split", "val"))
        data = load_site_data(site).split(split)
        result = evaluate(model, data, resolve_device(site.device))
        metrics = MetricRecord({WEIGHT_KEY: len(data), **{k.replace("_", "-"): v for k, v in result.items()}})
        content = RecordDict({METRICS_KEY: metrics, SITE_KEY: _site_record(site)})
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
