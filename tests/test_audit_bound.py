"""The one-run audit's epsilon lower bound, against closed forms and simulated DP mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from fedshift.common.audit_bound import audit_scores, epsilon_lower_bound, guess_counts, p_value
from fedshift.common.errors import PrivacyError


def _tail(r: int, v: int, q: float) -> float:
    """P[Binomial(r, q) >= v] by the regularised incomplete beta function (an independent closed form)."""
    return 1.0 if v == 0 else float(special.betainc(v, r - v + 1, q))


def _p_value_loop(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's p-value written out term by term (math.comb, no scipy.stats)."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k)

    beta = sum(pmf(k) for k in range(v, r + 1))
    alpha = max(sum(pmf(v - j) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    return min(1.0, beta + alpha * delta * 2 * m)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps"), [(100, 20, 15, 0.5), (500, 50, 45, 2.0), (1000, 200, 120, 0.1)]
)
def test_the_p_value_without_delta_is_the_binomial_tail(m: int, r: int, v: int, eps: float) -> None:
    q = math.exp(eps) / (1 + math.exp(eps))
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(_tail(r, v, q), rel=1e-9)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"), [(256, 26, 24, 1.0, 1e-5), (100, 40, 30, 0.3, 1e-3)]
)
def test_the_delta_term_matches_the_theorem_written_out(
    m: int, r: int, v: int, eps: float, delta: float
) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_p_value_loop(m, r, v, eps, delta), rel=1e-9)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)


def test_the_bound_is_where_the_p_value_crosses_the_threshold() -> None:
    m, r, v, delta, p = 500, 100, 90, 1e-5, 0.05
    eps = epsilon_lower_bound(m, r, v, delta, p)
    assert eps > 1.0
    assert p_value(m, r, v, eps, delta) < p <= p_value(m, r, v, eps + 1e-4, delta)
    # more correct guesses, or less delta, can only raise the bound
    assert epsilon_lower_bound(m, r, v + 5, delta, p) > eps
    assert epsilon_lower_bound(m, r, v, 0.0, p) >= eps
    # chance-level guessing proves nothing
    assert epsilon_lower_bound(m, r, r // 2, delta, p) == 0.0


def test_perfect_guesses_bound_epsilon_by_the_number_of_guesses() -> None:
    # r correct of r at delta = 0: q^r = p, so eps = log(q / (1 - q)) with q = p^(1/r)
    for r in (20, 50, 100):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def _randomized_response(eps: float, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An exactly eps-DP release of each coin flip: told truthfully with probability e^eps / (1 + e^eps)."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(truthful == included, 1.0, 0.0), included


def test_the_rule_is_sound_on_an_exactly_dp_mechanism() -> None:
    """Over 200 audits of eps-DP randomized response, the bound exceeds eps at most 5% of the time."""
    rng = np.random.default_rng(0)
    eps = 1.0
    bounds = [audit_scores(*_randomized_response(eps, 500, rng), delta=0.0).epsilon for _ in range(200)]
    assert np.mean(np.array(bounds) > eps) <= 0.05
    assert max(bounds) > 0.3  # and it has power: the bound reaches a good part of eps


def test_the_rule_has_power_on_a_leaky_mechanism() -> None:
    rng = np.random.default_rng(1)
    scores, included = _randomized_response(4.0, 1000, rng)
    bound = audit_scores(scores, included, delta=1e-5)
    assert 2.0 < bound.epsilon <= 4.0
    assert bound.rules_tried == 2 * len(guess_counts(1000))
    # scores that carry nothing prove nothing
    noise = audit_scores(rng.random(1000), included, delta=1e-5)
    assert noise.epsilon < 0.5


def test_ties_are_not_broken_by_inclusion() -> None:
    included = np.arange(200) % 2 == 0
    assert audit_scores(np.zeros(200), included, delta=0.0).epsilon == 0.0


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: p_value(10, 5, 6, 1.0, 0.0), "correct"),
        (lambda: p_value(10, 5, 3, -1.0, 0.0), "eps"),
        (lambda: epsilon_lower_bound(10, 5, 3, 0.0, 1.5), "p-value"),
        (lambda: audit_scores(np.array([1.0, np.nan]), np.array([True, False]), delta=0.0), "finite"),
        (lambda: audit_scores(np.zeros(3), np.zeros(2, dtype=bool), delta=0.0), "one score per canary"),
    ],
)
def test_bad_input_is_refused_with_the_value(call: object, needle: str) -> None:
    with pytest.raises(PrivacyError, match=needle):
        call()  # type: ignore[operator]
