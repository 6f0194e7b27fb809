"""Continual learning across phases: a consolidated anchor and Fisher, and runs that start from them.

At the end of a phase (``ewc-consolidate``) the server asks every site for its diagonal
Fisher at the final adapters (``query.fisher``), averages them weighted by the sites'
example counts, scales the average to mean 1 and saves it with the anchor beside the
checkpoint. A later phase starts from it (``init-checkpoint``), and with
``ewc-anchor = "consolidated"`` every training message carries anchor and Fisher.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import CheckpointError, ConfigError
from fedshift.common.io import atomic_write_bytes, atomic_write_json
from fedshift.common.protocol import (
    ANCHOR_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    FISHER_KEY,
    FISHER_QUERY,
    FISHER_SOURCE_FIELD,
    METRICS_KEY,
    PRIVACY_KEY,
    SERVER_ROUND_KEY,
    UNDECLARED,
    WEIGHT_KEY,
)
from fedshift.server.ask import ask_sites
from fedshift.server.enrollment import SiteNames
from fedshift.server.validation import MAX_NUM_EXAMPLES, decode, weight_problem

logger = logging.getLogger(__name__)

FISHER_MESSAGE = f"{MessageType.QUERY}.{FISHER_QUERY}"
CONSOLIDATED_FILE = "consolidated.safetensors"
CONSOLIDATED_MANIFEST = "consolidated.json"


def fisher_problem(
    msg: Message, expected: Mapping[str, tuple[int, ...]], max_weight: int = MAX_NUM_EXAMPLES
) -> str | None:
    """Why a site's Fisher reply must not be averaged, or ``None``."""
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if FISHER_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        return f"expected an ArrayRecord {FISHER_KEY!r} and a MetricRecord {METRICS_KEY!r}"
    problem = weight_problem(content.metric_records[METRICS_KEY].get(WEIGHT_KEY), max_weight)
    if problem is not None:
        return problem
    fisher = content.array_records[FISHER_KEY]
    if sorted(fisher) != sorted(expected):
        return "its Fisher does not cover exactly the shared tensors"
    for key, shape in expected.items():
        value, problem = decode(key, fisher[key])  # the data's own shape and dtype, not the declared ones
        if value is None:
            return f"Fisher {problem}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"Fisher {key!r} has dtype {value.dtype}, expected a float dtype"
        if tuple(value.shape) != shape:
            return f"Fisher {key!r} has shape {tuple(value.shape)}, expected {shape}"
        if not (np.isfinite(value).all() and (value >= 0).all()):
            return f"Fisher {key!r} has negative, NaN or infinite values"
    return None


