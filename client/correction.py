"""Label-shift correction at a site: its prior from unlabeled data, corrected posteriors, a threshold.

The shared model was trained on the federation's mixture, whose label prior
``p_s`` the site gets from the statistics stage (a sum of every site's DP label
counts, :func:`private_label_counts`). At evaluation the site

1. scores its labelled validation split and the unlabeled images (in simulation:
   the evaluated split with its labels hidden; in deployment: deployment data);
2. calibrates on the validation split with each sample weighted by
   ``p_s(y) / p_val(y)`` (:func:`fedshift.common.calibration.prior_weights`), so
   the calibrated probabilities are posteriors under ``p_s`` and the calibration
   does not absorb the site's own prior, which is what step 3 estimates;
3. estimates its prior ``p_t`` from the unlabeled calibrated probabilities (EM or
   BBSE, with a bootstrap interval); a poor estimate (too few images, an
   interval too wide, a class all but absent, no convergence) falls back to
   ``p_s``, i.e. no correction, and says why;
4. corrects: ``p_t(y|x) ∝ p_s(y|x) p_t(y) / p_s(y)``.

With a logit-adjusted training loss (``ls-logit-adjust = tau``) the model's plain
outputs are posteriors under ``p_s ** (1 - tau)`` (normalised), which is then the
source prior (:func:`effective_source_prior`).

Nothing computed here leaves the site except aggregate evaluation metrics that
the site's egress policy allows; the estimate itself is written to
``<state-dir>/label-shift.json`` for the site's own engineers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedshift.client.dp import RandomSource
from fedshift.client.inference import (
    PRIOR_NONE,
    THRESHOLD_SITE,
    apply_correction,
    estimate_target_prior,
    infer,
    predict_logits,
)
from fedshift.common.calibration import Calibration, fit_calibration, prior_weights
from fedshift.common.data import ImageSet
from fedshift.common.errors import DataError, PrivacyError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.label_shift import correct_posteriors
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import FedshiftModel
from fedshift.common.prior_estimation import PriorEstimate
from fedshift.common.privacy import Mechanism
from fedshift.common.protocol import (
    ADAPTED,
    ADAPTED_CORRECTED,
    CALIBRATED,
    CORRECTED,
    COUNT_KEY,
    ORACLE,
    SHIFT_FALLBACK_KEY,
    THRESHOLD_ACCURACY_KEY,
    THRESHOLD_BALANCED_ACCURACY_KEY,
)
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.thresholds import best_threshold

logger = logging.getLogger(__name__)

CORRECTION_FILE = "label-shift.json"  # in the site's state directory; never sent
RUN_FIELD = "run"  # in CORRECTION_FILE: the run the correction was fitted in
ESTIMATOR_KEY = "estimator"  # in CORRECTION_FILE: the estimator's settings and seed
CALIBRATION_SHRINKAGE = (
    2.0  # prior worth ~2 samples pulling the calibration to the identity (small val splits)
)
ORACLE_FLOOR = 1e-3  # the oracle's true prior is floored at this (a split without a class has prior 0)


# ----------------------------------------------------------------------------- the DP label counts


@dataclass(frozen=True, eq=False)
class CountRelease:
    """A site's label counts released by the Gaussian mechanism, and what the ledger charges for it."""

    counts: np.ndarray  # (C,) noisy counts (may be negative or fractional: post-process, don't round)
    noise_multiplier: float  # sigma: noise std / L2 sensitivity (= 1)

    @property
    def mechanism(self) -> Mechanism:
        """``(sigma, q = 1, 1 step)``: one Gaussian mechanism on the whole training split."""
        return count_mechanism(self.noise_multiplier)


def count_mechanism(noise_multiplier: float) -> Mechanism:
    """What one label-count release costs in the ledger's form (a Gaussian mechanism, q = 1, one step)."""
    return (float(noise_multiplier), 1.0, 1)


