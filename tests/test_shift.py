"""Tests for fedshift.simulations.shift: scanner profiles, site planning and simulation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from fedshift.common.data import CLASS_NAMES_BINARY, ImageSet
from fedshift.common.errors import ConfigError
from fedshift.simulations.shift import (
    DEFAULT_PROFILES,
    ScannerProfile,
    SimulatedSite,
    SiteSpec,
    format_site_table,
    plan_sites,
    simulate_sites,
    site_summary,
)

RAMP = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
IDENTITY = ScannerProfile("identity")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _expected(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1], scale to 0..255 and round, like ScannerProfile.apply."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _signature_pool(n_neg: int, n_pos: int, size: int = 6, seed: int = 0) -> ImageSet:
    """A pool where pixels (0,0),(0,1) encode the image index and (0,2) its label."""
    n = n_neg + n_pos
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    idx = np.arange(n)
    images[:, 0, 0] = idx // 256
    images[:, 0, 1] = idx % 256
    labels = rng.permutation(np.r_[np.zeros(n_neg), np.ones(n_pos)]).astype(np.int64)
    images[:, 0, 2] = labels * 255
    return ImageSet(images=images, labels=labels)


def _decode(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0].astype(np.int64) * 256 + images[:, 0, 1]


# ----------------------------------------------------------------------------- profiles


def test_identity_and_resolution_one_are_exact() -> None:
    images = _rng().integers(0, 256, size=(3, 9, 7), dtype=np.uint8)
    np.testing.assert_array_equal(IDENTITY.apply(images, _rng()), images)
    np.testing.assert_array_equal(DEFAULT_PROFILES[0].apply(images, _rng()), images)
    assert DEFAULT_PROFILES[0].name == "reference"
    np.testing.assert_array_equal(ScannerProfile("r", resolution=1.0).apply(images, _rng()), images)


@pytest.mark.parametrize(
    ("profile", "formula"),
    [
        (ScannerProfile("g", gamma=2.2), lambda x: x**2.2),
        (ScannerProfile("g", gamma=0.5), lambda x: x**0.5),
        (ScannerProfile("c", contrast=1.5), lambda x: (x - 0.5) * 1.5 + 0.5),
        (ScannerProfile("c", contrast=0.7), lambda x: (x - 0.5) * 0.7 + 0.5),
        (ScannerProfile("o", offset=0.1), lambda x: x + 0.1),
        (ScannerProfile("o", offset=-0.2), lambda x: x - 0.2),
        (
            ScannerProfile("all", gamma=2.0, contrast=1.2, offset=0.05),
            lambda x: (x**2.0 - 0.5) * 1.2 + 0.5 + 0.05,
        ),
    ],
)
def test_intensity_transforms_match_closed_form(profile: ScannerProfile, formula: object) -> None:
    assert callable(formula)
    out = profile.apply(RAMP, _rng())
    np.testing.assert_array_equal(out, _expected(formula(RAMP / 255.0)))


def test_gamma_spot_values() -> None:
    out = ScannerProfile("g", gamma=2.0).apply(np.array([[[0, 51, 128, 255]]], np.uint8), _rng())
    # 51/255 = 0.2 -> 0.04 -> 10.2 -> 10;  128/255 -> 0.25197... -> 64.25 -> 64
    np.testing.assert_array_equal(out, [[[0, 10, 64, 255]]])


def test_noise_std_is_measured_within_ten_percent() -> None:
    const = np.full((1, 256, 256), 128, np.uint8)
    out = ScannerProfile("n", noise_std=0.05).apply(const, _rng(1)).astype(np.float64) / 255.0
    assert abs(out.std() - 0.05) < 0.005
    assert abs(out.mean() - 128 / 255) < 0.002
    again = ScannerProfile("n", noise_std=0.05).apply(const, _rng(1))
    np.testing.assert_array_equal(again, _expected(out))  # same rng seed, same noise
    assert not np.array_equal(ScannerProfile("n", noise_std=0.05).apply(const, _rng(2)), again)


def test_blur_preserves_mean_and_smooths() -> None:
    images = _rng().integers(60, 200, size=(2, 64, 64), dtype=np.uint8)
    out = ScannerProfile("b", blur_sigma=1.5).apply(images, _rng())
    for a, b in zip(images, out, strict=True):
        assert abs(float(b.mean()) - float(a.mean())) < 0.5
        assert b.std() < 0.5 * a.std()
    const = np.full((1, 20, 20), 77, np.uint8)
    np.testing.assert_array_equal(ScannerProfile("b", blur_sigma=2.0).apply(const, _rng()), const)


def test_low_resolution_averages_fine_detail() -> None:
    checker = ((np.indices((32, 32)).sum(axis=0) % 2) * 255).astype(np.uint8)[None]
    out = ScannerProfile("r", resolution=0.5).apply(checker, _rng()).astype(np.float64)
    assert out.shape == (1, 32, 32)
    # Antialiased 2x downsampling of a 1-pixel checkerboard gives its mean, 127.5, inside.
    assert np.all(np.abs(out[0, 4:-4, 4:-4] - 127.5) <= 1.0)
    const = np.full((2, 28, 28), 90, np.uint8)
    np.testing.assert_array_equal(ScannerProfile("r", resolution=0.3).apply(const, _rng()), const)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", 0.0),
        ("gamma", -1.0),
        ("contrast", 0.0),
        ("blur_sigma", -0.5),
        ("noise_std", -0.01),
        ("resolution", 0.0),
        ("resolution", 1.5),
        ("offset", math.nan),
    ],
)
def test_invalid_profile_values(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"Expected {field} of scanner profile 'bad'"):
        ScannerProfile("bad", **{field: value})  # type: ignore[arg-type]


def test_default_profiles_and_describe() -> None:
    names = [p.name for p in DEFAULT_PROFILES]
    assert len(names) >= 6 and len(set(names)) == len(names)
    assert DEFAULT_PROFILES[0].changed() == {}
    assert all(p.changed() for p in DEFAULT_PROFILES[1:])
    assert ScannerProfile("low-dose", noise_std=0.08).describe() == "low-dose (noise=0.08)"
    assert ScannerProfile("reference").describe() == "reference"


# ----------------------------------------------------------------------------- planning


def _class_use(specs: list[SiteSpec]) -> tuple[int, int]:
    pos = sum(round(s.n * s.prevalence) for s in specs)
    return sum(s.n for s in specs) - pos, pos


def test_plan_explicit_prevalences() -> None:
    specs = plan_sites(3, prevalences=[0.1, 0.5, 0.9], pool_counts=[1000, 1000])
    assert [s.name for s in specs] == ["site-0", "site-1", "site-2"]
    assert [s.prevalence for s in specs] == [0.1, 0.5, 0.9]
    assert [s.n for s in specs] == [666, 666, 666]  # floor(2000 / 3): both classes fit exactly
    assert [s.profile.name for s in specs] == [p.name for p in DEFAULT_PROFILES[:3]]
    neg, pos = _class_use(specs)
    assert neg <= 1000 and pos <= 1000


def test_plan_default_prevalences_are_evenly_spread() -> None:
    specs = plan_sites(4, pool_counts=[500, 500])
    np.testing.assert_allclose([s.prevalence for s in specs], [0.2, 0.4, 0.6, 0.8])
    specs7 = plan_sites(7, pool_counts=[500, 500])
    assert specs7[6].profile.name == "reference"  # profiles cycle


def test_plan_dirichlet_is_seeded() -> None:
    a = plan_sites(5, dirichlet_alpha=0.5, pool_counts=[3000, 3000], seed=3)
    b = plan_sites(5, dirichlet_alpha=0.5, pool_counts=[3000, 3000], seed=3)
    c = plan_sites(5, dirichlet_alpha=0.5, pool_counts=[3000, 3000], seed=4)
    assert a == b
    assert [s.prevalence for s in a] != [s.prevalence for s in c]
    assert all(0.0 <= s.prevalence <= 1.0 for s in a)
    expected = np.random.default_rng(np.random.SeedSequence(3).spawn(2)[0]).beta(0.5, 0.5, 5)
    np.testing.assert_allclose([s.prevalence for s in a], expected)


def test_quantity_skew() -> None:
    equal = plan_sites(4, quantity_skew=0.0, pool_counts=[2000, 2000])
    assert len({s.n for s in equal}) == 1
    skewed = plan_sites(4, quantity_skew=1.0, pool_counts=[2000, 2000], seed=1)
    sizes = [s.n for s in skewed]
    assert max(sizes) > 1.5 * min(sizes)
    assert plan_sites(4, quantity_skew=1.0, pool_counts=[2000, 2000], seed=1) == skewed


@pytest.mark.parametrize("seed", range(8))
def test_feasibility_never_exceeds_pool(seed: int) -> None:
    counts = [300 + 200 * seed, 2500 - 250 * seed]
    specs = plan_sites(5, dirichlet_alpha=1.0, quantity_skew=0.5, pool_counts=counts, seed=seed)
    neg, pos = _class_use(specs)
    assert neg <= counts[0] and pos <= counts[1]
    # Largest common scale: one class is (almost) used up.
    assert max(neg - counts[0], pos - counts[1]) >= -2 * len(specs)


def test_max_per_site_caps_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedshift.simulations.shift"):
        specs = plan_sites(3, pool_counts=[5000, 5000], max_per_site=100)
    assert [s.n for s in specs] == [100, 100, 100]
    assert "Scaled sites down to 300 of 10000" in caplog.text


def test_plan_errors() -> None:
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"Expected --sites to be a positive integer, but got {bad}"):
            plan_sites(bad, pool_counts=[100, 100])
    with pytest.raises(ConfigError, match="binary"):
        plan_sites(2, pool_counts=[100, 100, 100])
    with pytest.raises(ConfigError, match=r"Expected 3 prevalences"):
        plan_sites(3, prevalences=[0.5, 0.5], pool_counts=[100, 100])
    with pytest.raises(ConfigError, match=r"in \[0, 1\], but got 1.2"):
        plan_sites(2, prevalences=[0.5, 1.2], pool_counts=[100, 100])
    with pytest.raises(ConfigError, match=r"at least 20 images.*site-0 gets 12"):
        plan_sites(4, prevalences=[0.5] * 4, pool_counts=[25, 25])


# ----------------------------------------------------------------------------- simulation


def _simulate(
    pool: ImageSet,
    specs: list[SiteSpec],
    seed: int = 0,
    synthetic: bool = True,
) -> list[SimulatedSite]:
    return simulate_sites(
        pool, specs, class_names=CLASS_NAMES_BINARY, source="pool", synthetic=synthetic, seed=seed
    )


def test_simulate_disjoint_prevalence_and_stratified_splits() -> None:
    pool = _signature_pool(400, 500)
    specs = plan_sites(
        4,
        prevalences=[0.1, 0.35, 0.6, 0.9],
        quantity_skew=0.6,
        profiles=[IDENTITY],
        pool_counts=pool.class_counts(2).tolist(),
        seed=2,
    )
    sites = _simulate(pool, specs)
    seen: list[np.ndarray] = []
    for site in sites:
        spec = site.spec
        assert sorted(site.data.splits) == ["test", "train", "val"]
        pooled = site.data.pooled()
        ids = _decode(pooled.images)
        seen.append(ids)
        # Every image keeps its own label and its own pixels (identity profile).
        np.testing.assert_array_equal(pool.labels[ids], pooled.labels)
        np.testing.assert_array_equal(pool.images[ids], pooled.images)
        assert len(pooled) == spec.n
        positives = int(pooled.labels.sum())
        assert positives == round(spec.n * spec.prevalence)
        assert abs(positives / spec.n - spec.prevalence) <= 1 / spec.n
        for c in (0, 1):
            m = int(np.sum(pooled.labels == c))
            for name, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2), strict=True):
                got = int(np.sum(site.data.split(name).labels == c))
                assert abs(got - m * frac) <= 1
                if m >= 3:
                    assert got >= 1
        for name, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2), strict=True):
            assert abs(len(site.data.split(name)) - spec.n * frac) <= 2
    all_ids = np.concatenate(seen)
    assert len(np.unique(all_ids)) == len(all_ids)  # no image used twice


def test_simulate_applies_profile_and_is_reproducible() -> None:
    pool = _signature_pool(300, 300)
    plain = plan_sites(3, profiles=[IDENTITY], pool_counts=[300, 300])
    offset = ScannerProfile("bright", offset=0.1)
    bright = [SiteSpec(s.name, s.prevalence, s.n, offset) for s in plain]
    base, shifted = _simulate(pool, plain), _simulate(pool, bright)
    for a, b in zip(base, shifted, strict=True):
        for name in ("train", "val", "test"):
            expected = offset.apply(a.data.split(name).images, _rng())
            np.testing.assert_array_equal(b.data.split(name).images, expected)
            np.testing.assert_array_equal(b.data.split(name).labels, a.data.split(name).labels)

    noisy = plan_sites(3, pool_counts=[300, 300])  # default profiles, incl. noise
    first, second = _simulate(pool, noisy, seed=5), _simulate(pool, noisy, seed=5)
    other = _simulate(pool, noisy, seed=6)
    for a, b, c in zip(first, second, other, strict=True):
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(a.data.split(name).images, b.data.split(name).images)
            np.testing.assert_array_equal(a.data.split(name).labels, b.data.split(name).labels)
        assert not np.array_equal(a.data.split("train").images, c.data.split("train").images)


def test_simulate_rejects_bad_inputs() -> None:
    pool = _signature_pool(50, 50)
    specs = plan_sites(2, pool_counts=[50, 50])
    with pytest.raises(ConfigError, match="split fractions"):
        simulate_sites(
            pool,
            specs,
            class_names=CLASS_NAMES_BINARY,
            source="p",
            synthetic=False,
            split_fractions=(0.5, 0.5, 0.5),
        )
    with pytest.raises(ConfigError, match="binary"):
        simulate_sites(pool, specs, class_names=("a", "b", "c"), source="p", synthetic=False)


def test_table_and_summary() -> None:
    pool = _signature_pool(200, 200)
    specs = plan_sites(3, prevalences=[0.25, 0.5, 0.75], pool_counts=[200, 200])
    sites = _simulate(pool, specs, synthetic=True)
    table = format_site_table(sites)
    assert "SYNTHETIC" in table.splitlines()[0]
    for s in specs:
        assert s.name in table
        assert s.profile.describe() in table
    assert "low-dose (noise=0.06)" in table
    real = format_site_table(_simulate(pool, specs, synthetic=False))
    assert "SYNTHETIC" not in real
    summary = site_summary(sites[0])
    json.dumps(summary)  # JSON-able
    assert summary["site"] == "site-0"
    assert summary["n_total"] == specs[0].n
    assert summary["n"] == {name: len(v) for name, v in sites[0].data.splits.items()}
    assert summary["prevalence"] == pytest.approx(round(specs[0].n * 0.25) / specs[0].n)
    assert summary["synthetic"] is True
    assert f"{summary['prevalence']:.3f}" in table.splitlines()[3]
