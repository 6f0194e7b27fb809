"""An empirical privacy audit of a site's DP-SGD round, with canaries, in one training run.

:func:`run_audit` trains one round as the site trains a run's first round (its training recipe,
its DP settings, :func:`fedshift.client.dp.plan_round`'s noise for a one-round run, so the whole
budget in that round, the real Opacus engine and optimizer,
:func:`fedshift.client.training.train_local`; the plain cross-entropy objective: the audit covers
the DP-SGD path, not the label-shift, alignment or EWC terms) on a throw-away copy of the site's
training images into which ``m`` canaries were put, each with probability 1/2. Nothing is sent
and nothing is charged: the round runs outside any federation.

The attacker sees what the coordinator would see: the global model it sent and the shared
tensors the site releases after the round. It scores each canary by the alignment of the
released update with the canary's own gradient at the global model (white box, last
iterate), after removing the canaries' mean gradient and their top principal directions,
which the site's data shares with every canary. The scores give an epsilon lower bound at 95%
confidence by the one-run theorem (:mod:`fedshift.common.audit_bound`) and a
membership-inference AUC (scikit-learn's).

A lower bound above the claimed epsilon is evidence of a bug in the DP path (noise of the
wrong scale, clipping that does not clip, a tensor that escapes it). A bound below it
proves nothing about privacy: the attacker may simply be weak.

The result stays at the site: ``<state-dir>/audits/audit-<time>.json``, shown by
``fedshift ledger``. The audit reads the site's data and writes nothing else.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from sklearn.metrics import roc_auc_score

from fedshift.client.dp import PrivateTraining, plan_round
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.client.training import cross_entropy, device_for, train_local
from fedshift.common.audit_bound import AuditBound, audit_scores
from fedshift.common.config import FederationConfig
from fedshift.common.data import ImageSet, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.privacy import epsilon
from fedshift.common.update_vector import flatten_update

logger = logging.getLogger(__name__)

AUDITS_DIR = "audits"
CANARY_KINDS = ("mislabelled", "noise")
DEFAULT_CANARIES = 256
# the site's training images the audited round runs on (a random subset; 0: all of them). The DP code
# path is the same at any size and the claim is computed for the size audited; a smaller set gives each
# canary more weight in the update, so more power (measured: no power left at 4,707 images)
DEFAULT_AUDIT_SIZE = 500
AUDIT_RUN_ID = "privacy-audit"  # the run id the audit plans its one round under (nothing is charged)

# the share of the canaries' principal gradient directions removed before scoring (fixed in advance)
PRINCIPAL_FRACTION = 0.1

# replaces the round's DP-SGD before it runs; only tests pass one (to break the DP path on purpose)
TrainingHook = Callable[[PrivateTraining], PrivateTraining]


@dataclass(frozen=True)
class Canaries:
    """The audit's canaries and the coin flips that put each in (True) or left it out."""

    images: np.ndarray
    labels: np.ndarray
    included: np.ndarray  # (m,) bool
    kind: str


def make_canaries(train: ImageSet, m: int, kind: str, num_classes: int, rng: np.random.Generator) -> Canaries:
    """``m`` canaries of ``kind`` for the audited training images ``train``, each included with
    probability 1/2.

    ``mislabelled``: copies of ``m`` of the site's own training images (drawn without replacement)
    with another class's label; ``noise``: images of uniform random pixels (the site's image shape)
    with random labels.
    """
    if kind not in CANARY_KINDS:
        raise ConfigError(f"Expected a canary kind in {', '.join(CANARY_KINDS)}, but got {kind!r}")
    if len(train) < 20:
        raise ConfigError(
            f"Expected at least 20 training images to audit, but the audited set has {len(train)}; raise "
            "--audit-size (0: the whole split) or audit a site with more data"
        )
    if not (isinstance(m, int) and 20 <= m <= len(train)):
        raise ConfigError(
            f"Expected between 20 and {len(train)} canaries (the audited training images, --audit-size), "
            f"but got {m!r}; pass e.g. --canaries {min(DEFAULT_CANARIES, len(train))}, or raise --audit-size"
        )
    if kind == "mislabelled":
        pick = rng.choice(len(train), size=m, replace=False)
        images = train.images[pick].copy()
        shift = rng.integers(1, num_classes, size=m) if num_classes > 1 else np.zeros(m, dtype=np.int64)
        labels = ((train.labels[pick] + shift) % num_classes).astype(np.int64)
    else:
        images = rng.integers(0, 256, size=(m, *train.images.shape[1:]), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=m).astype(np.int64)
    return Canaries(images, labels, rng.random(m) < 0.5, kind)


