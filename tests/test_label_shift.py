"""Label-shift math against closed forms, hand computations, scipy and scikit-learn references."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import multivariate_normal, norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss

from fedshift.common.calibration import (
    Calibration,
    fit_bcts,
    fit_calibration,
    fit_temperature,
    fit_vector_scaling,
    nll,
)
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.label_shift import correct_posteriors, logit_adjustment
from fedshift.common.prior_estimation import (
    bbse_from_data,
    bbse_prior,
    bootstrap_interval,
    confusion_joint,
    em_prior,
    estimate_prior,
    prediction_marginal,
)
from fedshift.common.thresholds import best_threshold

# 1-D two-class Gaussians N(-1, 1) and N(+1, 1); 2-D three-class Gaussians N(mean_k, I)
MEANS_1D = np.array([[-1.0], [1.0]])
MEANS_2D = np.array([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])


def _sample(prior: np.ndarray, means: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(len(prior), size=n, p=prior)
    return means[y] + rng.normal(size=(n, means.shape[1])), y


def _true_logits(x: np.ndarray, means: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact Bayes log-posteriors (up to a row constant): log p(y) + log N(x; mu_y, I), by scipy."""
    dens = np.stack([multivariate_normal(m, np.eye(len(m))).logpdf(x).reshape(-1) for m in means], axis=1)
    return np.log(prior) + dens


def _bayes_posterior(x: np.ndarray, means: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.asarray(softmax(_true_logits(x, means, prior), axis=1))


# ----------------------------------------------------------------------------- EM


def test_bayes_posterior_helper_matches_1d_closed_form() -> None:
    # N(-1,1) vs N(1,1), equal prior: p(y=1|x) = sigmoid(2x)
    x = np.linspace(-3, 3, 7)[:, None]
    post = _bayes_posterior(x, MEANS_1D, np.array([0.5, 0.5]))
    np.testing.assert_allclose(post[:, 1], 1 / (1 + np.exp(-2 * x[:, 0])), rtol=1e-12)
    ref = norm.pdf(x[:, 0], 1) / (norm.pdf(x[:, 0], 1) + norm.pdf(x[:, 0], -1))
    np.testing.assert_allclose(post[:, 1], ref, rtol=1e-12)


@pytest.mark.parametrize(
    ("source", "target"),
    [([0.5, 0.5], [0.2, 0.8]), ([0.5, 0.5], [0.9, 0.1]), ([0.7, 0.3], [0.2, 0.8])],
)
def test_em_recovers_two_class_prior(source: list[float], target: list[float]) -> None:
    ps, pt = np.array(source), np.array(target)
    x, _ = _sample(pt, MEANS_1D, 5000, seed=1)
    est = em_prior(_bayes_posterior(x, MEANS_1D, ps), ps)
    assert est.converged and not est.fallback
    assert est.method == "em" and est.n == 5000 and 1 < est.iterations < 1000
    np.testing.assert_allclose(est.prior, pt, atol=0.02)
    assert est.prior.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("source", "target"),
    [([1 / 3, 1 / 3, 1 / 3], [0.1, 0.3, 0.6]), ([0.5, 0.3, 0.2], [0.15, 0.25, 0.6])],
)
def test_em_recovers_three_class_prior(source: list[float], target: list[float]) -> None:
    ps, pt = np.array(source), np.array(target)
    x, _ = _sample(pt, MEANS_2D, 5000, seed=2)
    est = em_prior(_bayes_posterior(x, MEANS_2D, ps), ps)
    assert est.converged
    np.testing.assert_allclose(est.prior, pt, atol=0.02)


def test_em_is_the_maximum_likelihood_prior() -> None:
    # reference: maximise sum_i log sum_y probs[i, y] q_y / ps_y over q in the simplex directly
    ps = np.array([0.6, 0.4])
    x, _ = _sample(np.array([0.25, 0.75]), MEANS_1D, 800, seed=3)
    probs = _bayes_posterior(x, MEANS_1D, ps)

    def neg_loglik(q1: float) -> float:
        q = np.array([1 - q1, q1])
        return float(-np.sum(np.log(probs @ (q / ps))))

    ref = minimize_scalar(neg_loglik, bounds=(1e-6, 1 - 1e-6), method="bounded", options={"xatol": 1e-10})
    est = em_prior(probs, ps, tol=1e-12)
    assert est.prior[1] == pytest.approx(ref.x, abs=1e-6)


