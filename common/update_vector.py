"""A site's update as one vector: the shared tensors minus the global ones, in one agreed order.

Secure aggregation masks and sums vectors; the site flattens its update with
:func:`flatten_update` and the server turns the unmasked sum back into tensors
with :func:`unflatten`. Both sides order the tensors by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """``arrays - reference`` over every tensor, in name order, as one float64 vector."""
    if sorted(arrays) != sorted(reference):
        raise ValueError(
            f"Expected the update to hold the global tensors {sorted(reference)[:3]}..., but got "
            f"{sorted(arrays)[:3]}...; the site and the server run different models"
        )
    parts = [
        np.asarray(arrays[k], dtype=np.float64).ravel() - np.asarray(reference[k], dtype=np.float64).ravel()
        for k in sorted(reference)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def vector_length(reference: Mapping[str, np.ndarray]) -> int:
    """How many numbers :func:`flatten_update` makes of an update of ``reference``'s tensors."""
    return int(sum(np.asarray(v).size for v in reference.values()))


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``reference + vector``, tensor by tensor, in each reference tensor's shape and dtype."""
    if vector.size != vector_length(reference):
        raise ValueError(f"Expected a vector of {vector_length(reference)} numbers, got {vector.size}")
    out, start = {}, 0
    for key in sorted(reference):
        ref = np.asarray(reference[key])
        part = vector[start : start + ref.size].reshape(ref.shape)
        out[key] = (ref.astype(np.float64) + part).astype(ref.dtype)
        start += ref.size
    return out


def clip_to_norm(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled down to L2 norm ``bound`` when longer (``bound`` 0: unchanged), and its norm."""
    norm = float(np.linalg.norm(vector))
    if bound > 0 and norm > bound:
        return vector * (bound / norm), norm
    return vector, norm
