"""The epsilon lower bound of a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

The audit game: ``m`` canaries, each included in the training data independently with
probability 1/2; after training, an attacker guesses "in" or "out" for ``r`` of them and
abstains on the rest. If the training is (epsilon, delta)-DP, the number of correct guesses
``v`` is, up to a delta term, no more likely to be large than under ``r`` independent coin
flips of bias ``e^eps / (1 + e^eps)`` (epsilon-DP randomized response). :func:`p_value` is
that tail, delta term included (the paper's Theorem 3.2 and its reference algorithm), and
:func:`epsilon_lower_bound` the largest epsilon it rejects at the chosen confidence:
evidence that the training is *not* (epsilon, delta)-DP. A bound of 0 proves nothing.

:func:`audit_scores` turns an attacker's scores into guesses by a rule fixed before the
scores are seen: the top ``k`` canaries guessed "in" (and, in the two-sided rule, the bottom
``k`` guessed "out"), for each ``k`` of a small grid, with a Bonferroni correction over the
grid, so that choosing the best ``k`` after the fact keeps the confidence.

Pure numerics (numpy, scipy); no torch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedshift.common.errors import PrivacyError

# the guess counts the rule tries, as fractions of the canaries (Bonferroni over all of them)
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
SIDES: tuple[str, ...] = ("top", "both")  # "top": k guesses "in"; "both": also k guesses "out"


def _randomized_response(eps: float) -> float:
    """The accuracy of epsilon-DP randomized response, ``e^eps / (1 + e^eps)``."""
    return 1.0 / (1.0 + math.exp(-eps))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] for an (eps, delta)-DP training, ``m`` canaries.

    ``beta = P[Binomial(r, q) >= v]`` with ``q`` the accuracy of eps-DP randomized response,
    plus ``2 m delta alpha`` with ``alpha = max_i P[v - i <= Binomial(r, q) < v] / i``.
    """
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"Expected 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not (eps >= 0 and 0 <= delta <= 1):
        raise PrivacyError(f"Expected eps >= 0 and delta in [0, 1], but got eps={eps!r}, delta={delta!r}")
    if v == 0:
        return 1.0
    q = _randomized_response(eps)
    beta = float(stats.binom.sf(v - 1, r, q))
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon (to 1e-6) whose p-value is below ``p``: the training is not (eps, delta)-DP
    for any smaller epsilon, at confidence ``1 - p``; 0 when even eps = 0 is not rejected."""
    if not 0 < p < 1:
        raise PrivacyError(f"Expected the p-value threshold in (0, 1), but got {p!r}")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        low, high = high, 2 * high
        if high > 1e3:  # unreachable for m of any practical size: the tail would be below 1e-400
            return low
    while high - low > 1e-6:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class AuditBound:
    """What the guessing rule found: the lower bound and the guesses it came from."""

    epsilon: float  # the lower bound at confidence ``confidence`` (0: nothing shown)
    confidence: float
    delta: float
    canaries: int  # m
    guesses: int  # r of the best rule
    correct: int  # v of the best rule
    rule: str  # e.g. "top 25" or "top 25 + bottom 25"
    rules_tried: int  # the Bonferroni factor

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon_lower_bound": self.epsilon,
            "confidence": self.confidence,
            "delta": self.delta,
            "canaries": self.canaries,
            "guesses": self.guesses,
            "correct": self.correct,
            "rule": self.rule,
            "rules_tried": self.rules_tried,
        }


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[int]:
    """The distinct guess counts ``k`` the rule tries for ``m`` canaries (each at least 1)."""
    return sorted({k for k in (max(1, round(f * m)) for f in fractions) if 2 * k <= m})


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    sides: Sequence[str] = SIDES,
) -> AuditBound:
    """The epsilon lower bound from an attacker's ``scores`` (higher: more likely included).

    Every rule of the grid (each ``k`` of :func:`guess_counts`, each side) is tested at
    ``(1 - confidence) / rules`` and the largest bound is reported. Ties in the scores are
    broken at random (seeded by the scores themselves), never by inclusion.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m != len(included) or m < 2:
        raise PrivacyError(f"Expected one score per canary and at least 2 canaries, but got {m}")
    if not np.all(np.isfinite(scores)):
        raise PrivacyError("Expected finite attack scores, but some are NaN or infinite")
    if not 0 < confidence < 1:
        raise PrivacyError(f"Expected a confidence in (0, 1), but got {confidence!r}")
    tiebreak = np.random.default_rng(zlib.crc32(scores.tobytes())).random(m)
    order = np.lexsort((tiebreak, scores))[::-1]  # descending scores
    ranked = included[order]
    rules = [(k, side) for k in guess_counts(m, fractions) for side in sides]
    p = (1 - confidence) / len(rules)
    best = AuditBound(0.0, confidence, delta, m, 0, 0, "none", len(rules))
    for k, side in rules:
        correct = int(ranked[:k].sum())
        guesses = k
        name = f"top {k}"
        if side == "both":
            correct += int((~ranked[m - k :]).sum())
            guesses += k
            name += f" + bottom {k}"
        eps = epsilon_lower_bound(m, guesses, correct, delta, p)
        if eps > best.epsilon or best.rule == "none":
            best = AuditBound(eps, confidence, delta, m, guesses, correct, name, len(rules))
    return best