def test_map_em_is_the_maximum_a_posteriori_prior() -> None:
    # reference: maximise the log likelihood + the Dirichlet(1 + a) log density directly
    ps, a = np.array([0.5, 0.5]), 1.0
    x, _ = _sample(np.array([0.95, 0.05]), MEANS_1D, 60, seed=4)
    probs = _bayes_posterior(x, MEANS_1D, ps)

    def neg_log_post(q1: float) -> float:
        q = np.array([1 - q1, q1])
        return float(-np.sum(np.log(probs @ (q / ps))) - a * np.sum(np.log(q)))

    ref = minimize_scalar(neg_log_post, bounds=(1e-9, 1 - 1e-9), method="bounded", options={"xatol": 1e-10})
    est = em_prior(probs, ps, tol=1e-12, pseudocount=a)
    assert est.converged and est.prior[1] == pytest.approx(ref.x, abs=1e-6)


def test_map_em_with_certain_posteriors_is_laplace_smoothing() -> None:
    # one-hot posteriors: every responsibility is the label, so the MAP prior is (n_c + a) / (n + C a)
    labels = np.array([0] * 57 + [1] * 2 + [2] * 1)
    probs = np.eye(3)[labels]
    for a in (0.0, 1.0, 5.0):
        est = em_prior(probs, np.full(3, 1 / 3), pseudocount=a)
        np.testing.assert_allclose(est.prior, (np.array([57, 2, 1]) + a) / (60 + 3 * a), atol=1e-9)


def test_map_em_beats_maximum_likelihood_on_small_rare_class_sites() -> None:
    # 100 sites of 60 images at prevalence 0.05 (about 3 positives each), exact posteriors under
    # p_s = (0.5, 0.5): the ML estimate often sits at ~0, which erases the class from the corrected
    # posteriors; the Laplace MAP never goes below a / (n + 2a) and its corrected log loss is far
    # lower, close to the correction with the true prior
    ps, truth = np.array([0.5, 0.5]), np.array([0.95, 0.05])
    ml: list[float] = []
    laplace: list[float] = []
    losses: dict[str, list[float]] = {"ml": [], "map": [], "true": []}
    for seed in range(100):
        x, y = _sample(truth, MEANS_1D, 60, seed=100 + seed)
        probs = _bayes_posterior(x, MEANS_1D, ps)
        for key, a, kept in (("ml", 0.0, ml), ("map", 1.0, laplace)):
            prior = em_prior(probs, ps, max_iter=100_000, pseudocount=a).prior
            kept.append(prior[1])
            losses[key].append(log_loss(y, correct_posteriors(probs, ps, prior)[:, 1], labels=[0, 1]))
        losses["true"].append(log_loss(y, correct_posteriors(probs, ps, truth)[:, 1], labels=[0, 1]))
    assert np.mean(np.array(ml) < 0.01) > 0.2 and min(laplace) >= 1 / 62
    mean = {k: float(np.mean(v)) for k, v in losses.items()}
    assert mean["map"] < 0.7 * mean["ml"] and mean["map"] < mean["true"] + 0.02
    # with n = 5000 the pseudo-count no longer matters
    x, _ = _sample(np.array([0.9, 0.1]), MEANS_1D, 5000, seed=5)
    probs = _bayes_posterior(x, MEANS_1D, ps)
    assert em_prior(probs, ps, pseudocount=1.0).prior == pytest.approx(
        em_prior(probs, ps, pseudocount=0.0).prior, abs=1e-3
    )
    with pytest.raises(ConfigError, match="Expected the prior pseudocount to be a finite number >= 0"):
        em_prior(probs, ps, pseudocount=-1.0)


