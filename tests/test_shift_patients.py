"""The shift simulator on a pool with patient ids: whole patients at one site and in one split."""

from __future__ import annotations

import numpy as np

from fedshift.common.data import ImageSet
from fedshift.simulations.shift import ScannerProfile, SiteSpec, simulate_sites

NAMES = ("normal", "abnormal")


def _pool(n_patients: int, per_patient: int, seed: int = 0, *, vary: bool = False) -> ImageSet:
    """``per_patient`` images per patient (``vary``: 1 to ``per_patient``, drawn)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, per_patient + 1, n_patients) if vary else np.full(n_patients, per_patient)
    labels = np.repeat(rng.integers(0, 2, n_patients), sizes).astype(np.int64)
    labels[::7] = 1 - labels[::7]  # a few patients have images of both classes
    patients = np.repeat([f"p{i:04d}" for i in range(n_patients)], sizes)
    images = rng.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    return ImageSet(images=images, labels=labels, patients=patients)


def _specs(n: int) -> list[SiteSpec]:
    return [SiteSpec(f"site-{k}", p, n, ScannerProfile("reference")) for k, p in enumerate((0.3, 0.5, 0.7))]


def test_a_patient_is_at_one_site_and_in_one_split() -> None:
    pool = _pool(300, 4, vary=True)  # 1 to 4 images per patient: a site's last patient may overshoot
    sites = simulate_sites(pool, _specs(150), class_names=NAMES, source="pool", synthetic=True)
    where: dict[str, tuple[str, str]] = {}
    for site in sites:
        for split, data in site.data.splits.items():
            assert data.patients is not None
            for patient in data.patients.tolist():
                assert where.setdefault(patient, (site.spec.name, split)) == (site.spec.name, split)
        n = sum(len(d) for d in site.data.splits.values())
        # whole patients: each class's draw stops at the first patient that reaches its count, so at most
        # one patient (3 images) over it per class
        assert 150 <= n <= 150 + 2 * 3
        # the site's prevalence is the planned one within one patient's images per class
        positives = sum(int(d.labels.sum()) for d in site.data.splits.values())
        assert abs(positives - round(150 * site.spec.prevalence)) <= 0.15 * 150  # mixed patients move a few
        counts = {s: len(d) for s, d in site.data.splits.items()}
        assert abs(counts["train"] - 0.6 * n) <= 6 and abs(counts["test"] - 0.2 * n) <= 6
    # every image of every drawn patient came along, and the images are the pool's
    assert sum(n > 150 for n in (sum(len(d) for d in s.data.splits.values()) for s in sites)) >= 1
    for patient, (site_name, split) in list(where.items())[:50]:
        site = next(s for s in sites if s.spec.name == site_name)
        data = site.data.splits[split]
        assert data.patients is not None
        mine = data.images[data.patients == patient]
        np.testing.assert_array_equal(
            np.sort(mine, axis=0), np.sort(pool.images[pool.patients == patient], axis=0)
        )


def test_one_image_per_patient_draws_exactly_as_without_patient_ids() -> None:
    pool = _pool(400, 1)
    anonymous = ImageSet(images=pool.images, labels=pool.labels)
    with_ids = simulate_sites(pool, _specs(100), class_names=NAMES, source="pool", synthetic=True, seed=3)
    without = simulate_sites(anonymous, _specs(100), class_names=NAMES, source="pool", synthetic=True, seed=3)
    for a, b in zip(with_ids, without, strict=True):
        for split in a.data.splits:
            np.testing.assert_array_equal(a.data.splits[split].images, b.data.splits[split].images)
            np.testing.assert_array_equal(a.data.splits[split].labels, b.data.splits[split].labels)
