"""The one inference path: each prior mode, its fallbacks and the threshold, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm

from fedshift.client.correction import SiteCorrection, fit_site_correction
from fedshift.client.inference import apply_correction
from fedshift.common.errors import ConfigError
from fedshift.common.shift_config import ShiftConfig

MEANS = np.array([-1.0, 1.0])
SOURCE = np.array([0.5, 0.5])
CONFIG = ShiftConfig(correction=True, bootstrap=30, threshold=True)


def _logits(x: np.ndarray) -> np.ndarray:
    """A miscalibrated model trained under SOURCE: 2.5 x the Bayes log-posteriors plus a class bias."""
    bayes = np.stack([norm.logpdf(x, m) for m in MEANS], axis=1) + np.log(SOURCE)
    return 2.5 * bayes + np.array([0.3, -0.3])


def _site(prevalence: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return _logits(MEANS[y] + rng.normal(size=n)), y


def _correction(unlabeled: np.ndarray) -> SiteCorrection:
    val, yv = _site(0.5, 400, seed=1)
    return fit_site_correction(val, yv, unlabeled, SOURCE, CONFIG)


def test_none_is_the_softmax_and_training_the_calibration() -> None:
    logits, _ = _site(0.2, 500, seed=2)
    corr = _correction(logits)
    plain = apply_correction(logits, corr, prior="none")
    np.testing.assert_allclose(plain.raw, softmax(logits, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(plain.corrected, plain.raw)
    assert plain.applied == () and plain.prior is None
    training = apply_correction(logits, corr, prior="training")
    np.testing.assert_allclose(training.calibrated, corr.calibration.apply(logits), rtol=1e-12)
    np.testing.assert_allclose(training.corrected, training.calibrated, rtol=1e-12)
    assert training.applied == ("calibration (bcts)",)


def test_a_given_prior_is_bayes_rule_and_auto_finds_the_site_prior() -> None:
    logits, y = _site(0.2, 2000, seed=3)
    corr = _correction(logits)
    target = np.array([0.7, 0.3])
    given = apply_correction(logits, corr, prior=target)
    cal = corr.calibration.apply(logits)
    expected = cal * (target / SOURCE)
    np.testing.assert_allclose(given.corrected, expected / expected.sum(axis=1, keepdims=True), rtol=1e-12)
    auto = apply_correction(logits, corr, prior="auto", config=CONFIG)
    assert auto.estimate is not None and not auto.estimate.fallback
    assert auto.prior is not None and auto.prior[1] == pytest.approx(y.mean(), abs=0.03)
    summary = auto.summary()
    assert summary["n"] == 2000 and summary["applied"][-1] == "prior (estimated here)"
    low, high = summary["interval"]
    assert low[1] <= auto.prior[1] <= high[1]


def test_too_few_images_fall_back_to_the_stored_estimate_then_to_none() -> None:
    many, _ = _site(0.2, 2000, seed=4)
    corr = _correction(many)  # its estimate, from 2000 images, is the site's stored one
    few, _ = _site(0.2, 10, seed=5)
    stored = apply_correction(few, corr, prior="auto", config=CONFIG, stored=corr.estimate)
    assert stored.estimate is not None and stored.estimate.fallback
    np.testing.assert_array_equal(stored.prior, corr.estimate.prior)  # type: ignore[arg-type]
    assert "only 10 unlabeled samples" in stored.notes[0] and "stored estimate" in stored.notes[0]
    bare = apply_correction(few, corr, prior="auto", config=CONFIG)
    assert bare.prior is None and bare.notes[0].startswith("no prior correction: only 10")
    np.testing.assert_allclose(bare.corrected, bare.calibrated, rtol=1e-12)


def test_thresholds_site_on_calibrated_number_on_corrected() -> None:
    logits, _ = _site(0.3, 300, seed=6)
    corr = _correction(logits)
    assert corr.threshold is not None
    site = apply_correction(logits, corr, prior="auto", config=CONFIG, threshold="site")
    np.testing.assert_array_equal(site.predicted, site.calibrated[:, 1] >= corr.threshold)
    assert (site.threshold, site.threshold_on) == (corr.threshold, "calibrated")
    number = apply_correction(logits, corr, prior="auto", config=CONFIG, threshold=0.3)
    np.testing.assert_array_equal(number.predicted, number.corrected[:, 1] >= 0.3)
    argmax = apply_correction(logits, corr, prior="auto", config=CONFIG)
    np.testing.assert_array_equal(argmax.predicted, argmax.corrected.argmax(axis=1))
    with pytest.raises(ConfigError, match=r"in \(0, 1\), but got 1.5"):
        apply_correction(logits, corr, threshold=1.5)
    with pytest.raises(ConfigError, match="this site has none"):
        apply_correction(logits, None, threshold="site")
    with pytest.raises(ConfigError, match="'sometimes'"):
        apply_correction(logits, corr, prior="sometimes")


def test_without_a_correction_state_the_model_own_probabilities_and_a_note() -> None:
    logits, _ = _site(0.5, 50, seed=7)
    result = apply_correction(logits, None, prior="auto")
    np.testing.assert_array_equal(result.corrected, result.raw)
    assert result.notes == ("no correction state at this site: the model's own probabilities",)