def gather_fishers(
    grid: Grid,
    arrays: ArrayRecord,
    server_round: int,
    timeout: float,
    names: SiteNames | None = None,
    max_weight: int = MAX_NUM_EXAMPLES,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every site's Fisher at ``arrays``, averaged with the sites' example counts as weights."""
    expected = {k: tuple(v.shape) for k, v in arrays.items()}
    config = ConfigRecord({SERVER_ROUND_KEY: server_round})
    replies = ask_sites(
        grid,
        RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
        FISHER_MESSAGE,
        names=names if names is not None else SiteNames(),
        timeout=timeout,
        check=lambda msg: fisher_problem(msg, expected, max_weight),
        left_out="Consolidation: no Fisher from",
    )
    total: dict[str, np.ndarray] = {k: np.zeros(s, dtype=np.float64) for k, s in expected.items()}
    weight_sum = 0.0
    sources: dict[str, str] = {}
    for name, msg in replies:
        weight = float(msg.content.metric_records[METRICS_KEY][WEIGHT_KEY])  # type: ignore[arg-type]
        released = msg.content.array_records[FISHER_KEY]
        for key in total:
            total[key] += weight * released[key].numpy().astype(np.float64)
        weight_sum += weight
        privacy = msg.content.config_records.get(PRIVACY_KEY)
        sources[name] = str(privacy.get(FISHER_SOURCE_FIELD, UNDECLARED)) if privacy else UNDECLARED
    if weight_sum == 0:
        raise CheckpointError(
            "Expected at least one site's Fisher to consolidate, but none arrived; check the sites' logs "
            "(a site whose privacy budget is spent cannot release one)"
        )
    fisher, mean = _mean_one(total, weight_sum)
    info = {"sites": sorted(sources), "sources": sources, "examples": weight_sum, "fisher_mean": mean}
    return fisher, info


def _mean_one(total: Mapping[str, np.ndarray], weight_sum: float) -> tuple[dict[str, np.ndarray], float]:
    """The weighted average ``total / weight_sum``, scaled to mean 1 over all entries, and its mean.

    Post-processing (no privacy cost): ``ewc-lambda`` then reads as the strength of
    an L2 pull on a typical parameter, whatever the loss's scale.
    """
    count = sum(v.size for v in total.values())
    mean = sum(float(v.sum()) for v in total.values()) / (weight_sum * max(count, 1))
    scale = weight_sum * (mean if mean > 0 else 1.0)
    return {k: (v / scale).astype(np.float32) for k, v in total.items()}, mean


def save_consolidated(
    directory: str | Path,
    anchor: Mapping[str, np.ndarray],
    fisher: Mapping[str, np.ndarray],
    info: Mapping[str, Any],
) -> Path:
    """Write anchor and Fisher (one safetensors file, then a manifest with its sha256)."""
    from safetensors.numpy import save

    directory = Path(directory)
    tensors = {f"anchor/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in anchor.items()}
    tensors.update({f"fisher/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in fisher.items()})
    blob = save(tensors)
    atomic_write_bytes(directory / CONSOLIDATED_FILE, blob)
    manifest = {"file": CONSOLIDATED_FILE, "sha256": hashlib.sha256(blob).hexdigest(), **info}
    atomic_write_json(directory / CONSOLIDATED_MANIFEST, manifest)
    return directory / CONSOLIDATED_MANIFEST


def load_consolidated(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Anchor and Fisher saved by :func:`save_consolidated`, verified against the manifest."""
    from safetensors.numpy import load

    directory = Path(directory)
    manifest_path = directory / CONSOLIDATED_MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(
            f"Expected a consolidated anchor ({CONSOLIDATED_MANIFEST}) in {str(directory)!r} for "
            "ewc-anchor='consolidated', but there is none; run the earlier phase with "
            "ewc-consolidate=true, or use ewc-anchor='global'"
        )
    manifest = json.loads(manifest_path.read_text())
    blob = (directory / CONSOLIDATED_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(
            f"Expected {CONSOLIDATED_FILE} in {str(directory)!r} to match its manifest's sha256, but it "
            "does not; the file is corrupt: re-run the consolidation"
        )
    tensors = load(blob)
    anchor = {k.removeprefix("anchor/"): v for k, v in tensors.items() if k.startswith("anchor/")}
    fisher = {k.removeprefix("fisher/"): v for k, v in tensors.items() if k.startswith("fisher/")}
    return anchor, fisher


def initial_arrays(cfg: FederationConfig, shared: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The adapters of ``init-checkpoint``, checked against this run's model."""
    checkpoint = load_checkpoint(cfg.init_checkpoint)
    if checkpoint.model != cfg.model or sorted(checkpoint.arrays) != sorted(shared):
        raise CheckpointError(
            f"Expected the checkpoint in {cfg.init_checkpoint!r} (init-checkpoint) to belong to this run's "
            f"model, but its settings differ ({checkpoint.model} vs {cfg.model}); use the model settings "
            "of the phase that wrote it"
        )
    return ArrayRecord({k: torch.from_numpy(checkpoint.arrays[k].copy()) for k in shared})


def anchor_records(cfg: FederationConfig, shared: Mapping[str, torch.Tensor]) -> dict[str, ArrayRecord]:
    """With ``ewc-anchor = "consolidated"``: the anchor and Fisher every training message carries."""
    if not (cfg.ewc.enabled and cfg.ewc.anchor == "consolidated"):
        return {}
    if not cfg.init_checkpoint:
        raise ConfigError(
            "Expected init-checkpoint to name the earlier phase's checkpoint for ewc-anchor='consolidated', "
            "but it is empty; set it to <earlier run-dir>/checkpoint"
        )
    anchor, fisher = load_consolidated(cfg.init_checkpoint)
    for name, tensors in (("anchor", anchor), ("Fisher", fisher)):
        if sorted(tensors) != sorted(shared):
            raise CheckpointError(
                f"Expected the consolidated {name} in {cfg.init_checkpoint!r} to cover this model's shared "
                "tensors, but its names differ; use the model settings of the phase that wrote it"
            )
    logger.info("EWC towards the consolidated anchor of %s", cfg.init_checkpoint)
    return {
        ANCHOR_KEY: ArrayRecord({k: torch.from_numpy(anchor[k].copy()) for k in shared}),
        FISHER_KEY: ArrayRecord({k: torch.from_numpy(fisher[k].copy()) for k in shared}),
    }


def consolidate(
    grid: Grid, arrays: ArrayRecord, cfg: FederationConfig, directory: Path, names: SiteNames | None = None
) -> dict[str, Any]:
    """The end-of-phase step: gather the sites' Fishers at ``arrays`` and save them with the anchor."""
    fisher, info = gather_fishers(
        grid, arrays, cfg.num_rounds + 1, cfg.reply_timeout, names=names, max_weight=cfg.max_num_examples
    )
    anchor = {k: v.numpy() for k, v in arrays.items()}
    save_consolidated(directory, anchor, fisher, info)
    logger.info("Consolidated anchor and Fisher of %s saved in %s", ", ".join(info["sites"]), directory)
    return info