def private_label_counts(
    labels: np.ndarray, num_classes: int, noise_multiplier: float, source: RandomSource
) -> CountRelease:
    """Per-class counts of ``labels`` plus ``N(0, noise_multiplier ** 2)`` noise on every class.

    Sensitivity: adding or removing one patient changes exactly one count by 1, so
    the count vector's L2 sensitivity is 1 (add/remove adjacency, the one Opacus's
    accountants assume) and noise of std ``noise_multiplier`` makes this a Gaussian
    mechanism with that noise multiplier, accounted like one DP-SGD step with
    sampling rate 1. Charge :attr:`CountRelease.mechanism` before calling this.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyError(
            f"Expected a label-count noise multiplier > 0, but got {noise_multiplier!r}; label counts "
            "leave a site only with noise (set ls-count-noise-multiplier, e.g. 2.0)"
        )
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"Expected labels in [0, {num_classes}), but got {y.min()}..{y.max()}")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    noise = source.normal(float(noise_multiplier), torch.zeros(num_classes, dtype=torch.float64))
    return CountRelease(counts + noise.cpu().numpy().astype(np.float64), float(noise_multiplier))


# ----------------------------------------------------------------------------- the site's correction


def effective_source_prior(train_prior: np.ndarray, logit_adjust: float) -> np.ndarray:
    """The prior under which the model's outputs are posteriors: ``p_s ** (1 - tau)``, normalised.

    A model trained on ``logits + tau * log p_s`` predicts with ``logits``, i.e. as
    if its training prior were divided by ``p_s ** tau``: ``tau = 1`` gives the
    uniform prior (a balanced classifier), ``tau = 0`` leaves ``p_s``.
    """
    p = np.asarray(train_prior, dtype=np.float64) ** (1.0 - float(logit_adjust))
    return np.asarray(p / p.sum())


def source_prior_for(
    global_prior: np.ndarray | None,
    train_labels: np.ndarray,
    num_classes: int,
    *,
    local_norm: bool,
    logit_adjust: float = 0.0,
    train_counts: np.ndarray | None = None,
) -> tuple[np.ndarray | None, str]:
    """The prior the site's model outputs are posteriors under, and which one it is (``global``/``site``).

    The shared model was trained on the federation's mixture: its outputs are
    posteriors under the global prior ``p_s`` (from the DP label counts). With
    site-local norm affines (FedBN-style, ``local-norm``) part of the model was
    fitted to this site's own training split only, and its outputs follow the
    site's own label mix instead; the site knows that prior exactly, and it never
    leaves. Measured on the shift study's aligned runs (10 site-runs), correcting
    from the site's own prior gave mean log loss 0.153 against 0.182 from the
    global one (0.171 uncorrected). Laplace-smoothed, so no class has prior 0. A
    logit-adjusted loss (``logit_adjust > 0``) trains towards the global prior, so
    that one stays the reference then.

    ``train_counts`` replace the counts of ``train_labels``: a site under DP passes
    its own DP release of them (negative noisy counts clipped at 0), since the
    corrected metrics leave the site and the exact counts must not shape them.
    """
    if train_counts is not None:
        counts = np.clip(np.asarray(train_counts, dtype=np.float64).ravel(), 0.0, None)
    else:
        y = np.asarray(train_labels, dtype=np.int64).ravel()
        counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if local_norm and counts.sum() > 0 and logit_adjust == 0:
        return (counts + 1.0) / (counts.sum() + num_classes), "site"
    if global_prior is None:
        return None, "global"
    return np.asarray(global_prior, dtype=np.float64), "global"


@dataclass(frozen=True, eq=False)
class SiteCorrection:
    """What a site fitted: its calibration, its prior estimate and (optionally) its threshold."""

    calibration: Calibration  # fitted on the val split, reweighted to the source prior
    calibration_note: str  # why the calibration is the identity, "" otherwise
    estimate: PriorEstimate  # the site's prior (or the source prior on fallback), with its interval
    threshold: float | None  # decision threshold on the calibrated p(y=1|x), chosen on val; None if off

    @property
    def source_prior(self) -> np.ndarray:
        return self.estimate.source_prior

    def to_json(self) -> dict[str, Any]:
        est = self.estimate
        return _jsonable(
            {
                "source_prior": est.source_prior,
                "prior": est.prior,
                "estimate": est.estimate,
                "interval": list(est.interval) if est.interval is not None else None,
                "method": est.method,
                "n_unlabeled": est.n,
                "fallback": est.fallback,
                "reason": est.reason,
                "calibration": {
                    "kind": self.calibration.kind,
                    "weights": self.calibration.weights,
                    "bias": self.calibration.bias,
                    "note": self.calibration_note,
                },
                "threshold": self.threshold,
            }
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return as_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return as_jsonable(obj)


def fit_calibration_under(
    val_logits: np.ndarray, val_labels: np.ndarray, source_prior: np.ndarray, kind: str
) -> tuple[Calibration, str]:
    """Calibration on the val split reweighted to ``source_prior``; the identity (and why) if it cannot."""
    c = val_logits.shape[1]
    if kind == "none":
        return Calibration.identity(c), "calibration off (ls-calibration = none)"
    counts = np.bincount(np.asarray(val_labels, dtype=np.int64), minlength=c)
    if counts.min() < 1:
        note = f"validation split lacks class(es) {np.flatnonzero(counts < 1).tolist()}: not calibrated"
        logger.warning("Label shift: %s", note)
        return Calibration.identity(c), note
    weights = prior_weights(val_labels, source_prior, c)
    return fit_calibration(
        val_logits, val_labels, kind, sample_weight=weights, shrinkage=CALIBRATION_SHRINKAGE
    ), ""


def fit_site_correction(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    unlabeled_logits: np.ndarray,
    train_prior: np.ndarray,
    config: ShiftConfig,
    *,
    seed: int = 0,
) -> SiteCorrection:
    """Calibrate, estimate the site's prior from ``unlabeled_logits`` (labels never used) and a threshold."""
    source = effective_source_prior(train_prior, config.logit_adjust)
    cal, note = fit_calibration_under(val_logits, val_labels, source, config.calibration)
    c = val_logits.shape[1]
    unlabeled = cal.apply(unlabeled_logits) if len(unlabeled_logits) else np.zeros((0, c))
    val_probs = cal.apply(val_logits)
    estimate = estimate_target_prior(
        unlabeled, source, config, seed=seed, val_probs=val_probs, val_labels=val_labels
    )
    threshold = None
    if config.threshold and c == 2:
        if len(np.unique(val_labels)) == 2:
            threshold = best_threshold(val_probs[:, 1], val_labels, "balanced_accuracy")
        else:
            logger.warning("Label shift: no threshold (the validation split lacks a class)")
    return SiteCorrection(cal, note, estimate, threshold)


