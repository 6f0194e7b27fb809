"""SYNTHETIC H&E-like pathology patches: pink eosin stroma with purple haematoxylin nuclei.

Rendered in stain space (:mod:`fedshift.common.stain`): an eosin field with fibre texture, and
nuclei as soft ellipses of haematoxylin. Label 1 ("atypical") patches have more, larger and darker
nuclei of more varied shape; the classes overlap, so a classifier has something to learn.
Pure numpy; deterministic for a seed.
"""

from __future__ import annotations

import logging

import numpy as np

from fedshift.common.data import CLASS_NAMES_BINARY, Dataset, ImageSet, check_synthetic
from fedshift.common.stain import hed_to_rgb

logger = logging.getLogger(__name__)

SYNTHETIC_COLOUR_SOURCE = "synthetic-he"
MAX_NUCLEI = 14
_CHUNK = 256


def _nuclei(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image, per-nucleus parameters ``(n, MAX_NUCLEI, 1, 1)``; unused nuclei have zero stain."""
    n, k = len(labels), MAX_NUCLEI
    pos = (labels == 1)[:, None].astype(np.float64)
    count = np.where(pos[:, 0] > 0, rng.integers(6, 13, n), rng.integers(4, 10, n))
    present = (np.arange(k)[None] < count[:, None]).astype(np.float64)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, k))

    radius = u(0.07, 0.11) * (1.0 + 0.3 * pos * u(0.3, 1.0))
    p = {
        "y": u(-0.9, 0.9),
        "x": u(-0.9, 0.9),
        "ry": radius,
        "rx": radius * (1.0 + u(-0.15, 0.15) + pos * u(-0.35, 0.35)),
        "angle": u(0.0, np.pi),
        "h": present * u(0.16, 0.24) * (1.0 + 0.3 * pos * u(0.0, 1.0)),
    }
    return {key: v[:, :, None, None] for key, v in p.items()}


def _render(p: dict[str, np.ndarray], stroma: dict[str, np.ndarray], size: int) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 patches from nucleus parameters ``p`` and stroma parameters."""
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    dy, dx = yy[None, None] - p["y"], xx[None, None] - p["x"]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    r = np.sqrt(((c * dy + s * dx) / p["ry"]) ** 2 + ((c * dx - s * dy) / p["rx"]) ** 2)
    nuclei = (p["h"] / (1.0 + np.exp(np.clip((r - 1.0) / 0.12, -30.0, 30.0)))).sum(axis=1)
    fibres = 0.5 + 0.5 * np.sin(stroma["freq"] * (np.cos(stroma["dir"]) * yy + np.sin(stroma["dir"]) * xx))
    eosin = stroma["e"] * (0.75 + 0.25 * fibres) + stroma["noise_e"]
    haem = stroma["h"] + nuclei + stroma["noise_h"]
    hed = np.stack([haem, eosin, np.zeros_like(haem)], axis=-1)
    return np.asarray(np.rint(hed_to_rgb(hed) * 255.0).astype(np.uint8))


def render_synthetic_colour(n: int, prevalence: float, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, size, size, 3)`` uint8 patches and ``(n,)`` labels, ``round(n * prevalence)`` positives."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64)
    labels[: round(n * prevalence)] = 1
    labels = rng.permutation(labels)
    p = _nuclei(rng, labels)
    shape = (n, 1, 1)
    stroma = {
        "e": rng.uniform(0.07, 0.11, shape),
        "h": rng.uniform(0.0, 0.02, shape),
        "freq": rng.uniform(8.0, 14.0, shape),
        "dir": rng.uniform(0.0, np.pi, shape),
        "noise_e": rng.normal(0.0, 0.008, (n, size, size)),
        "noise_h": rng.normal(0.0, 0.008, (n, size, size)),
    }
    parts = [
        _render(
            {k: v[i : i + _CHUNK] for k, v in p.items()},
            {k: v[i : i + _CHUNK] for k, v in stroma.items()},
            size,
        )
        for i in range(0, n, _CHUNK)
    ]
    return np.concatenate(parts), labels


def make_synthetic_colour(n: int, prevalence: float = 0.5, size: int = 28, seed: int = 0) -> Dataset:
    """SYNTHETIC H&E-like colour patches; label 1 = atypical nuclei (more, larger, darker, irregular).

    Exactly ``round(n * prevalence)`` positives, shuffled; deterministic for a seed.
    """
    check_synthetic(n, prevalence, size)
    images, labels = render_synthetic_colour(n, prevalence, size, seed)
    logger.info("Generated %d SYNTHETIC H&E patches (%d atypical), size %d", n, int(labels.sum()), size)
    return Dataset(
        splits={"train": ImageSet(images=images, labels=labels)},
        class_names=CLASS_NAMES_BINARY,
        source=SYNTHETIC_COLOUR_SOURCE,
        synthetic=True,
    )