def with_canaries(train: ImageSet, canaries: Canaries) -> ImageSet:
    """The audit's throw-away training set: ``train`` and the included canaries (``train`` untouched)."""
    keep = canaries.included
    return ImageSet(
        np.concatenate([train.images, canaries.images[keep]]),
        np.concatenate([train.labels, canaries.labels[keep]]),
    )


@dataclass(frozen=True)
class AuditResult:
    """One audit: the claimed epsilon of the round's settings beside the empirical lower bound."""

    site: str
    created: str  # UTC, ISO 8601
    kind: str
    canaries: int
    included: int
    train_size: int  # the audit's base training images (canaries excluded)
    private: bool
    claimed_epsilon: float  # inf without DP
    delta: float
    accountant: str
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    bound: AuditBound
    mia_auc: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "bound"}
        out.update(self.bound.to_dict())
        # strict JSON: no claim without DP, no AUC when every canary fell on one side
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}

    def table(self) -> str:
        claimed = "inf (no DP)" if not self.private else f"{self.claimed_epsilon:.3f}"
        rows = [
            ("site", self.site),
            ("canaries", f"{self.canaries} {self.kind} ({self.included} included)"),
            ("training images", str(self.train_size)),
            ("DP-SGD", _dp_line(self) if self.private else "off"),
            (f"claimed epsilon (delta={self.delta:g})", claimed),
            (
                f"epsilon lower bound ({self.bound.confidence:.0%})",
                f"{self.bound.epsilon:.3f} (rule {self.bound.rule}: {self.bound.correct} of "
                f"{self.bound.guesses} correct, {self.bound.rules_tried} rules)",
            ),
            ("membership-inference AUC", _shown(None if math.isnan(self.mia_auc) else self.mia_auc)),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _dp_line(r: AuditResult) -> str:
    return (
        f"sigma {r.noise_multiplier:.3f}, clip {r.clip_norm:g}, q {r.sample_rate:.4f}, {r.steps} steps "
        f"({r.accountant})"
    )


def run_audit(
    fed: FederationConfig,
    site: SiteSettings,
    *,
    canaries: int = DEFAULT_CANARIES,
    kind: str = "mislabelled",
    audit_size: int = DEFAULT_AUDIT_SIZE,
    seed: int = 0,
    confidence: float = 0.95,
    training_hook: TrainingHook | None = None,
) -> AuditResult:
    """Audit one DP-SGD round of ``site`` under ``fed``'s recipe; see the module docstring.

    ``audit_size`` of the site's training images (a random subset; 0: all) form the base data.
    ``seed`` fixes the subset, the canaries, their coin flips, the model's initialisation and (with the
    seeded noise source) the round's sampling and noise. ``training_hook`` is for tests only.
    """
    start = time.perf_counter()
    if audit_size < 0:
        raise ConfigError(
            f"Expected --audit-size >= 0 (0: the whole split), but got {audit_size}; pass e.g. "
            "--audit-size 500"
        )
    device = device_for(site.device)
    torch.manual_seed(seed)
    model = build_model(fed.model)
    train = load_site_data(site, model.config).split("train")
    rng = np.random.default_rng(seed)
    if 0 < audit_size < len(train):
        train = train.subset(np.sort(rng.choice(len(train), size=audit_size, replace=False)))
    birds = make_canaries(train, canaries, kind, model.config.num_classes, rng)
    data = with_canaries(train, birds)
    # the round's plan is fixed before the coin flips are looked at: from the expected size
    # its sampling and noise draw from a stream of their own, not the one that initialised the model
    plan = _plan(fed, site, len(train) + canaries // 2, zlib.crc32(f"audit-noise:{seed}".encode()))
    model.freeze_for_training(fed.train.trainable_depth(1))
    initial = copy.deepcopy(model)  # what the coordinator sent (the global model of round 1)
    # the shared tensors this round trains (frozen ones never move: no signal, only dimensions)
    names = sorted(n for n, p in model._shared_params().items() if p.requires_grad)
    before = _numpy(model, names)
    used = plan if plan is None or training_hook is None else training_hook(plan)
    logger.info(
        "%s: auditing one round on %d images + %d of %d %s canaries", site.name, len(train),
        int(birds.included.sum()), canaries, kind,
    )  # fmt: skip
    train_local(model, data, fed.train, device, seed=seed, private=used, objective=cross_entropy)
    update = torch.from_numpy(flatten_update(_numpy(model, names), before))
    scores = alignment_scores(initial, birds.images, birds.labels, update, device, names)
    privacy = site.privacy
    claimed = math.inf if plan is None else epsilon([plan.cost], privacy.delta, privacy.accountant)
    bound = audit_scores(scores, birds.included, delta=privacy.delta, confidence=confidence)
    return AuditResult(
        site=site.name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        kind=kind,
        canaries=canaries,
        included=int(birds.included.sum()),
        train_size=len(train),
        private=plan is not None,
        claimed_epsilon=claimed,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_multiplier=0.0 if plan is None else plan.noise_multiplier,
        clip_norm=privacy.clip_norm,
        sample_rate=0.0 if plan is None else plan.sample_rate,
        steps=0 if plan is None else plan.steps,
        bound=bound,
        mia_auc=_auc(birds.included, scores),
        seconds=time.perf_counter() - start,
    )


def _numpy(model: FedshiftModel, names: list[str]) -> dict[str, np.ndarray]:
    state = model.shared_state_dict()
    return {n: state[n].detach().cpu().numpy().copy() for n in names}


def _auc(included: np.ndarray, scores: np.ndarray) -> float:
    """The membership-inference AUC; NaN when every canary fell on one side of the coin."""
    return float(roc_auc_score(included, scores)) if 0 < included.sum() < len(included) else math.nan


def _plan(fed: FederationConfig, site: SiteSettings, num_examples: int, seed: int) -> PrivateTraining | None:
    """The round's DP-SGD as the site plans a run's first round (one round, an empty ledger), or None."""
    if not site.privacy.enabled:
        return None
    with tempfile.TemporaryDirectory(prefix="fedshift-audit-") as empty:
        ledger = PrivacyLedger.at(empty, accountant=site.privacy.accountant)
        return plan_round(
            site.privacy,
            ledger,
            num_examples=num_examples,
            train=fed.train,
            run_id=AUDIT_RUN_ID,
            server_round=1,
            num_rounds=1,
            seed=seed,
        )


def alignment_scores(
    model: FedshiftModel,
    images: np.ndarray,
    labels: np.ndarray,
    update: torch.Tensor,
    device: torch.device,
    names: list[str],
) -> np.ndarray:
    """Each canary's score (:func:`projection_scores`) from its gradient at ``model``, the global model;
    ``update`` is flattened over the shared tensors ``names`` in name order (``flatten_update``'s)."""
    return projection_scores(canary_gradients(model, images, labels, device, names), update.double())


def canary_gradients(
    model: FedshiftModel,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    names: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-canary gradients of the cross-entropy, shape (m, d) float64: the shared tensors ``names``, in
    name order (as :func:`fedshift.common.update_vector.flatten_update` lays an update out), by
    Opacus's grad samplers (the engine DP-SGD uses)."""
    model = copy.deepcopy(model).to(device)
    shared = model._shared_params()
    for param in model.parameters():
        param.requires_grad_(False)
    order = sorted(names)
    for name in order:
        shared[name].requires_grad_(True)
    model.train(True)  # no mode-dependent maths (FedshiftModel.train); Opacus records only in train mode
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    rows = []
    try:
        for begin in range(0, len(images), batch_size):
            x = to_tensor(images[begin : begin + batch_size], model.config.image_size, model.config.in_chans)
            y = torch.as_tensor(labels[begin : begin + batch_size], dtype=torch.long)
            gsm.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(gsm(x.to(device)), y.to(device), reduction="sum")
            loss.backward()
            grads = [shared[n].grad_sample.reshape(len(x), -1) for n in order]  # type: ignore[union-attr]
            rows.append(torch.cat(grads, dim=1).detach().cpu().double())
            for name in order:
                shared[name].grad_sample = None  # type: ignore[union-attr]
    finally:
        gsm._close()
    return torch.cat(rows)


def projection_scores(gradients: torch.Tensor, update: torch.Tensor) -> np.ndarray:
    """Minus the ``update`` projected on each row of ``gradients``, after removing what the rows share.

    The rows' mean and their top :data:`PRINCIPAL_FRACTION` principal directions are removed first:
    those are the directions the site's own data shares with every canary, along which the update
    moves whatever the coin flips. Descending a canary's own loss moves the update against its
    gradient, so a larger score means more likely included.
    """
    centred = gradients - gradients.mean(dim=0, keepdim=True)
    k = min(max(1, round(PRINCIPAL_FRACTION * len(gradients))), len(gradients) - 1)
    # the top right singular vectors, from the m x m Gram matrix (d is the model's size, m is small)
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    keep = values > values[0] * 1e-12
    top = (vectors[:, keep].T @ centred) / values[keep].sqrt()[:, None]
    residual = centred - (centred @ top.T) @ top
    moved = update - top.T @ (top @ update)
    norms = residual.norm(dim=1).clamp_min(1e-12)
    return (-(residual @ moved) / norms).numpy()


def save_audit(state_dir: Path, result: AuditResult) -> Path:
    """Write ``result`` under ``<state_dir>/audits/`` (atomically); the file written."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = Path(state_dir) / AUDITS_DIR / f"audit-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, as_jsonable(result.to_dict()))
    return path


def latest_audit(state_dir: Path) -> dict[str, Any] | None:
    """The newest audit under ``<state_dir>/audits/``, or None; an unreadable file is skipped (warned)."""
    import json

    folder = Path(state_dir) / AUDITS_DIR
    for path in sorted(folder.glob("audit-*.json"), reverse=True) if folder.is_dir() else []:
        try:
            audit = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable audit %s: %s", path, exc)
            continue
        missing = sorted(AUDIT_KEYS - set(audit)) if isinstance(audit, dict) else sorted(AUDIT_KEYS)
        if missing:
            logger.warning("skipping audit %s: it lacks %s", path, ", ".join(missing))
            continue
        audit = dict(audit, path=str(path))
        try:
            audit_line(audit)  # the values it shows are numbers
        except (TypeError, ValueError) as exc:
            logger.warning("skipping audit %s: a value is not what an audit writes (%s)", path, exc)
            continue
        return audit
    return None


# what :func:`audit_line` shows of an audit file
AUDIT_KEYS = frozenset(
    {"created", "epsilon_lower_bound", "confidence", "canaries", "claimed_epsilon", "delta", "mia_auc"}
)


def audit_line(audit: dict[str, Any] | None) -> str:
    """One line on the latest audit (:func:`latest_audit`), for ``fedshift ledger``."""
    if audit is None:
        return "privacy audit: none yet (fedshift audit)"
    claimed = audit.get("claimed_epsilon")
    shown = "no DP" if claimed is None else f"claimed epsilon {claimed:.3f}"
    verdict = (
        ""
        if claimed is None or audit["epsilon_lower_bound"] <= claimed
        else " ABOVE THE CLAIM: check the DP path"
    )
    return (
        f"privacy audit {audit['created']}: epsilon lower bound {audit['epsilon_lower_bound']:.3f} "
        f"({audit['confidence']:.0%}, {audit['canaries']} canaries) vs {shown} at delta={audit['delta']:g}; "
        f"membership-inference AUC {_shown(audit['mia_auc'])}{verdict} ({audit['path']})"
    )


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