def _kebab(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k.replace('_', '-')}": float(v) for k, v in metrics.items() if k != "n"}


def correction_metrics(
    correction: SiteCorrection, logits: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Metrics of the calibrated (``cal-``), prior-corrected (``ls-``) and oracle (``oracle-``) predictions.

    The oracle corrects with the evaluated split's *true* prior (floored at
    ``ORACLE_FLOOR``): the best that prior correction could do; it needs the labels
    and exists for evaluation only. ``thr-`` metrics use the site's threshold on
    the calibrated probabilities; ``ls-fallback`` is 1 when the estimate was rejected.
    """
    y = np.asarray(labels, dtype=np.int64)
    c = logits.shape[1]
    threshold = THRESHOLD_SITE if correction.threshold is not None else None
    result = apply_correction(logits, correction, prior=correction.estimate, threshold=threshold)
    calibrated, corrected = result.calibrated, result.corrected
    true = np.maximum(np.bincount(y, minlength=c) / max(len(y), 1), ORACLE_FLOOR)
    oracle = correct_posteriors(calibrated, correction.source_prior, true / true.sum())
    out = {
        **_kebab(classification_metrics(y, calibrated), f"{CALIBRATED}-"),
        **_kebab(classification_metrics(y, corrected), f"{CORRECTED}-"),
        **_kebab(classification_metrics(y, oracle), f"{ORACLE}-"),
        SHIFT_FALLBACK_KEY: float(correction.estimate.fallback),
    }
    if correction.threshold is not None:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        pred = result.predicted
        out[THRESHOLD_ACCURACY_KEY] = float(accuracy_score(y, pred))
        out[THRESHOLD_BALANCED_ACCURACY_KEY] = float(balanced_accuracy_score(y, pred))
    return out


def save_correction(
    state_dir: Path,
    correction: SiteCorrection,
    split: str,
    config: ShiftConfig | None = None,
    seed: int = 0,
    run: str = "",
) -> None:
    """The site's estimate, interval, fallback reason and calibration, for its own engineers (never sent);
    with ``config``, also the estimator's settings and seed (``estimator``), so that a later estimate on the
    same images (``fedshift predict --prior auto``) is the same one; ``run``: the run it was fitted in."""
    data = correction_json(correction, split, config, seed, run)
    atomic_write_json(Path(state_dir) / CORRECTION_FILE, data)


def correction_json(
    correction: SiteCorrection, split: str, config: ShiftConfig | None = None, seed: int = 0, run: str = ""
) -> dict[str, Any]:
    """What :func:`save_correction` writes (``label-shift.json``)."""
    data: dict[str, Any] = {RUN_FIELD: run, "split": split, **correction.to_json()}
    if config is not None:
        data[ESTIMATOR_KEY] = {"config": config.to_run_config(), "seed": int(seed)}
    return data


def saved_estimator(data: dict[str, Any]) -> tuple[ShiftConfig, int] | None:
    """The estimator's settings and seed that :func:`save_correction` stored in ``data``, if any."""
    entry = data.get(ESTIMATOR_KEY)
    if not isinstance(entry, dict):
        return None
    return ShiftConfig().with_values(entry["config"]), int(entry["seed"])


