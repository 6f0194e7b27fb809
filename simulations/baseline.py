"""Local-only baseline: every site trains alone, with the same model, budget and loop."""

from __future__ import annotations

import logging
from dataclasses import replace

from fedshift.client.training import device_for, evaluate, train_local
from fedshift.common.config import FederationConfig
from fedshift.common.data import Dataset
from fedshift.common.model import build_model

logger = logging.getLogger(__name__)


def local_only(cfg: FederationConfig, site: str, data: Dataset) -> dict[str, dict[str, float]]:
    """Train a fresh model on the site's train split for rounds x local epochs.

    Returns metrics per split: ``{"test": ..., "val": ...}`` (val when the site has one).
    """
    model = build_model(cfg.model)
    train_cfg = replace(cfg.train, local_epochs=cfg.train.local_epochs * cfg.num_rounds)
    device = device_for(cfg.device)
    stats = train_local(model, data.split("train"), train_cfg, device, seed=cfg.seed)
    result = {
        split: evaluate(model, data.split(split), device) for split in ("test", "val") if split in data.splits
    }
    logger.info(
        "Local-only %s: test AUC %.3f after %d epochs (%.0f samples/s)",
        site,
        result["test"]["auc"],
        train_cfg.local_epochs,
        stats.samples_per_second,
    )
    return result
