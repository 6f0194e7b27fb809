"""The statistics stage of a run with label-shift correction or domain alignment: names and math.

Before the first round the server asks every site for DP-released statistics
(stage ``statistics``): noisy label counts of its training split and noisy sums
of its projected features and of their outer products. Each is a Gaussian
mechanism the site charges to its ledger first (see
:mod:`fedshift.client.site_statistics`). The server only *adds* them (sufficient
statistics with a declared reduction, so the merge equals the statistic of the
pooled data plus the summed noise), turns them into the global training prior
and the global feature moments (this module), and sends those back to every
site (stage ``global-statistics``), which keeps them in its state directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.common.errors import DataError
from fedshift.common.io import atomic_write_json

STATISTICS_KEY = "dp-statistics"  # ConfigRecord of a site's reply: its DP-released statistics
GLOBAL_KEY = "global-statistics"  # ConfigRecord of the server's broadcast: the aggregated statistics
STAGE_KEY = "stage"  # config key of a QUERY message: which stage it is
STAGE_RELEASE = "statistics"  # sites release their DP statistics
STAGE_GLOBAL = "global-statistics"  # sites receive and keep the global statistics
GLOBAL_FILE = "global-statistics.json"  # in a site's state directory
MIN_CLASS_COUNT = 1.0  # a noisy global class count below this is raised to it (no class gets prior 0)
MIN_EIGENVALUE = 1e-6  # the global covariance is made positive definite with this floor (relative)


@dataclass(frozen=True, eq=False)
class GlobalStatistics:
    """What the server aggregated from the sites' DP releases (all post-processing of DP outputs)."""

    run: str  # the run these belong to (a prior is the prior of one run's model)
    sites: int  # how many sites' releases went in
    round: int = 0  # the statistics stage they come from: 0 before round 1, r when refreshed before round r
    train_prior: np.ndarray | None = None  # (C,) global training label prior; None when not released
    class_means: np.ndarray | None = None  # (C, k) global mean of each class's projected features
    within_var: float | None = None  # global within-class variance of the projected features, per direction
    class_counts: np.ndarray | None = None  # (C,) summed noisy label counts (server side; not broadcast)
    moment_mean: np.ndarray | None = None  # (k,) global mean of the projected features
    moment_cov: np.ndarray | None = None  # (k, k) global covariance of the projected features

    def to_record(self) -> dict[str, Any]:
        """Flat values for a Flower ConfigRecord (lists of floats)."""
        out: dict[str, Any] = {"run": self.run, "sites": self.sites, "round": self.round}
        if self.within_var is not None:
            out["within-var"] = float(self.within_var)
        if self.train_prior is not None:
            out["train-prior"] = [float(v) for v in self.train_prior]
        if self.class_means is not None:
            out["align-dim"] = int(self.class_means.shape[1])
            out["class-means"] = [float(v) for v in self.class_means.ravel()]
        if self.moment_mean is not None and self.moment_cov is not None:
            out["moment-mean"] = [float(v) for v in self.moment_mean]
            out["moment-cov"] = [float(v) for v in self.moment_cov.ravel()]
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GlobalStatistics:
        prior = record.get("train-prior")
        mean = record.get("moment-mean")
        cov = record.get("moment-cov")
        moment_mean = np.asarray(mean, dtype=np.float64) if mean is not None else None
        class_means = None
        if record.get("class-means") is not None:
            flat = np.asarray(record["class-means"], dtype=np.float64)
            k = int(record.get("align-dim", 0))
            if k < 1 or flat.size % k:
                raise DataError(
                    f"Expected class-means of a multiple of align-dim={k} entries, got {flat.size}"
                )
            class_means = flat.reshape(-1, k)
        moment_cov = None
        if moment_mean is not None and cov is not None:
            k = moment_mean.shape[0]
            flat = np.asarray(cov, dtype=np.float64)
            if flat.size != k * k:
                raise DataError(f"Expected moment-cov with {k * k} entries, but got {flat.size}")
            moment_cov = flat.reshape(k, k)
        return cls(
            run=str(record.get("run", "")),
            sites=int(record.get("sites", 0)),
            round=int(record.get("round", 0)),
            within_var=float(record["within-var"]) if record.get("within-var") is not None else None,
            train_prior=np.asarray(prior, dtype=np.float64) if prior is not None else None,
            class_means=class_means,
            moment_mean=moment_mean,
            moment_cov=moment_cov,
        )

    def to_json(self) -> dict[str, Any]:
        return self.to_record()


def save_global_statistics(state_dir: Path, stats: GlobalStatistics) -> None:
    atomic_write_json(Path(state_dir) / GLOBAL_FILE, stats.to_json())


