"""Privacy accounting math: epsilon of a history of subsampled Gaussian mechanisms.

Pure functions over a *history*: a sequence of ``(noise_multiplier, sample_rate,
steps)`` triples, the same form Opacus accountants keep in ``.history``. The
accountants themselves are Opacus's (RDP or PRV), looked up by name in a
registry; fedshift never re-implements them, it only feeds them the whole
history that a site's ledger has kept across rounds, runs and restarts.

Epsilon is always reported together with its delta.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedshift.common.errors import BudgetExhaustedError, PrivacyError

# (noise multiplier sigma, Poisson sampling rate q, number of steps)
Mechanism = tuple[float, float, int]

_ALPHAS: list[float] = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]  # Opacus's RDP orders
MAX_DELTA = 1e-5  # the delta rule: delta <= min(1 / n_train, 1e-5)

DEFAULT_ACCOUNTANT = "prv"
ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
}


def register_accountant(name: str, factory: Callable[[], IAccountant]) -> None:
    """Make another Opacus-style accountant selectable by ``name``."""
    ACCOUNTANTS[name] = factory
    _accountant_epsilon.cache_clear()


def create_accountant(name: str) -> IAccountant:
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise PrivacyError(
            f"Expected the accountant to be one of {sorted(ACCOUNTANTS)}, but got {name!r}"
        ) from None


def _checked(history: Iterable[Mechanism]) -> list[Mechanism]:
    out = []
    for sigma, q, steps in history:
        if not (sigma > 0 and math.isfinite(sigma)) or not 0 < q <= 1 or steps < 0:
            raise PrivacyError(
                f"Expected a mechanism with noise multiplier > 0, 0 < sample rate <= 1 and steps >= 0, "
                f"but got sigma={sigma!r}, q={q!r}, steps={steps!r}"
            )
        if steps:
            out.append((float(sigma), float(q), int(steps)))
    return out


def _composed(history: list[Mechanism]) -> tuple[Mechanism, ...]:
    """Every entry with the same (sigma, q) as one, in a canonical order.

    Composition does not depend on the order of the mechanisms, so a ledger whose
    rounds alternate with other releases (label counts, moments, a Fisher) is
    accounted as a handful of distinct mechanisms, whatever its length.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """Opacus's RDP of one subsampled Gaussian step at ``RDPAccountant.DEFAULT_ALPHAS``."""
    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_ALPHAS))


def epsilon(history: Iterable[Mechanism], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """The epsilon, at ``delta``, of running every mechanism in ``history`` (composition).

    For ``rdp`` this is exactly what a fresh ``RDPAccountant`` with this history
    returns, with the per-step RDP of each (sigma, q) cached: RDP composes by
    addition, so a long ledger costs one evaluation per distinct mechanism. Any
    other accountant gets the history with equal mechanisms merged (:func:`_composed`),
    and its answer is cached per (history, delta).
    """
    checked = _composed(_checked(history))
    if not checked:
        return 0.0
    if ACCOUNTANTS.get(accountant) is RDPAccountant:
        rdp = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in checked)
        eps, _ = get_privacy_spent(orders=_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    create_accountant(accountant)  # an unknown name: the error that names the choices
    return _accountant_epsilon(checked, delta, accountant)


@functools.lru_cache(maxsize=1024)
def _accountant_epsilon(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # PRV's overflow warnings at extreme histories; it then reports inf
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta))
    return math.inf if math.isnan(eps) else eps  # never "within budget" by a failed comparison


def check_budget(eps: float, delta: float, n_train: int | None = None) -> None:
    """Refuse a budget that is missing or impossible, naming the value and the fix."""
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise PrivacyError(
            f"Expected the privacy budget epsilon to be a finite number > 0, but got {eps!r}; "
            "set dp-epsilon (e.g. 8.0), or turn DP off explicitly with dp=false"
        )
    limit = MAX_DELTA if n_train is None else min(MAX_DELTA, 1.0 / max(n_train, 1))
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not 0 < delta <= limit:
        where = "" if n_train is None else f" for a training split of {n_train} images"
        raise PrivacyError(
            f"Expected delta in (0, {limit:.3g}] (delta <= 1/n and <= 1e-5){where}, but got {delta!r}; "
            f"set dp-delta to {limit:.3g} or less"
        )


@dataclass(frozen=True)
class NoisePlan:
    """The noise multiplier chosen so that history + planned steps fit the budget."""

    noise_multiplier: float
    epsilon_planned: float  # epsilon after all planned steps (<= the budget)
    epsilon_before: float  # epsilon already spent


def noise_for_budget(
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    history: Sequence[Mechanism] = (),
    accountant: str = DEFAULT_ACCOUNTANT,
    tolerance: float = 2e-3,
    max_sigma: float = 1e3,
    budget_name: str = "dp-epsilon",
) -> NoisePlan:
    """The smallest noise multiplier (within ``tolerance``) whose planned steps keep epsilon <= budget.

    Accounts for everything already in ``history`` (earlier runs at this site).
    Raises :class:`BudgetExhaustedError` when no amount of noise fits; ``budget_name``
    is the setting the message names (the lifetime ``dp-epsilon`` or ``dp-epsilon-per-run``).
    """
    check_budget(budget, delta)
    if steps < 1:
        raise PrivacyError(f"Expected at least 1 planned step, but got {steps}")
    before = epsilon(history, delta, accountant)

    def eps_at(sigma: float) -> float:
        return epsilon([*history, (sigma, sample_rate, steps)], delta, accountant)

    with warnings.catch_warnings():  # "optimal order is the largest alpha" at huge sigma
        warnings.simplefilter("ignore", UserWarning)
        fits = eps_at(max_sigma) <= budget
    if not fits:
        raise BudgetExhaustedError(
            f"Expected room in the privacy budget {budget_name}={budget:g} (delta={delta:g}), but "
            f"{before:.4g} is already spent and {steps} more steps do not fit even with noise "
            f"multiplier {max_sigma:g} (beyond it updates are mostly noise); the site sits out: plan fewer "
            f"rounds or steps, or raise {budget_name} if the site's governance allows it"
        )
    if ACCOUNTANTS.get(accountant) is RDPAccountant:
        low, high = 0.0, 1.0
        while eps_at(high) > budget:
            low, high = high, high * 2
    else:
        # start from RDP's answer (fast, and an upper bound up to the accountant's own error): the
        # tight accountant's sigma lies a little below it, where it is quick to evaluate; far below,
        # at small sigma and many steps, PRV takes a minute per evaluation. RDP may find no room where
        # this accountant does (its epsilon of the history is larger): then start at max_sigma, which fits.
        try:
            high = noise_for_budget(
                budget, delta, sample_rate, steps, history=history, accountant="rdp", max_sigma=max_sigma
            ).noise_multiplier
        except BudgetExhaustedError:
            high = max_sigma
        while eps_at(high) > budget:
            high = min(high * 1.25, max_sigma)
        low = high / 1.25
        while eps_at(low) <= budget:
            if low < tolerance:  # even (almost) no noise fits the budget: the search's floor
                low = 0.0
                break
            low, high = low / 1.25, low
    while high - low > tolerance:
        mid = (low + high) / 2
        if eps_at(mid) > budget:
            low = mid
        else:
            high = mid
    return NoisePlan(noise_multiplier=high, epsilon_planned=eps_at(high), epsilon_before=before)
