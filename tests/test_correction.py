"""Site-side label-shift correction: DP label counts, weighted calibration, the site's estimate, fallback.

References: the analytic Gaussian mechanism (Balle & Wang 2018) and the basic RDP
bound for the accounting; scikit-learn's weighted logistic regression for the
weighted calibration; Bayes posteriors of class-conditional Gaussians for the
end-to-end estimate; pooled-data statistics for the server's aggregation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import softmax
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from fedshift.client.correction import (
    correction_metrics,
    count_mechanism,
    effective_source_prior,
    fit_calibration_under,
    fit_site_correction,
    private_label_counts,
)
from fedshift.client.dp import SeededSource
from fedshift.common.calibration import fit_bcts, prior_weights
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError, DataError, PrivacyError
from fedshift.common.privacy import epsilon
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.shift_statistics import (
    aggregate_class_means,
    aggregate_moments,
    aggregate_prior,
    aggregate_within_variance,
)

# ----------------------------------------------------------------------------- DP label counts


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018): the exact epsilon of the Gaussian mechanism, sensitivity 1, noise std sigma."""

    def delta_of(eps: float) -> float:
        return float(
            norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
        )

    return float(brentq(lambda e: delta_of(e) - delta, 0.0, 100.0))


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_label_count_release_is_accounted_between_exact_and_basic_rdp(sigma: float) -> None:
    """The ledger's epsilon for (sigma, q=1, 1 step) bounds the true Gaussian-mechanism epsilon
    (sensitivity 1) from above and is no looser than the textbook RDP conversion."""
    delta = 1e-5
    charged = epsilon([count_mechanism(sigma)], delta)
    exact = _analytic_gaussian_epsilon(sigma, delta)
    alphas = np.linspace(1.01, 500, 200000)
    basic = float(np.min(alphas / (2 * sigma**2) + math.log(1 / delta) / (alphas - 1)))
    assert exact <= charged <= basic + 1e-9
    assert charged < 1.5 * exact  # tight: the charge is not a loose over-estimate either


def test_label_count_noise_has_the_declared_std_and_no_bias() -> None:
    labels = np.array([0] * 30 + [1] * 70)
    source = SeededSource(3)
    draws = np.stack([private_label_counts(labels, 2, 2.0, source).counts for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), [30, 70], atol=0.15)  # 4 standard errors
    np.testing.assert_allclose(draws.std(axis=0), [2.0, 2.0], rtol=0.05)
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.06  # independent noise per class


def test_label_count_release_refuses_no_noise() -> None:
    with pytest.raises(PrivacyError, match="noise multiplier > 0"):
        private_label_counts(np.array([0, 1]), 2, 0.0, SeededSource(0))
    with pytest.raises(PrivacyError, match="ls-count-noise-multiplier > 0"):
        ShiftConfig(correction=True, count_noise=0.0)


