"""Scores that compare feature representations, for the shift study's reports (never in a round).

:func:`subspace_alignment` is the mean squared cosine of the principal angles
between two top-k principal subspaces; :func:`linear_cka` is linear CKA
(Kornblith et al. 2019). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from fedshift.common.errors import DataError


def principal_subspace(features: np.ndarray, k: int) -> np.ndarray:
    """``(D, k)`` orthonormal top-k principal directions of the (centred) rows of ``features``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not 1 <= k <= min(x.shape):
        raise DataError(
            f"Expected features (N >= 2, D) and 1 <= k <= min(N, D), but got shape {x.shape} and k={k}"
        )
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return np.asarray(vt[:k].T)


def subspace_alignment(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """``||U_aᵀ U_b||_F² / k`` in [0, 1]: mean squared cosine of the principal angles between the
    top-k principal subspaces of two feature sets (1 = same subspace). The rotation-invariant form
    of ``Tr(U_sᵀ U_t) / k``."""
    ua, ub = principal_subspace(a, k), principal_subspace(b, k)
    return float(np.sum((ua.T @ ub) ** 2) / k)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the *same* samples (rows)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise DataError(f"Expected two (N >= 2, ·) matrices with the same rows, but got {a.shape}, {b.shape}")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    cross = np.sum((a.T @ b) ** 2)
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))
