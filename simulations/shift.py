"""Shift simulator: turn one labelled image pool into N hospital sites.

Each site gets its own disease prevalence (label shift), its own size (quantity skew) and its
own scanner profile (domain shift: gamma, contrast, offset, blur, noise, resolution; for colour
images also per-channel gamma and gain and an H&E stain jitter). Images are drawn without
replacement, so no image appears at two sites.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy.ndimage import gaussian_filter

from fedshift.common.data import SPLITS, Dataset, ImageSet
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.patient_split import check_fractions, group_labels, split_groups
from fedshift.common.stain import stain_jitter

logger = logging.getLogger(__name__)

MIN_SITE_IMAGES = 20

# Short names of the profile parameters, used in tables ("low-dose (noise=0.06)").
_PARAM_LABELS = {
    "gamma": "gamma",
    "contrast": "contrast",
    "offset": "offset",
    "blur_sigma": "blur",
    "noise_std": "noise",
    "resolution": "res",
}
_COLOUR_FIELDS = ("channel_gamma", "channel_gain", "stain_scale", "stain_shift")


@dataclass(frozen=True)
class ScannerProfile:
    """A scanner's intensity and sharpness characteristics, applied to [0, 1] images."""

    name: str  # preset name shown in reports, e.g. "low-dose"
    gamma: float = 1.0  # intensity gamma, x -> x**gamma on [0, 1]
    contrast: float = 1.0  # (x - 0.5) * contrast + 0.5
    offset: float = 0.0  # additive intensity offset on [0, 1] scale
    blur_sigma: float = 0.0  # gaussian blur sigma in pixels
    noise_std: float = 0.0  # additive gaussian noise std on [0, 1] scale
    resolution: float = 1.0  # in (0, 1]: downsample to round(H * resolution), then back up
    # colour images only
    channel_gamma: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per RGB channel, x -> x**gamma
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per RGB channel, x -> x * gain
    stain_scale: tuple[float, float] = (1.0, 1.0)  # H and E concentrations, c -> c * scale + shift
    stain_shift: tuple[float, float] = (0.0, 0.0)  # (HED augmentation, Tellez et al. 2018)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(
                f"Expected ScannerProfile.name to be a non-empty string, but got {self.name!r}; "
                "name the profile, e.g. 'low-dose'"
            )
        checks = {
            "gamma": (lambda v: v > 0, "> 0", 1.0),
            "contrast": (lambda v: v > 0, "> 0", 1.0),
            "offset": (lambda v: True, "finite", 0.0),
            "blur_sigma": (lambda v: v >= 0, ">= 0", 0.0),
            "noise_std": (lambda v: v >= 0, ">= 0", 0.0),
            "resolution": (lambda v: 0 < v <= 1, "in (0, 1]", 1.0),
        }
        for field, (rule, text, default) in checks.items():
            value = getattr(self, field)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value) or not rule(value):
                raise ConfigError(
                    f"Expected {field} of scanner profile '{self.name}' to be a number {text}, "
                    f"but got {value!r}; use e.g. {default} (no change)"
                )
        self._check_colour()

    def _check_colour(self) -> None:
        rules = {
            "channel_gamma": (3, lambda v: v > 0, "> 0", "(1, 1, 1)"),
            "channel_gain": (3, lambda v: v > 0, "> 0", "(1, 1, 1)"),
            "stain_scale": (2, lambda v: v > 0, "> 0", "(1, 1)"),
            "stain_shift": (2, lambda v: True, "finite", "(0, 0)"),
        }
        for field, (length, rule, text, default) in rules.items():
            value = getattr(self, field)
            ok = isinstance(value, tuple) and len(value) == length
            ok = ok and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and rule(v)
                for v in value
            )
            if not ok:
                raise ConfigError(
                    f"Expected {field} of scanner profile '{self.name}' to be {length} numbers {text}, "
                    f"but got {value!r}; use e.g. {default} (no change)"
                )

    @property
    def colour(self) -> bool:
        """Whether the profile changes colour (per-channel gamma or gain, stain): for RGB images only."""
        return any(getattr(self, f.name) != f.default for f in fields(self) if f.name in _COLOUR_FIELDS)

    def changed(self) -> dict[str, float | list[float]]:
        """The parameters that differ from the identity profile."""
        return {
            f.name: [float(v) for v in value] if isinstance(value, tuple) else float(value)
            for f in fields(self)
            if f.name != "name" and (value := getattr(self, f.name)) != f.default
        }

    def describe(self) -> str:
        """E.g. ``"low-dose (noise=0.06)"`` or ``"stain-a (H x1.2, E x0.8)"``; the name alone for identity."""
        parts = []
        for key, value in self.changed().items():
            if not isinstance(value, list):
                parts.append(f"{_PARAM_LABELS[key]}={value:g}")
            elif key == "stain_scale":
                parts += [f"{s} x{v:g}" for s, v in zip("HE", value, strict=True) if v != 1]
            elif key == "stain_shift":
                parts += [f"{s} {v:+g}" for s, v in zip("HE", value, strict=True) if v != 0]
            else:
                parts.append(f"{key.split('_')[1]} RGB " + "/".join(f"{v:g}" for v in value))
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Transform ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB uint8 images; uint8 out, clipped to [0, 255].

        Order: resolution, blur, (RGB: stain jitter, per-channel gamma, per-channel gain), gamma,
        contrast, offset, noise, clip, round.
        """
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if not (images.ndim == 3 or rgb) or images.dtype != np.uint8:
            raise DataError(
                f"Expected images to be a (N, H, W) or (N, H, W, 3) uint8 array, but got shape "
                f"{images.shape} and dtype {images.dtype}; load them with fedshift.common.data"
            )
        if self.colour and not rgb:
            raise ConfigError(
                f"Expected RGB images for the colour scanner profile '{self.describe()}', but got grey "
                "images; use grey profiles (DEFAULT_PROFILES) for grey data"
            )
        x = images.astype(np.float64) / 255.0
        if self.resolution < 1.0 and x.size:
            x = _resample(x, self.resolution) if not rgb else _resample_rgb(x, self.resolution)
        if self.blur_sigma > 0:
            sigma = (0.0, self.blur_sigma, self.blur_sigma)
            x = gaussian_filter(x, sigma=sigma if not rgb else (*sigma, 0.0))
        if rgb:
            x = self._colour(x)
        if self.gamma != 1.0:
            x = np.clip(x, 0.0, 1.0) ** self.gamma
        if self.contrast != 1.0:
            x = (x - 0.5) * self.contrast + 0.5
        if self.offset != 0.0:
            x = x + self.offset
        if self.noise_std > 0:
            x = x + rng.normal(0.0, self.noise_std, size=x.shape)
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def _colour(self, x: np.ndarray) -> np.ndarray:
        """Stain jitter, per-channel gamma and per-channel gain of ``(N, H, W, 3)`` RGB in [0, 1]."""
        if self.stain_scale != (1.0, 1.0) or self.stain_shift != (0.0, 0.0):
            x = stain_jitter(np.clip(x, 0.0, 1.0), self.stain_scale, self.stain_shift)
        if self.channel_gamma != (1.0, 1.0, 1.0):
            x = np.clip(x, 0.0, 1.0) ** np.asarray(self.channel_gamma, dtype=np.float64)
        if self.channel_gain != (1.0, 1.0, 1.0):
            x = x * np.asarray(self.channel_gain, dtype=np.float64)
        return x


def _resample_rgb(x: np.ndarray, resolution: float) -> np.ndarray:
    """:func:`_resample` of every channel of ``(N, H, W, 3)`` images."""
    n, h, w, c = x.shape
    planes = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n * c, h, w)
    return _resample(planes, resolution).reshape(n, c, h, w).transpose(0, 2, 3, 1)


def _resample(x: np.ndarray, resolution: float) -> np.ndarray:
    """Down to ``round(H * resolution)`` (antialiased bilinear), then back up (bilinear)."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[1:]
    low = (max(1, round(h * resolution)), max(1, round(w * resolution)))
    t = torch.from_numpy(x).unsqueeze(1)
    t = F.interpolate(t, size=low, mode="bilinear", antialias=True, align_corners=False)
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t.squeeze(1).numpy()