def test_em_leaves_the_source_prior_when_nothing_shifted() -> None:
    # posteriors whose mean is exactly the source prior are a fixed point of EM at step 0
    probs = np.array([[0.9, 0.1], [0.1, 0.9]])
    est = em_prior(probs, np.array([0.5, 0.5]))
    np.testing.assert_allclose(est.prior, [0.5, 0.5])
    assert est.iterations == 1 and est.converged


# ----------------------------------------------------------------------------- BBSE


def test_bbse_equals_closed_form_2x2() -> None:
    a, b, c, d = 0.40, 0.10, 0.10, 0.40  # C[i, j] = P(ŷ=i, y=j); column sums (0.5, 0.5)
    joint = np.array([[a, b], [c, d]])
    mu = np.array([0.3, 0.7])
    det = a * d - b * c
    w = np.array([d * mu[0] - b * mu[1], -c * mu[0] + a * mu[1]]) / det  # C^{-1} mu by hand
    est = bbse_prior(joint, mu, np.array([0.5, 0.5]))
    assert not est.fallback and est.method == "bbse" and est.iterations == 0
    np.testing.assert_allclose(est.weights, w, rtol=1e-12)
    np.testing.assert_allclose(est.prior, w * 0.5, rtol=1e-12)
    np.testing.assert_allclose(est.prior, [1 / 6, 5 / 6], rtol=1e-12)  # w = (1/3, 5/3)


def test_bbse_uses_the_label_marginal_of_the_confusion() -> None:
    # an imbalanced labelled split: columns sum to (0.8, 0.2); q = M^{-1} mu with M = C / colsums
    joint = np.array([[0.6, 0.05], [0.2, 0.15]])
    mu = np.array([0.5, 0.5])
    a, b, c, d = joint.ravel()
    w = np.array([d * mu[0] - b * mu[1], -c * mu[0] + a * mu[1]]) / (a * d - b * c)
    expected = w * joint.sum(axis=0)
    est = bbse_prior(joint, mu, np.array([0.5, 0.5]))
    np.testing.assert_allclose(est.prior, expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(est.prior, np.linalg.solve(joint / joint.sum(axis=0), mu), rtol=1e-12)


def test_bbse_clips_negative_weights() -> None:
    joint = np.array([[0.4, 0.1], [0.1, 0.4]])
    est = bbse_prior(joint, np.array([0.85, 0.15]), np.array([0.5, 0.5]))  # w = (2.2, -0.2)
    np.testing.assert_allclose(est.prior, [1.0, 0.0])
    assert not est.fallback  # bbse_prior itself reports; estimate_prior rejects it (see below)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_bbse_recovers_prior_from_known_confusion(num_classes: int) -> None:
    rng = np.random.default_rng(4)
    if num_classes == 2:
        cond_m = np.array([[0.8, 0.25], [0.2, 0.75]])  # M[i, j] = P(ŷ=i | y=j)
        ps, pt = np.array([0.5, 0.5]), np.array([0.2, 0.8])
    else:
        cond_m = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.1], [0.1, 0.2, 0.8]])
        ps, pt = np.full(3, 1 / 3), np.array([0.6, 0.3, 0.1])
    joint = cond_m * ps  # exact source joint
    n = 20000
    y = rng.choice(num_classes, size=n, p=pt)
    cdf = np.cumsum(cond_m[:, y].T, axis=1)  # row k: CDF of P(ŷ | y = y_k)
    pred = np.minimum((rng.random((n, 1)) > cdf).sum(axis=1), num_classes - 1)
    mu = np.bincount(pred, minlength=num_classes) / n
    est = bbse_prior(joint, mu, ps, n=n)
    np.testing.assert_allclose(est.prior, pt, atol=0.02)
    assert est.n == n


def test_confusion_joint_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    y, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    ref = confusion_matrix(y, pred, labels=[0, 1, 2], normalize="all").T  # sklearn: rows are true labels
    np.testing.assert_allclose(confusion_joint(pred, y, 3), ref)


