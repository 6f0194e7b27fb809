"""Apply a site's model and corrections to images: the one path of the federation's evaluation, predict and
evaluate.

Given a model, the site's correction state (:class:`fedshift.client.correction.SiteCorrection`: its
calibration, the training prior it corrects from, its stored prior estimate and threshold; or none) and
images, :func:`infer` returns the raw, calibrated and prior-corrected class probabilities, the predicted
class and the threshold used, with a summary of what was applied and why. The prior (``prior``):

- ``auto``: estimated on the images themselves (the site's estimator, EM-MAP by default, with a bootstrap
  interval); a rejected estimate falls back to the stored one, else to no correction, and says why;
- ``training``: calibrated posteriors under the training prior (no prior change);
- ``none``: the model's own probabilities (no calibration, no prior);
- a :class:`PriorEstimate` or an array: that prior.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from fedshift.client.norm_adaptation import Reference
from fedshift.client.training import batched_outputs
from fedshift.common.errors import ConfigError
from fedshift.common.label_shift import correct_posteriors
from fedshift.common.model import FedshiftModel
from fedshift.common.prior_estimation import PriorEstimate, estimate_prior
from fedshift.common.shift_config import ShiftConfig

if TYPE_CHECKING:
    from fedshift.client.correction import SiteCorrection

logger = logging.getLogger(__name__)

PRIOR_AUTO, PRIOR_TRAINING, PRIOR_NONE = "auto", "training", "none"
PRIOR_MODES = (PRIOR_AUTO, PRIOR_TRAINING, PRIOR_NONE)
THRESHOLD_SITE = "site"
# Norm layers adapted without a reference (the training distribution's moments), in forward order: the
# stem's only. It normalises the image's first convolution, so it absorbs a scanner's global intensity
# and contrast (what a trained site's own input adapter learns); deeper layers' frozen statistics are
# what the federation trained under, and re-estimating them moves the features off the head. On
# PneumoniaMNIST sites that never trained (9 scanners x 2 prevalences), the stem alone took the mean
# log loss from 0.567 to 0.394 and AUC from 0.925 to 0.938; all 49 layers took AUC to 0.604.
STEM_LAYERS = 1
EM_MAX_ITER = 10_000  # EM iterations before an estimate counts as not converged (each is O(N))

Prior: TypeAlias = str | PriorEstimate | np.ndarray  # a mode, an estimate made on the images, or a prior
Threshold: TypeAlias = str | float | None  # "site", a number, or None (argmax)


@dataclass(frozen=True, eq=False)
class Inference:
    """A site's predictions on a set of images, and what produced them."""

    logits: np.ndarray  # (N, C) float64, the model's outputs
    raw: np.ndarray  # (N, C) the model's softmax
    calibrated: np.ndarray  # (N, C) after the site's calibration (== raw without one)
    corrected: np.ndarray  # (N, C) calibrated, then adjusted to ``prior`` (== calibrated without one)
    predicted: np.ndarray  # (N,) int64 class indices
    threshold: float | None  # the p(y=1|x) threshold used; None: argmax (multi-class)
    threshold_on: str  # which probabilities the threshold applies to: "calibrated" or "corrected"
    prior: np.ndarray | None  # the prior the corrected probabilities are under; None: not corrected
    estimate: PriorEstimate | None  # the estimate made on these images (auto), even when rejected
    applied: tuple[str, ...]  # the corrections applied, in order
    notes: tuple[str, ...] = field(default=())  # why a correction was not applied

    @property
    def n(self) -> int:
        return len(self.raw)

    def summary(self) -> dict[str, Any]:
        """n, the estimated prevalence with its interval, and which corrections were applied (and why not)."""
        est = self.estimate
        interval = None
        if est is not None and est.interval is not None:
            interval = [est.interval[0].tolist(), est.interval[1].tolist()]
        return {
            "n": self.n,
            "prior": self.prior.tolist() if self.prior is not None else None,
            "estimate": est.estimate.tolist() if est is not None and est.estimate is not None else None,
            "interval": interval,
            "threshold": self.threshold,
            "applied": list(self.applied),
            "notes": list(self.notes),
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def predict_logits(
    model: FedshiftModel, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """The model's logits, ``(N, C)`` float64, in eval mode."""
    return batched_outputs(model, images, device, model, model.config.num_classes, batch_size)


def estimate_target_prior(
    calibrated: np.ndarray,
    source_prior: np.ndarray,
    config: ShiftConfig,
    *,
    seed: int = 0,
    val_probs: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
) -> PriorEstimate:
    """The site's estimator on calibrated probabilities (labels never used); BBSE needs the val split,
    without it EM-MAP."""
    method = config.prior_method
    if method != "em" and val_probs is None:
        logger.info("Label shift: %s needs the validation split; estimating with EM-MAP", method)
        method = "em"
    return estimate_prior(
        calibrated,
        source_prior,
        method,
        val_probs=val_probs,
        val_labels=val_labels,
        bootstrap=config.bootstrap,
        seed=seed,
        min_samples=config.min_samples,
        max_interval_width=config.max_interval_width,
        max_iter=EM_MAX_ITER,
        pseudocount=config.prior_pseudocount,
    )


def _resolve_prior(
    calibrated: np.ndarray,
    correction: SiteCorrection,
    prior: Prior,
    config: ShiftConfig,
    seed: int,
    stored: PriorEstimate | None,
) -> tuple[np.ndarray | None, PriorEstimate | None, list[str], list[str]]:
    """(prior applied or None, the estimate made here, applied, notes)."""
    source = correction.source_prior
    if isinstance(prior, PriorEstimate):  # the estimate a caller made on these images
        if prior.fallback:
            return None, prior, [], [f"no prior correction: {prior.reason}"]
        return prior.prior, prior, ["prior (estimated here)"], []
    if isinstance(prior, np.ndarray):
        return np.asarray(prior, dtype=np.float64), None, ["prior (given)"], []
    if prior == PRIOR_TRAINING:
        return None, None, [], []
    est = estimate_target_prior(calibrated, source, config, seed=seed)
    if not est.fallback:
        return est.prior, est, ["prior (estimated here)"], []
    if stored is not None and not stored.fallback:
        note = f"prior not estimated here ({est.reason}): the site's stored estimate instead"
        return stored.prior, est, ["prior (site's stored estimate)"], [note]
    return None, est, [], [f"no prior correction: {est.reason}"]


def apply_correction(
    logits: np.ndarray,
    correction: SiteCorrection | None,
    *,
    prior: Prior = PRIOR_AUTO,
    config: ShiftConfig | None = None,
    threshold: Threshold = None,
    seed: int = 0,
    stored: PriorEstimate | None = None,
) -> Inference:
    """Calibrate ``logits`` with the site's map, adjust them to ``prior``, and decide (see the module).

    ``stored`` is the site's last estimate, the fallback of ``auto``; ``threshold`` is ``"site"`` (the
    site's val-chosen threshold on the calibrated ``p(y=1|x)``), a number (on the corrected one) or
    ``None`` (argmax)."""
    if isinstance(prior, str) and prior not in PRIOR_MODES:
        raise ConfigError(f"Expected a prior among {list(PRIOR_MODES)} or a file, but got {prior!r}")
    raw = softmax(logits)
    applied: list[str] = []
    notes: list[str] = []
    calibrated, corrected, target, est = raw, raw, None, None
    if correction is None:
        if not (isinstance(prior, str) and prior == PRIOR_NONE):
            notes.append("no correction state at this site: the model's own probabilities")
    elif not (isinstance(prior, str) and prior == PRIOR_NONE):
        calibrated = correction.calibration.apply(logits)
        applied.append(f"calibration ({correction.calibration.kind})")
        target, est, more, why = _resolve_prior(
            calibrated, correction, prior, config or ShiftConfig(), seed, stored
        )
        applied += more
        notes += why
        source = correction.source_prior  # to itself (no change) when there is no target prior
        corrected = correct_posteriors(calibrated, source, source if target is None else target)
    thr, on, predicted = _decide(calibrated, corrected, correction, threshold)
    if threshold is not None and thr is not None:
        applied.append(f"threshold {thr:.4g} on the {on} p(y=1|x)")
    return Inference(
        logits, raw, calibrated, corrected, predicted, thr, on, target, est, tuple(applied), tuple(notes)
    )


def _decide(
    calibrated: np.ndarray, corrected: np.ndarray, correction: SiteCorrection | None, threshold: Threshold
) -> tuple[float | None, str, np.ndarray]:
    binary = corrected.shape[1] == 2
    if threshold is None or not binary:
        return (0.5 if binary else None), "corrected", corrected.argmax(axis=1).astype(np.int64)
    if isinstance(threshold, str):
        if threshold != THRESHOLD_SITE:
            raise ConfigError(f"Expected a threshold of 'site' or a number in (0, 1), but got {threshold!r}")
        if correction is None or correction.threshold is None:
            raise ConfigError(
                "Expected the site's threshold, but this site has none (it was off or its val split lacked "
                "a class); pass --threshold NUMBER or leave it out"
            )
        t = float(correction.threshold)
        return t, "calibrated", (calibrated[:, 1] >= t).astype(np.int64)
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise ConfigError(f"Expected a threshold in (0, 1), but got {threshold!r}; pass e.g. 0.5")
    return t, "corrected", (corrected[:, 1] >= t).astype(np.int64)


@contextmanager
def adapted_for_inference(
    model: FedshiftModel, images: np.ndarray, device: torch.device, tta: bool, reference: Reference
) -> Iterator[None]:
    """Inside: with ``tta``, the norm statistics :func:`infer` predicts under (relative to ``reference``, else
    the stem's only); without, the model as it is."""
    from fedshift.client.norm_adaptation import adapted_norm_statistics

    first = None if reference is not None else STEM_LAYERS
    ctx = (
        adapted_norm_statistics(model, images, device, reference=reference, first=first)
        if tta
        else nullcontext()
    )
    with ctx:
        yield


def infer(
    model: FedshiftModel,
    images: np.ndarray,
    device: torch.device,
    correction: SiteCorrection | None,
    *,
    tta: bool = False,
    reference: Reference = None,
    **options: Any,
) -> Inference:
    """:func:`apply_correction` on the model's logits for ``images``; with ``tta`` the norm statistics are
    adapted to ``images`` first (relative to ``reference``, the site's own images or their norm moments, if
    given; else the stem's only, :data:`STEM_LAYERS`), then restored.
    """
    with adapted_for_inference(model, images, device, tta and len(images) > 0, reference):
        logits = predict_logits(model, images, device)
    result = apply_correction(logits, correction, **options)
    if tta and len(images):
        return Inference(**{**result.__dict__, "applied": ("test-time norm adaptation", *result.applied)})
    return result