def load_global_statistics(state_dir: Path, run_id: str) -> GlobalStatistics | None:
    """The global statistics this site received for ``run_id``, or ``None``."""
    path = Path(state_dir) / GLOBAL_FILE
    if not path.is_file():
        return None
    stats = GlobalStatistics.from_record(json.loads(path.read_text()))
    return stats if stats.run == run_id else None


def aggregate_prior(noisy_counts: Sequence[np.ndarray]) -> np.ndarray:
    """The global label prior from the sites' noisy count vectors: sum, floor at 1, normalise."""
    if not noisy_counts:
        raise DataError("Expected at least one site's label counts, but got none")
    stacked = np.stack([np.asarray(c, dtype=np.float64) for c in noisy_counts])
    if stacked.ndim != 2 or not np.all(np.isfinite(stacked)):
        raise DataError(f"Expected finite count vectors of one length, but got shape {stacked.shape}")
    total = np.maximum(stacked.sum(axis=0), MIN_CLASS_COUNT)
    return np.asarray(total / total.sum())


def moment_noise_floor(noise_multiplier: float, clip: float, dim: int, sites: int, total: float) -> float:
    """The expected spectral norm of the DP noise in the global covariance (post-processing, public).

    Each site adds to ``Σ g gᵀ`` a symmetrised Gaussian matrix whose off-diagonal
    entries have std ``noise_multiplier * R²`` (:func:`fedshift.client.alignment.private_moments`);
    summed over ``sites`` and divided by the ``total`` sample count, its spectral
    norm is about ``2 sqrt(dim)`` times the entry std. Directions whose estimated
    variance is below this are noise, not signal.
    """
    entry_std = noise_multiplier * clip**2 * math.sqrt(sites) / max(total, 1.0)
    return 2.0 * math.sqrt(dim) * entry_std


def aggregate_class_means(class_sums: Sequence[np.ndarray], class_counts: np.ndarray) -> np.ndarray:
    """Global per-class means ``Σ_sites sum_c / n_c`` with the global (noisy) class counts floored at 1."""
    if not class_sums:
        raise DataError("Expected at least one site's class sums, but got none")
    sums = np.sum([np.asarray(v, dtype=np.float64) for v in class_sums], axis=0)
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), MIN_CLASS_COUNT)
    if sums.ndim != 2 or counts.shape != (sums.shape[0],):
        raise DataError(
            f"Expected class sums (C, k) and counts (C,), but got {sums.shape} and {counts.shape}"
        )
    return np.asarray(sums / counts[:, None])


def aggregate_within_variance(
    class_sums: Sequence[np.ndarray], class_squares: Sequence[np.ndarray], class_counts: np.ndarray, dim: int
) -> float:
    """Pooled within-class variance per direction: ``Σ_c (Σ||g||² - ||Σ g||² / n_c) / (dim Σ_c n_c)``.

    From the sites' per-class sums and sums of squared norms; floored at a tiny
    positive number (noise can push it below 0).
    """
    sums = np.sum([np.asarray(v, dtype=np.float64) for v in class_sums], axis=0)
    squares = np.sum([np.asarray(v, dtype=np.float64) for v in class_squares], axis=0)
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), MIN_CLASS_COUNT)
    within = float(np.sum(squares - np.sum(sums**2, axis=1) / counts)) / (dim * float(counts.sum()))
    return max(within, 1e-12)


def aggregate_moments(
    sums: Sequence[np.ndarray],
    outers: Sequence[np.ndarray],
    counts: Sequence[float],
    noise_floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Global mean and covariance from the sites' noisy ``sum g`` and ``sum g g^T`` and their sizes.

    ``mean = Σ sum / N``, ``cov = Σ outer / N - mean mean^T``, symmetrised, and
    its eigenvalues floored at ``noise_floor`` (e.g. :func:`moment_noise_floor`)
    and at ``MIN_EIGENVALUE`` times the largest: the noise makes small directions
    meaningless or negative, and whitening by them would blow them up.
    """
    if not sums or len(sums) != len(outers) or len(sums) != len(counts):
        raise DataError(
            f"Expected as many moment sums, outer sums and counts (>= 1), but got "
            f"{len(sums)}, {len(outers)}, {len(counts)}"
        )
    n = float(sum(counts))
    if not n > 0:
        raise DataError(f"Expected a positive number of samples behind the moments, but got {n}")
    mean = np.sum([np.asarray(s, dtype=np.float64) for s in sums], axis=0) / n
    second = np.sum([np.asarray(o, dtype=np.float64) for o in outers], axis=0) / n
    cov = second - np.outer(mean, mean)
    cov = (cov + cov.T) / 2
    values, vectors = np.linalg.eigh(cov)
    floor = max(float(noise_floor), MIN_EIGENVALUE * max(float(values.max()), MIN_EIGENVALUE))
    cov = (vectors * np.maximum(values, floor)) @ vectors.T
    return mean, (cov + cov.T) / 2