# ----------------------------------------------------------------------------- at evaluation


def evaluate_with_shift(
    model: FedshiftModel,
    val: ImageSet,
    data: ImageSet,
    train_prior: np.ndarray | None,
    config: ShiftConfig,
    device: torch.device,
    *,
    seed: int = 0,
    state_dir: Path | None = None,
    split: str = "test",
    run: str = "",
) -> dict[str, float]:
    """Plain metrics of ``data`` plus, as configured, the corrected (``cal-``/``ls-``/``oracle-``/``thr-``)
    and test-time-adapted (``tta-``, ``tta-ls-``) ones, kebab-case.

    Without a training prior (the site missed the statistics stage) there is no
    correction, and the log says so. The unlabeled images the prior is estimated
    on are ``data``'s, with the labels hidden from the estimate.
    """
    from fedshift.client.norm_adaptation import adapted_norm_statistics

    plain = infer(model, data.images, device, None, prior=PRIOR_NONE)
    logits = plain.logits
    out = _kebab(classification_metrics(data.labels, plain.raw))
    out[COUNT_KEY] = float(len(data))
    correction: SiteCorrection | None = None
    if config.correction and train_prior is None:
        logger.warning("Label shift: no global training prior for this run: evaluating without correction")
    elif config.correction and train_prior is not None and len(data):
        val_logits = predict_logits(model, val.images, device)
        correction = fit_site_correction(val_logits, val.labels, logits, train_prior, config, seed=seed)
        if correction.estimate.fallback:
            logger.warning("Label shift: no correction at this site: %s", correction.estimate.reason)
        out.update(correction_metrics(correction, logits, data.labels))
        if state_dir is not None:
            save_correction(state_dir, correction, split, config, seed, run)
    if config.tta and len(data):
        # relative to the site's val images (its training distribution); plain AdaBN without them
        reference = val.images if len(val) else None
        with adapted_norm_statistics(model, data.images, device, reference=reference):
            tta_logits = predict_logits(model, data.images, device)
            tta_val = predict_logits(model, val.images, device) if correction is not None else None
        adapted_plain = apply_correction(tta_logits, None, prior=PRIOR_NONE)
        out.update(_kebab(classification_metrics(data.labels, adapted_plain.raw), f"{ADAPTED}-"))
        if correction is not None and tta_val is not None and train_prior is not None:
            adapted = fit_site_correction(tta_val, val.labels, tta_logits, train_prior, config, seed=seed)
            corrected = apply_correction(tta_logits, adapted, prior=adapted.estimate).corrected
            out.update(_kebab(classification_metrics(data.labels, corrected), f"{ADAPTED_CORRECTED}-"))
    return out
