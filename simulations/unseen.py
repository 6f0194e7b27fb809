"""Hospitals outside the federation: sites that never train, receive the final model and adapt on their own.

``fedshift simulate --unseen-sites N`` plans N more sites (``unseen-k``: a scanner no trained site
has, a prevalence of their own; :func:`fedshift.simulations.shift.plan_sites`) that take no part in
the rounds. After the federation each one gets what the final-model stage sends to the trained
sites, built by the same function from the server's checkpoint
(:func:`fedshift.server.app.final_model_content`), and joins as a new hospital would
(:func:`fedshift.client.joining.join_site`): its own images without their labels (its train and val
splits) adapt its stem's norm statistics and give its prior estimate, and it writes its bundle. Only
here, to score it, are the labels of its test split read: once as received (no site-side
correction) and once as ``fedshift predict`` on its bundle applies it (``--prior auto``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedshift.client.bundle import load_bundle
from fedshift.client.inference import PRIOR_NONE, infer
from fedshift.client.joining import final_model, join_site
from fedshift.client.predict import predict_bundle
from fedshift.client.site import SITE_DATA_FILE, SiteSettings
from fedshift.client.training import device_for
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.data import save_npz
from fedshift.common.metrics import classification_metrics
from fedshift.common.protocol import SPLIT_TEST
from fedshift.common.shift_statistics import GlobalStatistics
from fedshift.server.app import CHECKPOINT_DIR, final_model_content
from fedshift.simulations.report import render_table
from fedshift.simulations.shift import UNSEEN_PREFIX, SimulatedSite

logger = logging.getLogger(__name__)

AS_RECEIVED, SITE_SIDE = "as_received", "site_side"
TABLE_METRICS = (("auc", "AUC"), ("accuracy", "acc"), ("log_loss", "log loss"))


def split_unseen(sites: Sequence[SimulatedSite]) -> tuple[list[SimulatedSite], list[SimulatedSite]]:
    """(the sites that train, the unseen ones)."""
    unseen = [s for s in sites if s.spec.name.startswith(UNSEEN_PREFIX)]
    return [s for s in sites if s not in unseen], unseen


def _statistics(server: Mapping[str, Any]) -> GlobalStatistics | None:
    summary = server.get("statistics")
    if not summary or summary.get("train_prior") is None:
        return None
    prior = np.asarray(summary["train_prior"], dtype=np.float64)
    return GlobalStatistics(run=str(server.get("run_id", "")), sites=int(summary["sites"]), train_prior=prior)


def _own_images(site: SimulatedSite) -> np.ndarray:
    """The site's images it adapts to, without labels: its train and val splits."""
    return np.concatenate([part.images for s, part in site.data.splits.items() if s != SPLIT_TEST])


def join_unseen(
    fed: FederationConfig, sites: Sequence[SimulatedSite], root: Path, server: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every unseen site joins with the run's final model; its test metrics without and with its own
    corrections."""
    if not sites:
        return {}
    checkpoint = load_checkpoint(root / "server" / CHECKPOINT_DIR)
    arrays = ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in checkpoint.arrays.items()})
    trained = len(server.get("bundles", []))
    content = final_model_content(arrays, fed.num_rounds, trained, _statistics(server))
    device = device_for(fed.device)
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        name = site.spec.name
        site_dir = root / "sites" / name
        site_dir.mkdir(parents=True, exist_ok=True)
        save_npz(site_dir / SITE_DATA_FILE, site.data)
        settings = SiteSettings(name, site_dir / SITE_DATA_FILE, site_dir, fed.device, privacy=fed.privacy)
        joined = join_site(
            content,
            fed,
            settings,
            _own_images(site),
            device,
            run_id=str(server.get("run_id", "")),
            class_names=site.data.class_names,
        )
        test = site.data.split(SPLIT_TEST)
        received = infer(final_model(content, fed), test.images, device, None, prior=PRIOR_NONE)
        corrected = predict_bundle(load_bundle(joined.path), test.images, device)
        out[name] = {
            "profile": site.spec.profile.describe(),
            "prevalence": float(np.mean(test.labels == 1)) if len(test) else None,
            "unlabelled_images": joined.images,
            AS_RECEIVED: classification_metrics(test.labels, received.corrected),
            SITE_SIDE: classification_metrics(test.labels, corrected.corrected),
            "applied": list(corrected.applied),
            "notes": list(corrected.notes),
            "estimate": corrected.summary()["estimate"],
        }
        logger.info("%s: %s", name, out[name])
    return out


def unseen_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Each unseen site's test metrics as received and with its own corrections (stem statistics, prior)."""
    header = [
        "site",
        "scanner",
        "prev",
        *(f"{label} {tag}" for _, label in TABLE_METRICS for tag in ("recv", "site")),
    ]
    rows = [header]
    for name, r in results.items():
        cells = [name, str(r["profile"]), f"{r['prevalence']:.2f}"]
        for key, _ in TABLE_METRICS:
            cells += [f"{r[AS_RECEIVED][key]:.3f}", f"{r[SITE_SIDE][key]:.3f}"]
        rows.append(cells)
    applied = sorted({a for r in results.values() for a in r["applied"]})
    title = (
        "Hospitals outside the federation (never trained; recv = the final model as received, site = its "
        "bundle: its stem's norm statistics adapted to its own unlabelled images, "
        f"{', '.join(applied) or 'no prior'})"
    )
    return render_table(title, rows, mean_row=False)
