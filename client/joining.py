"""A hospital that joins after the federation: the final model, adapted to its own unlabelled images.

:func:`join_site` takes what the final-model stage sends (the final global adapters, and the
federation's training prior when the run released one) and the site's own images, whose labels
it never reads. It adapts the stem's norm statistics to those images (AdaBN on the layers
:data:`fedshift.client.inference.STEM_LAYERS` names, and why), estimates the site's prior on them
with the run's estimator (from the federation's training prior), and writes the site's bundle
like a trained site's, the adapted statistics in it. Such a site has no labels, so it has no
calibration map and no threshold; it has never trained, so it spent no privacy. Nothing leaves
the site.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from fedshift.client.bundle import bundle_files, site_card, write_bundle
from fedshift.client.correction import SiteCorrection, correction_json, save_correction
from fedshift.client.inference import STEM_LAYERS, estimate_target_prior, predict_logits, softmax
from fedshift.client.norm_adaptation import adapted_norm_statistics
from fedshift.client.site import SiteSettings
from fedshift.common.calibration import Calibration
from fedshift.common.config import FederationConfig
from fedshift.common.errors import DataError
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, NUM_SITES_KEY
from fedshift.common.shift_statistics import GLOBAL_KEY, GlobalStatistics

logger = logging.getLogger(__name__)

JOINED_SPLIT = "unlabelled"  # the label-shift state's split: the site's own unlabelled images
NO_LABELS = "no labels at this site: not calibrated"


@dataclass(frozen=True)
class Joined:
    """What a joining site built: its bundle, and what adapted it."""

    path: Path  # the bundle
    images: int  # unlabelled images it adapted to
    layers: int  # norm layers whose statistics were adapted
    correction: SiteCorrection | None  # its prior estimate; None when the run released no training prior


def final_model(content: RecordDict, fed: FederationConfig) -> FedshiftModel:
    """The model the final-model stage's ``content`` carries, with the site-local tensors as built."""
    model = build_model(fed.model)
    model.load_shared_state_dict(content.array_records[ARRAYS_KEY].to_torch_state_dict())
    return model


def training_prior(content: RecordDict) -> np.ndarray | None:
    """The federation's training prior (a post-processing of the sites' DP label counts), if sent."""
    record = content.config_records.get(GLOBAL_KEY)
    return GlobalStatistics.from_record(record).train_prior if record is not None else None


def _estimate(
    logits: np.ndarray, prior: np.ndarray | None, fed: FederationConfig, seed: int
) -> SiteCorrection | None:
    if prior is None:
        logger.info("Joining site: the run released no training prior, so no prior estimate")
        return None
    estimate = estimate_target_prior(softmax(logits), prior, fed.shift, seed=seed)
    return SiteCorrection(Calibration.identity(logits.shape[1]), NO_LABELS, estimate, None)


def join_site(
    content: RecordDict,
    fed: FederationConfig,
    site: SiteSettings,
    images: np.ndarray,
    device: torch.device,
    *,
    run_id: str,
    class_names: tuple[str, ...] | None = None,
) -> Joined:
    """Adapt the final model to ``images`` and write the site's bundle into its state directory."""
    if not len(images):
        raise DataError(
            f"Expected unlabelled images at joining site {site.name}, but got none; give it its own images"
        )
    model = final_model(content, fed)
    with adapted_norm_statistics(model, images, device, first=STEM_LAYERS) as layers:
        adapted = model.norm_statistics()
        logits = predict_logits(model, images, device)
    model.load_norm_statistics(adapted)
    correction = _estimate(logits, training_prior(content), fed, fed.seed)
    label_shift = {"status": "on" if correction else "off", "split": JOINED_SPLIT if correction else None}
    config = content.config_records.get(CONFIG_KEY)
    num_sites = int(config.get(NUM_SITES_KEY, 0)) if config is not None else 0  # type: ignore[arg-type]
    card = site_card(fed, site, run_id, num_sites, label_shift, class_names)
    card["joined"] = {"unlabelled_images": len(images), "norm_layers_adapted": int(layers)}
    saved = None
    if correction is not None:
        save_correction(site.state_dir, correction, JOINED_SPLIT, fed.shift, fed.seed, run_id)
        saved = correction_json(correction, JOINED_SPLIT, fed.shift, fed.seed, run_id)
    path = write_bundle(site.state_dir, bundle_files(model, card, saved, adapted))
    logger.info(
        "%s joined: bundle at %s (%d images, %d norm layers adapted)", site.name, path, len(images), layers
    )
    return Joined(path, len(images), int(layers), correction)