def test_bbse_from_data_recovers_gaussian_prior() -> None:
    ps, pt = np.array([0.5, 0.5]), np.array([0.2, 0.8])
    xv, yv = _sample(ps, MEANS_1D, 5000, seed=6)
    xt, _ = _sample(pt, MEANS_1D, 5000, seed=7)
    est = bbse_from_data(_bayes_posterior(xv, MEANS_1D, ps), yv, _bayes_posterior(xt, MEANS_1D, ps), ps)
    np.testing.assert_allclose(est.prior, pt, atol=0.03)
    assert est.n == 5000


# ----------------------------------------------------------------------------- correction


def test_correct_posteriors_by_hand() -> None:
    probs = np.array([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    out = correct_posteriors(probs, np.array([0.5, 0.5]), np.array([0.2, 0.8]))
    # weights p_t/p_s = (0.4, 1.6)
    np.testing.assert_allclose(out[0], [0.28 / 0.76, 0.48 / 0.76])
    np.testing.assert_allclose(out[0], [0.368421052631579, 0.631578947368421])
    np.testing.assert_allclose(out[1], [0.2, 0.8])
    np.testing.assert_allclose(out[2], [0.04 / 1.48, 1.44 / 1.48])
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_correct_posteriors_identity_and_three_classes() -> None:
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    prior = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(correct_posteriors(probs, prior, prior), probs)
    out = correct_posteriors(probs, np.full(3, 1 / 3), np.array([0.5, 0.25, 0.25]))
    raw = probs * np.array([1.5, 0.75, 0.75])
    np.testing.assert_allclose(out, raw / raw.sum(axis=1, keepdims=True))


def test_correction_matches_bayes_posterior_under_target_prior() -> None:
    x, _ = _sample(np.array([0.5, 0.5]), MEANS_2D[:2], 50, seed=8)
    ps, pt = np.array([0.5, 0.5]), np.array([0.1, 0.9])
    out = correct_posteriors(_bayes_posterior(x, MEANS_2D[:2], ps), ps, pt)
    np.testing.assert_allclose(out, _bayes_posterior(x, MEANS_2D[:2], pt), rtol=1e-10)


# ----------------------------------------------------------------------------- calibration


def _miscalibrated(prior: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model logits = 3 * true logits + bias, labels, true logits) for 3-class Gaussians."""
    x, y = _sample(prior, MEANS_2D, n, seed)
    true = _true_logits(x, MEANS_2D, prior)
    return 3.0 * true + np.array([0.0, 1.0, -0.5]), y, true


def test_nll_matches_sklearn_log_loss() -> None:
    rng = np.random.default_rng(9)
    probs = softmax(rng.normal(size=(100, 3)), axis=1)
    y = rng.integers(0, 3, 100)
    assert nll(probs, y) == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-12)


@pytest.mark.parametrize("kind", ["ts", "bcts", "vs"])
def test_calibration_lowers_held_out_nll(kind: str) -> None:
    prior = np.full(3, 1 / 3)
    logits, y, _ = _miscalibrated(prior, 3000, seed=10)
    test_logits, test_y, test_true = _miscalibrated(prior, 3000, seed=11)
    cal = fit_calibration(logits, y, kind)
    before = log_loss(test_y, softmax(test_logits, axis=1), labels=[0, 1, 2])
    after = log_loss(test_y, cal.apply(test_logits), labels=[0, 1, 2])
    bayes = log_loss(test_y, softmax(test_true, axis=1), labels=[0, 1, 2])
    assert after < before
    assert cal.kind == kind
    assert cal.fit_nll == pytest.approx(nll(cal.apply(logits), y), rel=1e-6)
    if kind != "ts":  # TS cannot remove the bias; BCTS and VS reach the Bayes NLL
        assert after == pytest.approx(bayes, abs=0.01)


def test_bcts_matches_a_derivative_free_reference_fit() -> None:
    logits, y, _ = _miscalibrated(np.full(3, 1 / 3), 5000, seed=12)
    cal = fit_bcts(logits, y)

    def ref_nll(theta: np.ndarray) -> float:  # T = exp(t), b = (0, b1, b2)
        logp = log_softmax(logits * np.exp(-theta[0]) + np.r_[0.0, theta[1:]], axis=1)
        return float(-np.mean(logp[np.arange(len(y)), y]))

    ref = minimize(ref_nll, np.zeros(3), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12})
    assert cal.temperature == pytest.approx(np.exp(ref.x[0]), rel=1e-4)
    assert cal.temperature == pytest.approx(3.0, rel=0.05)  # the factor the logits were inflated by
    np.testing.assert_allclose(cal.bias[1:] - cal.bias[0], ref.x[1:], atol=1e-3)
    assert cal.fit_nll == pytest.approx(ref.fun, rel=1e-6)
    assert cal.bias.sum() == pytest.approx(0.0, abs=1e-12)


def test_binary_bcts_and_vs_equal_logistic_regression() -> None:
    # softmax over 2 classes: BCTS = Platt scaling on z1 - z0; VS = logistic regression on (z0, z1)
    rng = np.random.default_rng(13)
    x, y = _sample(np.array([0.4, 0.6]), MEANS_1D, 2000, seed=13)
    logits = np.concatenate([-x, x], axis=1) * 2.5 + rng.normal(0, 0.3, size=(2000, 2))
    bcts = fit_bcts(logits, y)
    diff = (logits[:, 1] - logits[:, 0])[:, None]
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(diff, y)
    assert 1 / bcts.temperature == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert bcts.bias[1] - bcts.bias[0] == pytest.approx(ref.intercept_[0], abs=1e-4)
    vs = fit_vector_scaling(logits, y)
    ref2 = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(logits, y)
    np.testing.assert_allclose([-vs.weights[0], vs.weights[1]], ref2.coef_[0], rtol=1e-3)
    ts = fit_temperature(logits, y)
    assert np.all(ts.bias == 0)
    np.testing.assert_allclose(ts.apply(logits), softmax(logits / ts.temperature, axis=1))


def test_identity_calibration_is_softmax() -> None:
    logits = np.array([[1.0, 2.0], [0.0, -1.0]])
    np.testing.assert_allclose(Calibration.identity(2).apply(logits), softmax(logits, axis=1))


# ----------------------------------------------------------------------------- end to end


def test_em_on_calibrated_shifted_split_beats_no_correction() -> None:
    ps, pt = np.array([0.5, 0.5]), np.array([0.15, 0.85])
    bias = np.array([0.4, -0.4])
    xv, yv = _sample(ps, MEANS_1D, 2000, seed=14)
    cal = fit_bcts(3.0 * _true_logits(xv, MEANS_1D, ps) + bias, yv)
    xt, yt = _sample(pt, MEANS_1D, 3000, seed=15)
    probs = cal.apply(3.0 * _true_logits(xt, MEANS_1D, ps) + bias)
    est = estimate_prior(probs, np.bincount(yv) / len(yv), "em")
    assert not est.fallback
    np.testing.assert_allclose(est.prior, pt, atol=0.03)
    corrected = est.correct(probs)
    assert log_loss(yt, corrected) < log_loss(yt, probs) - 0.02


# ----------------------------------------------------------------------------- guard and bad input


def _gaussian_target(n: int, seed: int = 16) -> tuple[np.ndarray, np.ndarray]:
    ps = np.array([0.5, 0.5])
    x, _ = _sample(np.array([0.2, 0.8]), MEANS_1D, n, seed)
    return _bayes_posterior(x, MEANS_1D, ps), ps


def test_too_few_samples_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    probs, ps = _gaussian_target(20)
    with caplog.at_level(logging.WARNING, logger="fedshift.common.prior_estimation"):
        est = estimate_prior(probs, ps, min_samples=50)
    assert est.fallback and not est.converged
    np.testing.assert_array_equal(est.prior, ps)
    assert "20" in est.reason and "min_samples=50" in est.reason
    assert "keeping the source prior" in caplog.text
    assert estimate_prior(np.zeros((0, 2)), ps).fallback  # no data at all: no crash either


def test_singular_confusion_falls_back() -> None:
    ps = np.array([0.5, 0.5])
    singular = np.array([[0.5, 0.5], [0.0, 0.0]])  # the classifier always predicts class 0
    est = bbse_prior(singular, np.array([1.0, 0.0]), ps)
    assert est.fallback and "condition" in est.reason
    np.testing.assert_array_equal(est.prior, ps)
    # the same through estimate_prior, from data
    probs, _ = _gaussian_target(200)
    val = np.tile([0.9, 0.1], (100, 1))
    est = estimate_prior(probs, ps, "bbse", val_probs=val, val_labels=np.arange(100) % 2)
    assert est.fallback and "ill-conditioned" in est.reason
    missing = bbse_prior(np.array([[0.6, 0.0], [0.4, 0.0]]), np.array([0.5, 0.5]), ps)
    assert missing.fallback and "no labelled samples of class(es) [1]" in missing.reason


def test_em_not_converging_falls_back() -> None:
    probs, ps = _gaussian_target(500)
    est = estimate_prior(probs, ps, max_iter=2)
    assert est.fallback and "did not converge in 2 iterations" in est.reason
    np.testing.assert_array_equal(est.prior, ps)
    assert est.estimate is not None and est.estimate[1] > 0.5  # the rejected estimate is kept


def test_prior_below_floor_falls_back() -> None:
    ps = np.array([0.5, 0.5])
    est = estimate_prior(np.tile([0.001, 0.999], (200, 1)), ps)  # all but no class-0 evidence
    assert est.fallback and "min_prior" in est.reason
    np.testing.assert_array_equal(est.prior, ps)
    bbse = estimate_prior(
        np.tile([0.1, 0.9], (200, 1)),
        ps,
        "bbse",
        val_probs=np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]]),
        val_labels=np.array([0, 1, 1, 1]),
    )  # negative weight clipped to 0 -> prior 0 for a class
    assert bbse.fallback and "min_prior" in bbse.reason


def test_unstable_bootstrap_falls_back() -> None:
    probs, ps = _gaussian_target(60)
    est = estimate_prior(probs, ps, bootstrap=50, max_interval_width=0.05)
    assert est.fallback and "max_interval_width" in est.reason
    assert est.interval is not None


def test_bootstrap_interval_contains_truth() -> None:
    probs, ps = _gaussian_target(5000)
    est = estimate_prior(probs, ps, "em", bootstrap=100, seed=1)
    assert not est.fallback and est.interval is not None
    low, high = est.interval
    assert np.all(low <= [0.2, 0.8]) and np.all(high >= [0.2, 0.8])
    assert np.all(high - low > 0) and np.all(high - low < 0.1)
    again = bootstrap_interval(lambda p: em_prior(p, ps).prior, probs, n_boot=100, seed=1)
    np.testing.assert_allclose(again[0], low)  # same seed, same resamples


def test_bbse_through_estimate_prior_with_bootstrap() -> None:
    ps = np.array([0.5, 0.5])
    xv, yv = _sample(ps, MEANS_1D, 3000, seed=17)
    val_probs = _bayes_posterior(xv, MEANS_1D, ps)
    probs, _ = _gaussian_target(3000)
    est = estimate_prior(probs, ps, "bbse", val_probs=val_probs, val_labels=yv, bootstrap=50)
    assert not est.fallback and est.interval is not None
    np.testing.assert_allclose(est.prior, bbse_from_data(val_probs, yv, probs, ps).prior, rtol=1e-12)
    # BBSE (hard predictions) is noisier than EM: SE about 0.02 here (Alexandari et al. 2020)
    np.testing.assert_allclose(est.prior, [0.2, 0.8], atol=0.05)
    low, high = est.interval
    assert np.all(low <= est.prior) and np.all(est.prior <= high)


def test_nan_and_bad_shapes_raise_data_error() -> None:
    ps = np.array([0.5, 0.5])
    probs = np.tile([0.3, 0.7], (100, 1))
    probs[3, 0] = np.nan
    with pytest.raises(DataError, match=r"Expected finite probs, but got 1 NaN/inf entries"):
        estimate_prior(probs, ps)
    with pytest.raises(DataError, match=r"shape \(N, C\)"):
        em_prior(np.array([0.3, 0.7]), ps)
    with pytest.raises(DataError, match=r"source_prior of shape \(3,\)"):
        em_prior(np.full((10, 3), 1 / 3), ps)
    with pytest.raises(DataError, match="sum to 1"):
        correct_posteriors(np.tile([0.3, 0.7], (2, 1)), ps, np.array([0.3, 0.6]))
    with pytest.raises(DataError, match="> 0"):
        correct_posteriors(np.tile([0.3, 0.7], (2, 1)), ps, np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="each row of probs to sum to 1"):
        correct_posteriors(np.array([[0.5, 0.6]]), ps, ps)
    with pytest.raises(DataError, match=r"Expected labels in \[0, 2\)"):
        fit_bcts(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"labels of shape \(3,\)"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(DataError, match="N >= 1"):
        fit_vector_scaling(np.zeros((0, 2)), np.array([], dtype=int))
    with pytest.raises(DataError, match="finite logits"):
        fit_bcts(np.array([[0.0, np.inf]]), np.array([0]))
    with pytest.raises(DataError, match="square confusion"):
        bbse_prior(np.full((2, 3), 1 / 6), np.array([0.5, 0.5]), ps)


def test_bad_settings_raise_config_error() -> None:
    probs, ps = _gaussian_target(100)
    with pytest.raises(ConfigError, match="one of"):
        estimate_prior(probs, ps, "kmm")
    with pytest.raises(ConfigError, match="val_probs and val_labels"):
        estimate_prior(probs, ps, "bbse")
    with pytest.raises(ConfigError, match="one of"):
        fit_calibration(np.zeros((2, 2)), np.array([0, 1]), "platt")


def test_prediction_marginal() -> None:
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    np.testing.assert_allclose(prediction_marginal(probs), [0.5, 0.5])


# ----------------------------------------------------------------------------- logit adjustment, threshold


def test_logit_adjustment() -> None:
    prior = np.array([0.1, 0.9])
    np.testing.assert_allclose(logit_adjustment(prior), np.log(prior))
    np.testing.assert_allclose(logit_adjustment(prior, tau=0.5), 0.5 * np.log(prior))
    with pytest.raises(DataError):
        logit_adjustment(np.array([0.1, 0.8]))


def test_best_threshold_hand_picked() -> None:
    scores = np.array([0.1, 0.3, 0.35, 0.4, 0.6, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # p >= 0.325 gives TPR 1, TNR 2/3 (BA 0.833); p >= 0.5 gives TPR 2/3, TNR 1 (BA 0.833): a tie,
    # broken towards the lower (more sensitive) threshold, the midpoint of 0.3 and 0.35
    assert best_threshold(scores, labels) == pytest.approx(0.325)
    assert best_threshold(scores, labels, "youden") == pytest.approx(0.325)
    imbalanced = np.array([0, 0, 0, 0, 1, 1])  # 0.35 and 0.4 negative: only p >= 0.5 is perfect
    assert best_threshold(scores, imbalanced) == pytest.approx(0.5)
    with pytest.raises(DataError, match="both classes"):
        best_threshold(scores, np.ones(6, dtype=int))


@pytest.mark.parametrize("metric", ["balanced_accuracy", "accuracy", "f1"])
def test_best_threshold_is_the_brute_force_optimum(metric: str) -> None:
    rng = np.random.default_rng(18)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.3 * labels + rng.uniform(0, 0.7, 300), 0, 1).round(2)  # with ties
    ref_fn = {
        "balanced_accuracy": balanced_accuracy_score,
        "accuracy": lambda y, p: np.mean(y == p),
        "f1": f1_score,
    }[metric]
    t = best_threshold(scores, labels, metric)
    best_ref = max(ref_fn(labels, scores >= c) for c in np.r_[np.unique(scores), 1.01])
    assert ref_fn(labels, scores >= t) == pytest.approx(best_ref)
