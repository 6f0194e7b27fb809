"""Colour deconvolution of H&E images: the Ruifrok-Johnston haematoxylin/eosin/DAB stain matrix.

Beer-Lambert: an RGB pixel's optical density is a sum of stain concentrations times their colour
vectors. Concentrations are in scikit-image's units (``rgb2hed``/``hed2rgb``: optical density divided by
``-log(1e-6)``), so a stain shift means the same here as in HED augmentation (Tellez et al. 2018).
"""

from __future__ import annotations

import numpy as np

# Rows: the RGB optical density of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_FLOOR = 1e-6  # darkest transmitted light; its optical density is concentration unit 1
_LOG_FLOOR = float(np.log(_FLOOR))


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB in [0, 1] -> ``(..., 3)`` H, E, DAB concentrations (not clipped at 0)."""
    od = np.log(np.maximum(rgb, _FLOOR)) / _LOG_FLOOR
    return np.asarray(od @ HED_FROM_RGB)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """``(..., 3)`` H, E, DAB concentrations -> RGB in [0, 1] (the inverse of :func:`rgb_to_hed`)."""
    return np.asarray(np.clip(np.exp(_LOG_FLOOR * (hed @ RGB_FROM_HED)), 0.0, 1.0))


def stain_jitter(
    rgb: np.ndarray, scale: tuple[float, float] = (1.0, 1.0), shift: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """RGB in [0, 1] with the H and E concentrations ``c`` replaced by ``c * scale + shift``."""
    hed = rgb_to_hed(rgb)
    for k in (0, 1):
        hed[..., k] = hed[..., k] * scale[k] + shift[k]
    return hed_to_rgb(hed)