def test_server_sum_equals_pooled_statistics() -> None:
    """Merged shards equal the statistic of the pooled data (noise aside)."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 2, n) for n in (40, 100, 7)]
    pooled = np.concatenate(shards)
    prior = aggregate_prior([np.bincount(s, minlength=2).astype(float) for s in shards])
    np.testing.assert_allclose(prior, np.bincount(pooled) / len(pooled))
    # a noisy negative total is floored at 1, never a zero or negative prior
    np.testing.assert_allclose(aggregate_prior([np.array([-3.0, 50.0])]), [1 / 51, 50 / 51])
    feats = [rng.normal(size=(n, 4)) + i for i, n in enumerate((30, 50, 20))]
    mean, cov = aggregate_moments(
        [f.sum(0) for f in feats], [f.T @ f for f in feats], [len(f) for f in feats]
    )
    allf = np.concatenate(feats)
    np.testing.assert_allclose(mean, allf.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(allf.T, bias=True), atol=1e-10)
    labels = [rng.integers(0, 2, len(f)) for f in feats]
    class_sums = [np.stack([f[y == c].sum(0) for c in (0, 1)]) for f, y in zip(feats, labels, strict=True)]
    counts = [np.bincount(y, minlength=2).astype(float) for y in labels]
    pooled_y = np.concatenate(labels)
    expected = np.stack([allf[pooled_y == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(
        aggregate_class_means(class_sums, np.sum(counts, axis=0)), expected, atol=1e-12
    )
    squares = [np.array([np.sum(f[y == c] ** 2) for c in (0, 1)]) for f, y in zip(feats, labels, strict=True)]
    pooled_within = sum(np.sum((allf[pooled_y == c] - expected[c]) ** 2) for c in (0, 1)) / (4 * len(allf))
    got = aggregate_within_variance(class_sums, squares, np.sum(counts, axis=0), 4)
    assert got == pytest.approx(pooled_within, rel=1e-10)


# ----------------------------------------------------------------------------- weighted calibration


def test_weighted_binary_bcts_equals_weighted_logistic_regression() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(1500) < 0.8).astype(int)
    x = np.where(y == 1, 1.0, -1.0) + rng.normal(size=1500)
    logits = np.stack([-x, x], axis=1) * 2.0 + rng.normal(0, 0.2, size=(1500, 2))
    w = prior_weights(y, np.array([0.5, 0.5]), 2)
    np.testing.assert_allclose(np.bincount(y, weights=w) / w.sum(), [0.5, 0.5])  # reweighted to the target
    cal = fit_bcts(logits, y, sample_weight=w)
    diff = (logits[:, 1] - logits[:, 0])[:, None]
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(diff, y, sample_weight=w)
    assert 1 / cal.temperature == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert cal.bias[1] - cal.bias[0] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_prior_weights_need_every_class() -> None:
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have none"):
        prior_weights(np.zeros(10, dtype=int), np.array([0.5, 0.5]), 2)
    cal, note = fit_calibration_under(
        np.zeros((10, 2)), np.zeros(10, dtype=int), np.array([0.5, 0.5]), "bcts"
    )
    assert cal.kind == "identity" and "lacks class(es) [1]" in note


# ----------------------------------------------------------------------------- the site's correction

MEANS = np.array([-1.0, 1.0])


def _model_logits(x: np.ndarray, source: np.ndarray) -> np.ndarray:
    """A miscalibrated model trained under ``source``: 2.5 x the Bayes log-posteriors plus a class bias."""
    bayes = np.stack([norm.logpdf(x, m) for m in MEANS], axis=1) + np.log(source)
    return 2.5 * bayes + np.array([0.3, -0.3])


def _site(prevalence: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return MEANS[y] + rng.normal(size=n), y


@pytest.mark.parametrize("prevalence", [0.1, 0.9])
def test_site_recovers_its_prior_and_correction_lowers_log_loss(prevalence: float) -> None:
    source = np.array([0.5, 0.5])
    xv, yv = _site(prevalence, 400, seed=1)  # the site's labelled val split has the site's prior
    xt, yt = _site(prevalence, 2000, seed=2)
    config = ShiftConfig(correction=True, bootstrap=50)
    corr = fit_site_correction(_model_logits(xv, source), yv, _model_logits(xt, source), source, config)
    assert not corr.estimate.fallback
    assert corr.estimate.prior[1] == pytest.approx(yt.mean(), abs=0.03)
    # the interval resamples the unlabeled images only (not the calibration's own error): narrow, around it
    low, high = corr.estimate.interval  # type: ignore[misc]
    assert low[1] <= corr.estimate.prior[1] <= high[1] and high[1] - low[1] < 0.1
    metrics = correction_metrics(corr, _model_logits(xt, source), yt)
    plain = log_loss(yt, softmax(_model_logits(xt, source), axis=1))
    assert metrics["ls-log-loss"] < metrics["cal-log-loss"] < plain
    assert metrics["ls-accuracy"] > metrics["cal-accuracy"]
    assert metrics["ls-log-loss"] == pytest.approx(
        metrics["oracle-log-loss"], abs=0.01
    )  # as good as the truth


def test_unweighted_calibration_would_absorb_the_prior() -> None:
    """Why the val split is reweighted: calibrated on its own mix, the map already holds the site's prior,
    and EM against the source prior then double-counts it."""
    source = np.array([0.5, 0.5])
    xv, yv = _site(0.9, 400, seed=3)
    xt, _ = _site(0.9, 2000, seed=4)
    weighted, _ = fit_calibration_under(_model_logits(xv, source), yv, source, "bcts")
    unweighted = fit_bcts(_model_logits(xv, source), yv)
    # the bias difference of the unweighted fit carries log(0.9/0.1) more than the weighted one
    shift = (unweighted.bias[1] - unweighted.bias[0]) - (weighted.bias[1] - weighted.bias[0])
    assert shift == pytest.approx(math.log(9.0), abs=0.35)
    from fedshift.common.prior_estimation import em_prior

    double = em_prior(unweighted.apply(_model_logits(xt, source)), source).prior[1]
    assert double > 0.97  # the prior counted twice


def test_too_few_unlabeled_samples_fall_back_to_no_correction(caplog: pytest.LogCaptureFixture) -> None:
    source = np.array([0.5, 0.5])
    xv, yv = _site(0.9, 200, seed=5)
    xt, yt = _site(0.9, 12, seed=6)
    config = ShiftConfig(correction=True, min_samples=30)
    with caplog.at_level(logging.WARNING):
        corr = fit_site_correction(_model_logits(xv, source), yv, _model_logits(xt, source), source, config)
    assert corr.estimate.fallback and "only 12 unlabeled samples" in corr.estimate.reason
    np.testing.assert_array_equal(corr.estimate.prior, source)
    metrics = correction_metrics(corr, _model_logits(xt, source), yt)
    assert metrics["ls-fallback"] == 1.0 and metrics["ls-log-loss"] == metrics["cal-log-loss"]
    assert "keeping the source prior" in caplog.text
    # nothing at all to estimate from: no crash either
    empty = fit_site_correction(_model_logits(xv, source), yv, np.zeros((0, 2)), source, config)
    assert empty.estimate.fallback


def test_an_absurd_prior_is_never_applied() -> None:
    """Unlabeled images that all look like one class push EM to a class prior near 0: rejected."""
    source = np.array([0.5, 0.5])
    xv, yv = _site(0.5, 200, seed=7)
    absurd = np.full(300, 6.0)  # far beyond any class-0 image
    config = ShiftConfig(correction=True, bootstrap=0, prior_pseudocount=0.0)  # maximum likelihood
    corr = fit_site_correction(_model_logits(xv, source), yv, _model_logits(absurd, source), source, config)
    assert corr.estimate.fallback and "min_prior" in corr.estimate.reason
    np.testing.assert_array_equal(corr.estimate.prior, source)
    # the default Laplace MAP estimate cannot reach 0: here it is (0 + 1) / (300 + 2) for class 0
    laplace = fit_site_correction(
        _model_logits(xv, source),
        yv,
        _model_logits(absurd, source),
        source,
        replace(config, prior_pseudocount=1.0),
    )
    assert not laplace.estimate.fallback
    assert laplace.estimate.prior[0] == pytest.approx(1 / 302, rel=0.01)


def test_threshold_is_chosen_on_the_site_val_split() -> None:
    source = np.array([0.5, 0.5])
    xv, yv = _site(0.2, 400, seed=8)
    xt, yt = _site(0.2, 1000, seed=9)
    config = ShiftConfig(correction=True, threshold=True, bootstrap=0)
    corr = fit_site_correction(_model_logits(xv, source), yv, _model_logits(xt, source), source, config)
    assert corr.threshold is not None and 0 < corr.threshold < 1
    metrics = correction_metrics(corr, _model_logits(xt, source), yt)
    # balanced accuracy at the val-chosen threshold is near the Bayes-balanced optimum (threshold at x=0)
    assert metrics["thr-balanced-accuracy"] == pytest.approx(norm.cdf(1.0), abs=0.03)


def test_effective_source_prior_of_logit_adjustment() -> None:
    p = np.array([0.2, 0.8])
    np.testing.assert_allclose(effective_source_prior(p, 0.0), p)
    np.testing.assert_allclose(effective_source_prior(p, 1.0), [0.5, 0.5])
    half = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(effective_source_prior(p, 0.5), half)


def test_logit_adjusted_objective_is_the_shifted_cross_entropy() -> None:
    from fedshift.client.alignment import site_objective
    from fedshift.common.shift_statistics import GlobalStatistics

    stats = GlobalStatistics("1", 2, train_prior=np.array([0.2, 0.8]))
    objective = site_objective(ShiftConfig(logit_adjust=1.0), stats)
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    labels = torch.tensor([0, 1])
    shifted = logits + torch.log(torch.tensor([0.2, 0.8]))
    expected = -torch.log_softmax(shifted, dim=1)[torch.arange(2), labels]
    torch.testing.assert_close(objective(torch.zeros(2, 3), logits, labels), expected)


# ----------------------------------------------------------------------------- config


def test_shift_config_round_trips_and_refuses_bad_values() -> None:
    fed = FederationConfig(shift=ShiftConfig(correction=True, align_weight=0.5, bootstrap=20))
    assert FederationConfig.from_run_config(fed.to_run_config()) == fed
    with pytest.raises(ConfigError, match="Expected run-config 'ls-prior-method' to be one of"):
        FederationConfig.from_run_config({"ls-prior-method": "kmm"})
    with pytest.raises(
        ConfigError, match="Expected run-config 'ls-correction' to be true or false, but got 'yes'"
    ):
        FederationConfig.from_run_config({"ls-correction": "yes"})
    with pytest.raises(
        ConfigError, match="Expected run-config 'ls-bootstrap' to be an integer in \\[2, 2000\\] \\(or 0\\)"
    ):
        ShiftConfig(bootstrap=1)
    with pytest.raises(PrivacyError, match="align-noise-multiplier > 0"):
        ShiftConfig(align_weight=1.0, align_noise=0.0)


def test_calibration_shrinkage_keeps_a_separable_split_from_saturating() -> None:
    """On a small separable val split plain BCTS sends T to its bound (probabilities of exactly 0 and 1,
    ties, infinite log loss on the next mistake); the shrunk fit stays finite and barely moves a large one."""
    from fedshift.common.calibration import MIN_TEMPERATURE

    logits = np.array([[0.0, -1.0], [0.0, -2.0], [0.0, -0.5], [0.0, 1.0], [0.0, 2.0], [0.0, -1.5]])
    labels = np.array([0, 0, 0, 1, 1, 0])  # separable at 0
    plain = fit_bcts(logits, labels)
    shrunk = fit_bcts(logits, labels, shrinkage=2.0)
    assert plain.temperature < 5 * MIN_TEMPERATURE  # heading for the bound until the gradient vanishes
    assert np.max(plain.apply(logits)) > 1 - 1e-9  # saturated
    assert shrunk.temperature > 0.2
    probs = shrunk.apply(logits)
    assert np.all((probs > 1e-6) & (probs < 1 - 1e-6))
    x, y = _site(0.5, 5000, seed=11)
    big = _model_logits(x, np.array([0.5, 0.5]))
    assert fit_bcts(big, y, shrinkage=2.0).temperature == pytest.approx(
        fit_bcts(big, y).temperature, rel=0.01
    )


def test_source_prior_is_the_site_own_with_local_norms() -> None:
    from fedshift.client.correction import source_prior_for

    labels = np.array([0] * 18 + [1] * 2)
    global_prior = np.array([0.5, 0.5])
    own, which = source_prior_for(global_prior, labels, 2, local_norm=True)
    assert which == "site"
    np.testing.assert_allclose(own, [19 / 22, 3 / 22])  # Laplace: (n_c + 1) / (n + C)
    shared, which = source_prior_for(global_prior, labels, 2, local_norm=False)
    assert which == "global"
    np.testing.assert_array_equal(shared, global_prior)
    assert source_prior_for(None, labels, 2, local_norm=False) == (None, "global")
    # a logit-adjusted loss trains towards the global prior: that stays the reference
    assert source_prior_for(global_prior, labels, 2, local_norm=True, logit_adjust=1.0)[1] == "global"