DEFAULT_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("reference"),
    ScannerProfile("low-dose", noise_std=0.06),
    ScannerProfile("soft-kernel", blur_sigma=1.0),
    ScannerProfile("high-contrast", contrast=1.4),
    ScannerProfile("old-detector", resolution=0.5, gamma=1.3),
    ScannerProfile("bright-offset", offset=0.08, contrast=0.9),
)


# Scanners and prevalences of the hospitals outside the federation (plan_sites' ``unseen``): no trained
# site has these scanners, and the prevalences lie between the trained sites' default ones.
UNSEEN_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("other-vendor", gamma=0.8, blur_sigma=0.6, noise_std=0.03),
    ScannerProfile("portable", resolution=0.6, noise_std=0.05, offset=-0.05),
    ScannerProfile("legacy-film", contrast=0.75, gamma=1.2, blur_sigma=1.5),
)
UNSEEN_PREVALENCES: tuple[float, ...] = (0.3, 0.7, 0.5)

# The colour analogues, for RGB data (H&E pathology, dermoscopy, fundus): stain and camera differences.
COLOUR_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("reference"),
    ScannerProfile("stain-a", stain_scale=(1.2, 0.8)),
    ScannerProfile("stain-b", stain_scale=(0.8, 1.2), stain_shift=(0.0, 0.01)),
    ScannerProfile("warm-camera", channel_gain=(1.08, 1.0, 0.9), channel_gamma=(0.9, 1.0, 1.1)),
    ScannerProfile("faded-soft", stain_scale=(0.75, 0.9), blur_sigma=0.8),
    ScannerProfile("low-res-dark", stain_scale=(1.15, 1.25), resolution=0.5, noise_std=0.03),
)
UNSEEN_COLOUR_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("other-lab", stain_scale=(1.3, 0.7), stain_shift=(0.01, -0.005), noise_std=0.02),
    ScannerProfile("cool-scanner", channel_gain=(0.9, 1.0, 1.1), resolution=0.6),
    ScannerProfile("over-stained", stain_scale=(1.4, 1.3), blur_sigma=1.0),
)


