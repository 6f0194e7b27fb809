"""DP-SGD at a site, on Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

The pieces are Opacus's own: ``GradSampleModule`` computes per-sample gradients
and ``DPOptimizer`` clips them to ``clip_norm`` and adds noise of standard
deviation ``noise_multiplier * clip_norm``; the epsilon comes from Opacus's
accountants (:mod:`fedshift.common.privacy`) fed with the site's ledger.
fedshift adds three things around them:

* **every trainable tensor is private**: the shared adapters *and* the site-local
  ones (input adapter, norm affines) are clipped together, so what is sent is a
  post-processing of DP outputs even though local tensors shape the gradients;
* **cheap per-sample gradients**: the adapters sit on pointwise convolutions and
  linear layers, and the norm affines get an exact closed-form grad sampler
  (:func:`_channel_affine_grad_sample`), so no depthwise convolution ever needs
  one;
* **a secure random source** for production (``secure_rng``): Poisson masks and
  noise come from the operating system's CSPRNG (``os.urandom``), with Opacus's
  floating-point-attack mitigation (sum of four Gaussians, halved). The default
  is a seeded ``torch.Generator``, which makes experiments reproducible and is
  **not** safe against an adversary who can guess the seed.

The training loop itself is :func:`fedshift.client.training.train_local`; this
module supplies the private batch plan and optimizer (:class:`PrivateTraining`), and
the budget of every DP release a site makes: the round-order check (:func:`check_round`),
the noise multiplier a run's rounds fit (:func:`plan_round`) and the one reserve step that
checks a stage's releases against the budget and charges them before any data is read
(:func:`reserve`; training, the statistics stage and the Fisher release all use it).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from torch import nn

from fedshift.client.ledger import LedgerEntry, PrivacyLedger
from fedshift.common.adapters import ChannelAffine
from fedshift.common.config import PrivacyConfig, TrainConfig
from fedshift.common.errors import BudgetExhaustedError, PrivacyError, RoundRefusedError
from fedshift.common.privacy import Mechanism, check_budget, epsilon, noise_for_budget
from fedshift.common.protocol import (
    MECHANISM_DP_FISHER,
    MECHANISM_DP_LABEL_COUNTS,
    MECHANISM_DP_MOMENTS,
    MECHANISM_DP_SGD,
)

logger = logging.getLogger(__name__)

# The input adapter is the first trainable layer and its input needs no gradient, so torch warns
# that Opacus's full backward hook sees only output gradients: exactly what per-sample grads use.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed", category=UserWarning
)


@register_grad_sampler(ChannelAffine)
def _channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradients of ``x * w[c] + b[c]``: sums over everything but batch and channel."""
    x = activations[0]
    dims = tuple(range(2, x.dim()))
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x * backprops).sum(dim=dims) if dims else x * backprops
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=dims) if dims else backprops
    return out


class RandomSource(Protocol):
    """Where the randomness of DP-SGD comes from: Poisson masks and Gaussian noise."""

    secure: bool

    def uniform(self, n: int, device: torch.device) -> torch.Tensor: ...

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor: ...


class SeededSource:
    """A seeded ``torch.Generator`` (reproducible experiments; not for production)."""

    secure = False

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator).to(device)

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor:
        noise = torch.normal(0.0, std, size=tuple(like.shape), generator=self.generator)
        return noise.to(device=like.device, dtype=like.dtype)


