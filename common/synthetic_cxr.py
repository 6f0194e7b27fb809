"""The SYNTHETIC chest-X-ray-like renderer behind :func:`fedshift.common.data.make_synthetic_cxr`.

Seeded per-image parameters (body, two lungs with ribs, spine, heart, gain and
noise) and, for label 1, a soft bright opacity in one lung, rendered in chunks.
Pure numpy; deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Lesions:
    """Each generated image's lesion, in the renderer's unit coordinates (the image spans [-1, 1]).

    ``x``, ``y``: the centre (column, row); ``sigma``: the Gaussian's width;
    ``amplitude``: its peak strength, 0 for an image without a lesion. All ``(n,)``.
    """

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    amplitude: np.ndarray

    def disks(self, size: int, radius: float = 2.0) -> np.ndarray:
        """``(n, size, size)`` bool masks: the pixels within ``radius`` sigmas of each lesion's centre."""
        yy, xx = np.meshgrid(_axis(size), _axis(size), indexing="ij")
        d = np.hypot(yy[None] - self.y[:, None, None], xx[None] - self.x[:, None, None])
        return np.asarray(d <= radius * self.sigma[:, None, None])


def _axis(size: int) -> np.ndarray:
    """Pixel centres in unit coordinates: ``size`` values in (-1, 1)."""
    return (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0


def _soft_ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: Any, cx: Any, ry: Any, rx: Any, edge: float
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge of width ``edge`` (unit coords)."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -30.0, 30.0)))


def _render_cxr(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Render images from per-image parameters ``p`` (each an array of shape (n, 1, 1))."""
    yy, xx = np.meshgrid(_axis(size), _axis(size), indexing="ij")
    yy, xx = yy[None], xx[None]
    edge = 0.06
    body = _soft_ellipse(yy, xx, 0.05, p["cx"], 0.98 * p["scale"], 0.82 * p["scale"], edge)
    img = p["bg"] + (p["body"] - p["bg"]) * body
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        lcx = p["cx"] + side * p["lung_dx"] * p["scale"]
        lungs = lungs + _soft_ellipse(
            yy, xx, p["lung_cy"], lcx, p["lung_ry"] * p["scale"], p["lung_rx"] * p["scale"], edge
        )
    ribs = 0.5 + 0.5 * np.sin(p["rib_freq"] * (yy + 0.25 * (xx - p["cx"]) ** 2) + p["rib_phase"])
    img = img - lungs * (p["lung_depth"] - p["rib_amp"] * ribs)
    spine = np.exp(-(((xx - p["cx"]) / p["spine_w"]) ** 2)) * body
    heart = _soft_ellipse(yy, xx, 0.35, p["cx"] + 0.1, 0.3, 0.22, 0.1)
    img = img + p["spine_amp"] * spine + 0.5 * p["spine_amp"] * heart
    d2 = (yy - p["les_y"]) ** 2 + (xx - p["les_x"]) ** 2
    lesion = p["les_amp"] * np.exp(-0.5 * d2 / p["les_sigma"] ** 2) * np.clip(lungs, 0.0, 1.0)
    img = p["gain"] * (img + lesion) + p["noise"]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _parameters(n: int, prevalence: float, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, Any]:
    """Per-image parameters (each ``(n, 1, 1)``), the labels and the generator, drawn in a fixed order."""
    rng = np.random.default_rng(seed)
    positives = round(n * prevalence)
    labels = np.zeros(n, dtype=np.int64)
    labels[:positives] = 1
    labels = rng.permutation(labels)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, 1, 1)).astype(np.float32)

    p = {
        "cx": u(-0.06, 0.06),
        "scale": u(0.9, 1.05),
        "bg": u(0.02, 0.1),
        "body": u(0.5, 0.62),
        "lung_dx": u(0.36, 0.42),
        "lung_cy": u(-0.12, 0.0),
        "lung_ry": u(0.5, 0.62),
        "lung_rx": u(0.22, 0.28),
        "lung_depth": u(0.22, 0.34),
        "rib_amp": u(0.03, 0.07),
        "rib_freq": u(16.0, 20.0),
        "rib_phase": u(0.0, 2 * np.pi),
        "spine_w": u(0.07, 0.11),
        "spine_amp": u(0.12, 0.2),
        "gain": u(0.85, 1.15),
    }
    # Lesion: inside one lung (random side), random position in the lung, size and strength.
    side = np.where(rng.random((n, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    angle = u(0.0, 2 * np.pi)
    radius = np.sqrt(u(0.0, 1.0)) * 0.6
    lcx = p["cx"] + side * p["lung_dx"] * p["scale"]
    p["les_x"] = lcx + radius * np.cos(angle) * p["lung_rx"] * p["scale"]
    p["les_y"] = p["lung_cy"] + radius * np.sin(angle) * p["lung_ry"] * p["scale"]
    p["les_sigma"] = u(0.1, 0.18)
    p["les_amp"] = u(0.24, 0.4) * (labels == 1).astype(np.float32)[:, None, None]
    return p, labels, rng


def render_synthetic_cxr(n: int, prevalence: float, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, size, size)`` uint8 images and ``(n,)`` labels, ``round(n * prevalence)`` positives, shuffled."""
    p, labels, rng = _parameters(n, prevalence, seed)
    p["noise"] = rng.normal(0.0, 0.025, size=(n, size, size)).astype(np.float32)
    chunk = 1024
    images = np.concatenate(
        [_render_cxr({k: v[i : i + chunk] for k, v in p.items()}, size) for i in range(0, n, chunk)]
    )
    return images, labels


def synthetic_lesions(n: int, prevalence: float, seed: int) -> Lesions:
    """The lesions of ``render_synthetic_cxr(n, prevalence, size, seed)`` (for any size): where they are."""
    p, _, _ = _parameters(n, prevalence, seed)
    return Lesions(*(p[k][:, 0, 0].astype(np.float64) for k in ("les_x", "les_y", "les_sigma", "les_amp")))