def default_profiles(channels: int) -> tuple[tuple[ScannerProfile, ...], tuple[ScannerProfile, ...]]:
    """The trained and the unseen sites' scanner profiles for images with ``channels`` (1 or 3)."""
    return (COLOUR_PROFILES, UNSEEN_COLOUR_PROFILES) if channels == 3 else (DEFAULT_PROFILES, UNSEEN_PROFILES)


UNSEEN_PREFIX = "unseen-"


@dataclass(frozen=True)
class SiteSpec:
    """What one simulated hospital gets."""

    name: str  # "site-0", ...
    prevalence: float  # target fraction of label 1 (binary)
    n: int  # total images at the site (before its train/val/test split)
    profile: ScannerProfile  # the site's scanner

    def __post_init__(self) -> None:
        if not math.isfinite(self.prevalence) or not 0.0 <= self.prevalence <= 1.0:
            raise ConfigError(
                f"Expected the prevalence of {self.name} to be in [0, 1], but got "
                f"{self.prevalence!r}; pass a fraction of positive images"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ConfigError(
                f"Expected the size of {self.name} to be a non-negative integer, but got "
                f"{self.n!r}; pass a whole number of images"
            )


def _check_fraction_list(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    bad = [v for v in arr.tolist() if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ConfigError(
            f"Expected every {what} to be in [0, 1], but got {bad[0]!r}; pass fractions such as 0.1,0.5,0.9"
        )
    return arr


def _site_counts(n: int, p: float) -> tuple[int, int]:
    """(negatives, positives) of a site with ``n`` images and prevalence ``p``."""
    pos = round(n * p)
    return n - pos, pos


def _check_plan(
    num_sites: int,
    counts: Sequence[int],
    prevalences: Sequence[float] | None,
    dirichlet_alpha: float | None,
    quantity_skew: float,
    max_per_site: int | None,
) -> None:
    """Refuse a site plan that cannot be made, naming the value."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(
            f"Expected --sites to be a positive integer, but got {num_sites!r}; pass e.g. --sites 4"
        )
    if len(counts) != 2:
        raise ConfigError(
            f"Expected a binary-labelled pool (2 classes), but got {len(counts)} classes; "
            "the shift simulator supports binary labels only for now: map labels to 0/1"
        )
    if min(counts) < 0:
        raise ConfigError(f"Expected non-negative pool_counts, but got {list(counts)}; pass class counts")
    if prevalences is not None and dirichlet_alpha is not None:
        raise ConfigError(
            "Expected either explicit prevalences or a Dirichlet alpha, but got both; drop one of them"
        )
    if isinstance(quantity_skew, bool) or not math.isfinite(quantity_skew) or quantity_skew < 0:
        raise ConfigError(
            f"Expected quantity_skew to be >= 0, but got {quantity_skew!r}; use 0 for equal sizes"
        )
    if max_per_site is not None and (
        isinstance(max_per_site, bool) or not isinstance(max_per_site, int) or max_per_site < 1
    ):
        raise ConfigError(
            f"Expected max_per_site to be a positive integer, but got {max_per_site!r}; "
            "pass e.g. 500 or leave it unset"
        )


def _prevalences(
    num_sites: int,
    prevalences: Sequence[float] | None,
    dirichlet_alpha: float | None,
    label_seq: np.random.SeedSequence,
) -> np.ndarray:
    """Each site's prevalence: the given ones, Beta(alpha, alpha) draws, or evenly from 0.2 to 0.8."""
    if prevalences is not None:
        if len(prevalences) != num_sites:
            raise ConfigError(
                f"Expected {num_sites} prevalences (one per site), but got {len(prevalences)} "
                f"({list(prevalences)}); pass one prevalence per site"
            )
        return _check_fraction_list(prevalences, "prevalence")
    if dirichlet_alpha is not None:
        if not math.isfinite(dirichlet_alpha) or dirichlet_alpha <= 0:
            raise ConfigError(
                f"Expected the Dirichlet alpha to be > 0, but got {dirichlet_alpha!r}; "
                "use e.g. 0.5 (strong label shift) or 10 (mild)"
            )
        alpha = float(dirichlet_alpha)
        return np.random.default_rng(label_seq).beta(alpha, alpha, num_sites)
    return np.linspace(0.2, 0.8, num_sites) if num_sites > 1 else np.array([0.5])


def _site_sizes(
    counts: Sequence[int], prev_arr: np.ndarray, weights: np.ndarray, max_per_site: int | None
) -> list[int]:
    """Sizes at the largest common scale such that no class is over-drawn, capped at ``max_per_site``."""
    prev = [float(p) for p in prev_arr]
    total = float(sum(counts))
    scale = total
    reason = ""
    demands = (float(np.sum(weights * (1 - prev_arr))), float(np.sum(weights * prev_arr)))
    for c, demand in enumerate(demands):
        if demand > 0 and counts[c] / demand < scale:
            scale, reason = counts[c] / demand, f"class {c} has only {counts[c]} images"
    if max_per_site is not None and max_per_site / weights.max() < scale:
        scale, reason = max_per_site / float(weights.max()), f"max_per_site={max_per_site}"
    sizes = [math.floor(scale * w + 1e-9) for w in weights]
    if max_per_site is not None:
        sizes = [min(s, max_per_site) for s in sizes]
    # Rounding of per-site positives can over-draw a class by a few images: trim the largest site.
    for c in (0, 1):
        while sum(_site_counts(n, p)[c] for n, p in zip(sizes, prev, strict=True)) > counts[c]:
            k = max(range(len(sizes)), key=lambda i: _site_counts(sizes[i], prev[i])[c])
            sizes[k] -= 1
    if sum(sizes) < total:
        logger.info(
            "Scaled sites down to %d of %d pool images (%s); sizes %s",
            sum(sizes),
            int(total),
            reason or "rounding",
            sizes,
        )
    return sizes


def plan_sites(
    num_sites: int,
    *,
    prevalences: Sequence[float] | None = None,
    dirichlet_alpha: float | None = None,
    quantity_skew: float = 0.0,
    profiles: Sequence[ScannerProfile] | None = None,
    pool_counts: Sequence[int],
    max_per_site: int | None = None,
    seed: int = 0,
    unseen: int = 0,
    unseen_profiles: Sequence[ScannerProfile] = UNSEEN_PROFILES,
) -> list[SiteSpec]:
    """Choose prevalence, size and scanner of every site, feasible for the pool's class counts.

    Sizes use as much of the pool as the label shift allows (largest common scale such that no
    class is over-drawn), capped at ``max_per_site``. ``unseen`` more sites follow, ``unseen-0``, ...:
    hospitals that never train, each with a scanner no trained site has (``unseen_profiles``)
    and its own prevalence (:data:`UNSEEN_PREVALENCES`), sized like an average site. They are planned
    with the trained sites from one pool, so the trained sites keep their prevalences and scanners but
    get a smaller share of the images (``unseen=0`` plans them as the other experiments do).
    """
    counts = [int(c) for c in pool_counts]
    _check_plan(num_sites, counts, prevalences, dirichlet_alpha, quantity_skew, max_per_site)
    if isinstance(unseen, bool) or not isinstance(unseen, int) or unseen < 0:
        raise ConfigError(f"Expected --unseen-sites to be an integer >= 0, but got {unseen!r}; pass e.g. 1")
    label_seq, size_seq = np.random.SeedSequence(seed).spawn(2)
    prev_arr = _prevalences(num_sites, prevalences, dirichlet_alpha, label_seq)
    if quantity_skew > 0:
        weights = np.random.default_rng(size_seq).lognormal(0.0, quantity_skew, num_sites)
    else:
        weights = np.ones(num_sites)
    weights = np.concatenate([weights, np.full(unseen, weights.mean())])
    weights = weights / weights.sum()
    extra = [UNSEEN_PREVALENCES[j % len(UNSEEN_PREVALENCES)] for j in range(unseen)]
    prev_arr = np.concatenate([prev_arr, extra])
    prev = [float(p) for p in prev_arr]
    sizes = _site_sizes(counts, prev_arr, weights, max_per_site)
    names = [f"site-{k}" for k in range(num_sites)] + [f"{UNSEEN_PREFIX}{j}" for j in range(unseen)]
    small = [(names[k], n) for k, n in enumerate(sizes) if n < MIN_SITE_IMAGES]
    if small:
        name, n = small[0]
        raise ConfigError(
            f"Expected every site to get at least {MIN_SITE_IMAGES} images, but {name} gets {n} "
            f"(pool: {counts[0]} class-0 and {counts[1]} class-1 images for {len(names)} sites, "
            f"prevalences {np.round(prev_arr, 2).tolist()}); use fewer --sites, a smaller quantity "
            "skew, milder label shift or a larger dataset"
        )
    chosen = list(profiles) if profiles is not None else list(DEFAULT_PROFILES)
    if not chosen or not all(isinstance(p, ScannerProfile) for p in chosen):
        raise ConfigError(
            "Expected profiles to be a non-empty sequence of ScannerProfile, but got "
            f"{profiles!r}; pass e.g. DEFAULT_PROFILES"
        )
    scanners = [chosen[k % len(chosen)] for k in range(num_sites)]
    scanners += [unseen_profiles[j % len(unseen_profiles)] for j in range(unseen)]
    return [
        SiteSpec(name=names[k], prevalence=prev[k], n=int(sizes[k]), profile=scanners[k])
        for k in range(len(names))
    ]


@dataclass(frozen=True)
class SimulatedSite:
    """One simulated hospital: its plan and its (shifted) data."""

    spec: SiteSpec  # what was asked for
    data: Dataset  # splits train/val/test, already passed through the site's scanner profile


def _split_counts(m: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``m`` items; every split with a positive fraction gets at
    least one item when ``m >= 3``."""
    raw = [m * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: m - sum(counts)]:
        counts[i] += 1
    if m >= 3:
        for i, f in enumerate(fractions):
            if f > 0 and counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _site_splits(
    pool: ImageSet,
    spec: SiteSpec,
    idx: np.ndarray,
    got: Sequence[int],
    fractions: Sequence[float],
    seq: np.random.SeedSequence,
) -> dict[str, ImageSet]:
    """The site's images ``idx`` (negatives, then positives) through its scanner, split stratified (at
    patient level when the pool has patients with several images)."""
    # Separate streams, so a site's split does not depend on whether its scanner adds noise.
    profile_seq, split_seq = seq.spawn(2)
    site_rng = np.random.default_rng(split_seq)
    patients = None if pool.patients is None else pool.patients[idx].copy()
    shifted = ImageSet(
        images=spec.profile.apply(pool.images[idx], np.random.default_rng(profile_seq)),
        labels=pool.labels[idx].copy(),
        patients=patients,
    )
    if patients is not None and _grouped(patients):  # a patient's images stay in one split
        index = split_groups(shifted.labels, patients, fractions, site_rng)
        return {
            s: shifted.subset(site_rng.permutation(np.flatnonzero(index == i)))
            for i, (s, f) in enumerate(zip(SPLITS, fractions, strict=True))
            if f > 0
        }
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    start = 0
    for c in (0, 1):
        local = np.arange(start, start + got[c])
        start += got[c]
        local = site_rng.permutation(local)
        offset = 0
        for s, m in zip(SPLITS, _split_counts(got[c], fractions), strict=True):
            parts[s].append(local[offset : offset + m])
            offset += m
    return {
        s: shifted.subset(site_rng.permutation(np.concatenate(parts[s])))
        for s, f in zip(SPLITS, fractions, strict=True)
        if f > 0
    }


def _grouped(patients: np.ndarray) -> bool:
    """Whether some patient has several images (else each image is its own patient)."""
    return len(np.unique(patients)) < len(patients)


def _units(pool: ImageSet) -> tuple[np.ndarray | None, np.ndarray]:
    """What sites draw: patients (each image's patient index, and each patient's majority label) when some
    patient has several images; else images (``None``, the image labels)."""
    if pool.patients is None or not _grouped(pool.patients):
        return None, pool.labels
    names, inverse = np.unique(pool.patients, return_inverse=True)
    majority = group_labels(pool.labels, pool.patients)
    return inverse, np.asarray([majority[str(n)] for n in names], dtype=np.int64)


def _units_for(queue: np.ndarray, want: int, units: np.ndarray | None) -> int:
    """How many units from the front of ``queue`` give ``want`` images (whole patients: at least ``want``
    when the queue holds them)."""
    if units is None or want == 0:
        return min(want, len(queue))
    sizes = np.bincount(units)[queue]
    return min(int(np.searchsorted(np.cumsum(sizes), want)) + 1, len(queue))


def simulate_sites(
    pool: ImageSet,
    specs: Sequence[SiteSpec],
    *,
    class_names: tuple[str, ...],
    source: str,
    synthetic: bool,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> list[SimulatedSite]:
    """Draw disjoint images for every site, apply its scanner and split it (stratified). A pool with patient
    ids draws and splits whole patients: a patient is at one site, in one split."""
    fractions = check_fractions(split_fractions)
    if not specs:
        raise ConfigError("Expected at least one site spec, but got none; build them with plan_sites")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"Expected unique site names, but got {names}; rename the sites")
    if len(class_names) != 2 or (len(pool) and int(pool.labels.max()) > 1):
        raise ConfigError(
            "Expected a binary-labelled pool (2 classes), but got class names "
            f"{list(class_names)} and labels up to {int(pool.labels.max()) if len(pool) else 0}; "
            "the shift simulator supports binary labels only for now: map labels to 0/1"
        )
    rng = np.random.default_rng(seed)
    units, unit_labels = _units(pool)
    queues = [rng.permutation(np.flatnonzero(unit_labels == c)) for c in (0, 1)]
    taken = [0, 0]
    sites: list[SimulatedSite] = []
    for k, spec in enumerate(specs):
        want = _site_counts(spec.n, spec.prevalence)
        count = [_units_for(queues[c][taken[c] :], want[c], units) for c in (0, 1)]
        per_class = [queues[c][taken[c] : taken[c] + count[c]] for c in (0, 1)]
        taken = [taken[c] + count[c] for c in (0, 1)]
        if units is not None:  # patients: every image of each drawn patient, by the patient's class
            per_class = [np.flatnonzero(np.isin(units, drawn)) for drawn in per_class]
        got = [len(drawn) for drawn in per_class]
        if got != list(want) and (units is None or any(taken[c] == len(queues[c]) for c in (0, 1))):
            logger.warning(
                "%s: pool exhausted, drew %d/%d negatives and %d/%d positives",
                spec.name,
                got[0],
                want[0],
                got[1],
                want[1],
            )
        idx = np.concatenate(per_class)
        splits = _site_splits(pool, spec, idx, got, fractions, np.random.SeedSequence([seed, k]))
        data = Dataset(splits=splits, class_names=class_names, source=source, synthetic=synthetic)
        sites.append(SimulatedSite(spec=spec, data=data))
        logger.info(
            "%s: %d images (%d positive), profile %s",
            spec.name,
            len(idx),
            got[1],
            spec.profile.describe(),
        )
    return sites


def site_summary(site: SimulatedSite) -> dict[str, object]:
    """JSON-able facts about a site, for reports."""
    data = site.data
    pooled = data.pooled()
    counts = pooled.class_counts(data.num_classes)
    total = int(counts.sum())
    return {
        "site": site.spec.name,
        "n": {s: len(v) for s, v in data.splits.items()},
        "n_total": total,
        "class_counts": {name: int(c) for name, c in zip(data.class_names, counts, strict=True)},
        "target_prevalence": float(site.spec.prevalence),
        "prevalence": float(counts[1] / total) if total else None,
        "profile": site.spec.profile.name,
        "profile_params": site.spec.profile.changed(),
        "profile_label": site.spec.profile.describe(),
        "source": data.label,
        "synthetic": bool(data.synthetic),
    }


def format_site_table(sites: Sequence[SimulatedSite]) -> str:
    """Plain-text table: site, n train/val/test, realised prevalence, scanner profile."""
    header = ("site", "train", "val", "test", "prevalence", "profile")
    rows = []
    for site in sites:
        counts = site.data.pooled().class_counts(site.data.num_classes)
        total = int(counts.sum())
        rows.append(
            (
                site.spec.name,
                *(str(len(site.data.splits[s])) if s in site.data.splits else "0" for s in SPLITS),
                f"{counts[1] / total:.3f}" if total else "n/a",
                site.spec.profile.describe(),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    synthetic = sorted({s.data.source for s in sites if s.data.synthetic})
    if synthetic:
        joined = ", ".join(synthetic)
        lines.append(f"SYNTHETIC data ({joined}): generated images, not real patients")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)