def _urandom_uniform(n: int) -> np.ndarray:
    """``n`` doubles, uniform on (0, 1), from the OS CSPRNG (53 random bits each)."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


class SecureSource:
    """The operating system's CSPRNG (``os.urandom``); Gaussians by Box-Muller in float64.

    Each noise draw is the sum of four Gaussians halved, Opacus's mitigation of
    floating-point attacks on the Gaussian mechanism (Holohan et al. 2021).
    """

    secure = True

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(_urandom_uniform(n)).to(device)

    @staticmethod
    def _standard_normal(n: int) -> np.ndarray:
        u1, u2 = _urandom_uniform(n), _urandom_uniform(n)
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)

    def normal(self, std: float, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        total = sum(self._standard_normal(n) for _ in range(4)) / 2.0
        noise = torch.from_numpy(std * np.asarray(total)).view(tuple(like.shape))
        return noise.to(device=like.device, dtype=like.dtype)


class _SourcedDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` with its noise drawn from a :class:`RandomSource`."""

    def __init__(self, *args: Any, source: RandomSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self._clipped: torch.Tensor | int = 0  # per-sample gradients scaled down (stays on device)
        self.seen = 0  # per-sample gradients seen so far

    @property
    def clipped(self) -> int:
        return int(self._clipped)

    def clip_and_accumulate(self) -> None:
        """Flat clipping as Opacus does it, keeping a count of clipped samples without a device sync."""
        samples = self.grad_samples
        if not samples or len(samples[0]) == 0:
            super().clip_and_accumulate()  # an empty Poisson batch: Opacus's own path
            return
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
        self._clipped = self._clipped + (norms > self.max_grad_norm).sum()
        self.seen += len(norms)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(device=grad_sample.device, dtype=p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            noise = self.source.normal(std, summed) if std > 0 else torch.zeros_like(summed)
            p.grad = (summed + noise).view_as(p)


@dataclass
class PrivateTraining:
    """One round of DP-SGD: what :func:`fedshift.client.training.train_local` needs to run it.

    ``steps`` Poisson-sampled batches (each sample joins with probability
    ``sample_rate``), per-sample gradients of every trainable parameter clipped
    jointly to ``clip_norm``, Gaussian noise ``noise_multiplier * clip_norm``
    added to their sum, divided by the expected batch size.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    secure_rng: bool = False
    seed: int = 0
    # the training-set size the plan was made for: the expected batch size is ``sample_rate`` of it
    # (None: the size :meth:`attach` is given). Fixed in advance, it keeps the scaling data-independent.
    num_examples: int | None = None
    # the clipping-and-noise optimizer (a test's fault injection subclasses it; no setting reaches it)
    optimizer_class: ClassVar[type[_SourcedDPOptimizer]] = _SourcedDPOptimizer
    _source: RandomSource | None = field(default=None, init=False, repr=False)
    _gsm: GradSampleModule | None = field(default=None, init=False, repr=False)
    _optimizer: _SourcedDPOptimizer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"Expected a noise multiplier >= 0, but got {self.noise_multiplier!r}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PrivacyError(
                f"Expected the clip norm to be a finite number > 0, but got {self.clip_norm!r}; "
                "set dp-clip-norm (e.g. 1.0)"
            )
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"Expected a sample rate in (0, 1], but got {self.sample_rate!r}")
        if self.steps < 1:
            raise PrivacyError(f"Expected at least one DP-SGD step, but got {self.steps}")

    @property
    def cost(self) -> Mechanism:
        """The round as the ledger charges it: ``(noise multiplier, sample rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def source(self) -> RandomSource:
        if self._source is None:
            self._source = SecureSource() if self.secure_rng else SeededSource(self.seed)
        return self._source

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, num_examples: int
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` for per-sample gradients and ``optimizer`` for clipping and noise."""
        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self._optimizer = self.optimizer_class(
            optimizer=optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip_norm,
            expected_batch_size=max(1, round(self.sample_rate * (self.num_examples or num_examples))),
            loss_reduction="mean",
            source=self.source,
        )
        return self._gsm, self._optimizer

    def after_noise(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at every step once the gradient is clipped, noised and scaled (before the update)."""
        if self._optimizer is None:
            raise RuntimeError("attach() the model and optimizer first")
        self._optimizer.attach_step_hook(lambda _optimizer: fn())

    def batches(self, num_examples: int, device: torch.device) -> Iterator[torch.Tensor]:
        """``steps`` index tensors, each a Poisson sample of the ``num_examples`` rows (may be empty)."""
        for _ in range(self.steps):
            mask = self.source.uniform(num_examples, torch.device("cpu")) < self.sample_rate
            yield mask.nonzero().flatten()

    @property
    def clipped_fraction(self) -> float:
        """Share of per-sample gradients that were scaled down to the clip norm."""
        opt = self._optimizer
        return opt.clipped / opt.seen if opt is not None and opt.seen else float("nan")

    def detach(self) -> None:
        """Remove Opacus's hooks and per-sample gradient buffers from the model."""
        if self._gsm is not None:
            self._gsm._close()
            self._gsm = None


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Poisson batches per epoch: the expected batch size is ``batch_size``."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    return min(1.0, batch_size / max(num_examples, 1))


# beyond this, an update is mostly noise: a site whose remaining budget needs more sits out
MAX_USEFUL_SIGMA = 10.0


@dataclass(frozen=True)
class Release:
    """One DP release a stage makes: the ledger's name of its mechanism and its cost."""

    mechanism: str  # a MECHANISM_* name
    cost: Mechanism  # (noise multiplier, sample rate, steps)


# the rounds each mechanism's releases may carry, given the run's num-server-rounds n: training rounds,
# the statistics stage before round 1 (round 0; label counts only there) and its refreshes before each
# later round, and the end-of-run Fisher for consolidation (round n + 1, as the server sends it)
RELEASE_ROUNDS: dict[str, tuple[str, Callable[[int], tuple[int, int]]]] = {
    MECHANISM_DP_SGD: ("training round", lambda n: (1, n)),
    MECHANISM_DP_LABEL_COUNTS: ("label-count release", lambda n: (0, 0)),
    MECHANISM_DP_MOMENTS: ("moment release", lambda n: (0, n)),
    MECHANISM_DP_FISHER: ("consolidation Fisher release", lambda n: (n + 1, n + 1)),
}


def check_round(
    ledger: PrivacyLedger,
    *,
    run_id: str,
    server_round: int,
    num_rounds: int,
    mechanism: str = MECHANISM_DP_SGD,
) -> None:
    """Refuse a release of ``mechanism`` that is not the next one of this run (:class:`RoundRefusedError`).

    The round must lie in the mechanism's window (:data:`RELEASE_ROUNDS`, from the run's
    ``num-server-rounds``) and come after every release of the mechanism this site already
    made in the run: a repeated or earlier round would be charged twice, a round beyond the
    run would make the noise planning spend the run's whole allowance at once. Call it
    before anything is charged or read. (The Fisher charged with each DP-SGD round is
    covered by that round's check; ``dp-fisher`` here is the end-of-run release.)
    """
    kind, window = RELEASE_ROUNDS[mechanism]
    first, last = window(num_rounds)
    if not first <= server_round <= last:
        where = f"at round {first}" if first == last else f"in {first}..{last}"
        raise RoundRefusedError(
            f"Expected a {kind} {where} (num-server-rounds of run {run_id}: {num_rounds}), but the server "
            f"asked for round {server_round}; this site does not run it (nothing charged)"
        )
    done = [e.round for e in ledger.run_entries(run_id) if e.mechanism == mechanism]
    if done and server_round <= max(done):
        did = "trained" if mechanism == MECHANISM_DP_SGD else f"made a {kind}"
        raise RoundRefusedError(
            f"Expected round {server_round} of run {run_id} to come after round {max(done)}, the last "
            f"this site already {did} in this run, but it does not; running it would charge the budget "
            "twice for one run's progress: this site does not run it (nothing charged)"
        )


def _run_history(ledger: PrivacyLedger, run_id: str) -> list[Mechanism]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.run_entries(run_id)]


def check_allowance(
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    *,
    run_id: str,
    planned: Sequence[Mechanism],
    reserve: Sequence[Mechanism] = (),
    what: str = "this release",
) -> float:
    """The site's lifetime epsilon after charging ``planned``, or :class:`BudgetExhaustedError`.

    ``planned`` (with ``reserve``: what the run keeps room for, e.g. its end-of-run Fisher)
    must fit both the lifetime budget ``dp-epsilon`` over everything in the ledger and,
    when the site sets one, the per-run cap ``dp-epsilon-per-run`` over this run's entries.
    """
    delta, accountant = privacy.delta, privacy.accountant
    history = ledger.history()
    after = epsilon([*history, *planned], delta, accountant)
    reserved = epsilon([*history, *planned, *reserve], delta, accountant) if reserve else after
    note = " (with the end-of-run release this run keeps room for)" if reserve else ""
    if reserved > privacy.epsilon:
        raise BudgetExhaustedError(
            f"Expected {what} to fit the budget epsilon={privacy.epsilon:g} at delta={delta:g}, but it "
            f"would bring epsilon from {ledger.epsilon(delta):.4g} to {reserved:.4g}{note}; this site "
            "sits out (raise dp-epsilon only if the site's governance allows it)"
        )
    cap = privacy.run_cap
    if cap is not None:
        run = _run_history(ledger, run_id)
        run_after = epsilon([*run, *planned, *reserve], delta, accountant)
        if run_after > cap:
            raise BudgetExhaustedError(
                f"Expected {what} to fit the per-run cap dp-epsilon-per-run={cap:g} at delta={delta:g}, but "
                f"it would bring run {run_id}'s epsilon from {epsilon(run, delta, accountant):.4g} to "
                f"{run_after:.4g}{note}; this site sits out of the rest of this run (raise "
                "dp-epsilon-per-run only if the site's governance allows it)"
            )
    return after


def reserve(
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    *,
    run_id: str,
    server_round: int,
    charges: Sequence[Release],
    planned: Sequence[Mechanism] | None = None,
    final: Sequence[Mechanism] = (),
    what: str,
) -> list[LedgerEntry]:
    """Check a stage's releases against the budget, then charge them all; the entries written.

    The one step between a stage's plan and its first data access: with DP on, ``planned``
    (default: the ``charges``' costs; a training round also counts the releases charged
    elsewhere that its noise was planned for) and ``final`` (what the run keeps room for)
    must fit (:func:`check_allowance`, :class:`BudgetExhaustedError` with the numbers, nothing
    charged); then every charge is written, in order, before any data is read: a crash
    over-reports, never under-reports. A site with DP off charges its DP statistics all the same.
    """
    if privacy.enabled:
        costs = [c.cost for c in charges] if planned is None else planned
        check_allowance(privacy, ledger, run_id=run_id, planned=costs, reserve=final, what=what)
    return [
        ledger.charge_mechanism(
            run_id=run_id, round=server_round, mechanism=c.mechanism, cost=c.cost, delta=privacy.delta
        )
        for c in charges
    ]


def plan_round(
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    *,
    num_examples: int,
    train: TrainConfig,
    run_id: str,
    server_round: int,
    num_rounds: int,
    seed: int = 0,
    extra: Sequence[Mechanism] = (),
    final: Sequence[Mechanism] = (),
) -> PrivateTraining:
    """The DP-SGD round this site would run now: its noise multiplier, sampling rate and steps.

    The caller has refused a round out of order or beyond ``num_rounds`` first
    (:func:`check_round`, before it read the data) and checks the budget with
    :func:`reserve`. The noise multiplier is the site's own ``dp-noise-multiplier``, or else
    the one this run already uses (it stays fixed within a run), or else the smallest that
    fits every planned round of this run into what is left of the site's lifetime budget
    *and* of its per-run cap (``dp-epsilon-per-run``); when that would exceed
    :data:`MAX_USEFUL_SIGMA`, :class:`BudgetExhaustedError`: the site sits out. ``extra`` are
    the other mechanisms released with every round (a DP Fisher, the refreshed moments) and
    ``final`` those released once after the last round (the end-of-phase Fisher): the
    planning keeps room for them.
    """
    check_budget(privacy.epsilon, privacy.delta, num_examples)
    q = sample_rate(num_examples, train.batch_size)
    steps = train.local_epochs * steps_per_epoch(num_examples, train.batch_size)
    sigma = privacy.noise_multiplier
    if sigma <= 0:
        earlier = [e for e in ledger.run_entries(run_id) if e.mechanism == MECHANISM_DP_SGD]
        if earlier:
            sigma = earlier[0].noise_multiplier
        else:
            sigma = _planned_sigma(
                privacy, ledger, run_id, q, steps, num_rounds - server_round + 1, extra, final
            )
    return PrivateTraining(
        noise_multiplier=sigma,
        clip_norm=privacy.clip_norm,
        sample_rate=q,
        steps=steps,
        secure_rng=privacy.secure_rng,
        seed=seed,
        num_examples=num_examples,
    )


def _planned_sigma(
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    run_id: str,
    q: float,
    steps: int,
    remaining: int,
    extra: Sequence[Mechanism],
    final: Sequence[Mechanism],
) -> float:
    """The smallest noise multiplier that fits the run's ``remaining`` rounds into both budgets."""
    later = [*(list(extra) * remaining), *final]
    budgets = [(privacy.epsilon, ledger.history(), "dp-epsilon")]
    if privacy.run_cap is not None:
        budgets.append((privacy.run_cap, _run_history(ledger, run_id), "dp-epsilon-per-run"))
    return max(
        noise_for_budget(
            budget,
            privacy.delta,
            q,
            steps * remaining,
            history=[*history, *later],
            accountant=privacy.accountant,
            max_sigma=MAX_USEFUL_SIGMA,
            budget_name=name,
        ).noise_multiplier
        for budget, history, name in budgets
    )
