"""Manifest sites: the images a CSV/TSV manifest lists, decoded through the cache and split by patient.

The table and its checks are :mod:`fedshift.common.manifest_table` (columns, labels, class order, errors).
:func:`load_manifest` decodes the rows' files through :mod:`fedshift.common.decode_cache` and splits them
at patient level with :mod:`fedshift.common.patient_split` (the split saved in the site's state
directory); :func:`manifest_images` reads a set to predict on (labels optional, no split made);
:func:`check_manifest` validates a site before it connects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshift.common.data import SPLITS, Dataset, ImageSet, check_two_classes
from fedshift.common.decode_cache import DecodeStats, decode_cached, default_cache_dir
from fedshift.common.errors import DataError
from fedshift.common.image_files import check_image_size
from fedshift.common.manifest_table import Manifest, ManifestRow, read_manifest, report_once
from fedshift.common.patient_split import DEFAULT_FRACTIONS, SplitPlan, plan_split, save_split

__all__ = ["ManifestSummary", "check_manifest", "load_manifest", "manifest_images", "read_manifest"]

logger = logging.getLogger(__name__)


def _decode_rows(
    path: Path, rows: Sequence[ManifestRow], image_size: int, cache_dir: Path, workers: int
) -> tuple[np.ndarray, DecodeStats]:
    """The rows' images, in their order, through the decode cache (errors name the row and file)."""
    return decode_cached(
        [r.file for r in rows],
        [r.frame for r in rows],
        image_size=image_size,
        cache_dir=cache_dir,
        manifest=path,
        names=[f"{r.where(path)}: {r.rel}" for r in rows],
        workers=workers,
    )


@dataclass(frozen=True)
class ManifestSummary:
    """What :func:`check_manifest` found; :meth:`lines` for ``fedshift client --check``."""

    path: str
    n_images: int
    class_names: tuple[str, ...]
    counts: dict[str, list[int]]  # split -> images per class
    patients: dict[str, int]  # split -> patients
    has_patients: bool
    split_source: str  # "column", "saved", "new" or "saved+new"
    decoded: int
    cached: int
    colour: bool

    def lines(self) -> list[str]:
        kind = "colour" if self.colour else "grey-scale"
        out = [
            f"manifest {self.path}: {self.n_images} {kind} images readable ({self.decoded} decoded, "
            f"{self.cached} from the cache), classes {list(self.class_names)}",
            f"split: {self.split_source} (patient level"
            + ("" if self.has_patients else "; no patient_id column: each image its own patient")
            + ")",
        ]
        for s, counts in self.counts.items():
            per_class = ", ".join(f"{n} {c}" for n, c in zip(counts, self.class_names, strict=True))
            out.append(f"  {s}: {sum(counts)} images of {self.patients[s]} patients ({per_class})")
        return out


@dataclass(frozen=True)
class _Loaded:
    manifest: Manifest
    class_names: tuple[str, ...]
    rows: tuple[ManifestRow, ...]  # the manifest's rows grouped by split (train, val, test), stable
    index: np.ndarray  # their split indices, sorted
    images: np.ndarray  # their images: each split a contiguous slice
    plan: SplitPlan
    stats: DecodeStats


def _load(
    path: Path,
    *,
    image_size: int,
    state_dir: Path | None,
    seed: int,
    cache_dir: Path | None,
    workers: int,
    fractions: Sequence[float],
    class_names: Sequence[str] | None,
    min_classes: int,
) -> _Loaded:
    """Read, split (not saved) and decode a manifest; raises before anything but the cache is written."""
    image_size = check_image_size(image_size)
    manifest = read_manifest(path, class_names, min_classes)
    assert manifest.class_names is not None  # labels are required here
    rows = manifest.rows
    if not manifest.has_patients:
        report_once(
            path,
            "leakage",
            logging.WARNING,
            "%s has no patient_id column: each image counts as its own patient, so leakage between splits "
            "(one patient's images in train and test) cannot be ruled out; add a patient_id column",
            path,
        )
    where: dict[str, str] = {}
    for r in rows:
        where.setdefault(r.patient, r.where(path))
    plan = plan_split(
        np.asarray([r.patient for r in rows]),
        np.asarray([r.label for r in rows], dtype=np.int64),
        [r.split for r in rows] if manifest.has_split else None,
        state_dir=state_dir,
        seed=seed,
        fractions=fractions,
        manifest=str(path.resolve()),
        where=where,
        images=[r.rel if r.frame is None else f"{r.rel} frame {r.frame}" for r in rows],
        image_where=[r.where(path) for r in rows],
    )
    order = np.argsort(plan.index, kind="stable")
    rows = tuple(rows[i] for i in order.tolist())
    cache = cache_dir if cache_dir is not None else default_cache_dir(state_dir)
    images, stats = _decode_rows(path, rows, image_size, cache, workers)
    return _Loaded(manifest, manifest.class_names, rows, plan.index[order], images, plan, stats)


def load_manifest(
    path: str | Path,
    *,
    image_size: int = 64,
    state_dir: Path | None = None,
    seed: int = 0,
    require: str = "train",
    cache_dir: Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    class_names: Sequence[str] | None = None,
    workers: int = 1,
) -> Dataset:
    """The manifest's images, split at patient level, as a :class:`Dataset` (``patients`` set).

    The split is the ``split`` column, else the one saved in ``state_dir/data-split.json`` (new patients
    added, seeded and stratified), else a new seeded, stratified one; it is saved only when ``state_dir``
    is given and everything decoded. ``class_names``: the labels must be among them (else unknown label).
    """
    path = Path(path)
    loaded = _load(
        path,
        image_size=image_size,
        state_dir=state_dir,
        seed=seed,
        cache_dir=cache_dir,
        workers=workers,
        fractions=fractions,
        class_names=class_names,
        min_classes=2 if require == "train" else 1,
    )
    plan = loaded.plan
    labels = np.asarray([r.label for r in loaded.rows], dtype=np.int64)
    patients = np.asarray([r.patient for r in loaded.rows], dtype=str)
    splits: dict[str, ImageSet] = {}
    for i, name in enumerate(SPLITS):
        lo, hi = np.searchsorted(loaded.index, [i, i + 1])
        if hi > lo:  # slices, not copies: the decoded images are held once
            part = slice(int(lo), int(hi))
            splits[name] = ImageSet(images=loaded.images[part], labels=labels[part], patients=patients[part])
    if require not in splits:
        raise DataError(
            f"Expected a '{require}' split in {path}, but its rows are only in {sorted(splits)}; "
            f"mark some patients' rows '{require}' in the split column"
        )
    if require == "train":
        check_two_classes({"train": splits["train"]}, f"the train split of {path}")
    dataset = Dataset(splits=splits, class_names=loaded.class_names, source=str(path), synthetic=False)
    if state_dir is not None:
        save_split(Path(state_dir), plan)
    logger.info(
        "Loaded %s: %s, classes %s, split %s",
        path,
        {k: len(v) for k, v in splits.items()},
        loaded.class_names,
        plan.source,
    )
    return dataset


def manifest_images(
    path: str | Path,
    image_size: int,
    *,
    split: str | None = None,
    cache_dir: Path | None = None,
    class_names: Sequence[str] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, list[str], np.ndarray | None, tuple[str, ...] | None]:
    """A set to predict on: the images, their ids (the rows' paths as written), labels ``(N,)`` int64 or
    None (no label column, or an empty one) and the class names or None. No split is made: ``split``
    given and a split column present, only that split's rows; else every row. One class is fine."""
    path = Path(path)
    image_size = check_image_size(image_size)
    manifest = read_manifest(path, class_names, min_classes=1, labelled=False)
    rows = manifest.rows
    if split is not None and manifest.has_split:
        rows = tuple(r for r in rows if r.split == split)
        if not rows:
            have = sorted({str(r.split) for r in manifest.rows})
            raise DataError(
                f"Expected rows with split '{split}' in {path}, but its rows are in {have}; "
                "pass one of those as --split"
            )
    cache = cache_dir if cache_dir is not None else default_cache_dir(None)
    images, _ = _decode_rows(path, rows, image_size, cache, workers)
    labelled = manifest.class_names is not None
    labels = np.asarray([r.label for r in rows], dtype=np.int64) if labelled else None
    logger.info(
        "Loaded %d images to predict on from %s%s", len(rows), path, "" if labelled else " (no labels)"
    )
    return images, [r.rel for r in rows], labels, manifest.class_names


def check_manifest(
    path: str | Path,
    *,
    image_size: int = 64,
    state_dir: Path | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    class_names: Sequence[str] | None = None,
    workers: int = 1,
) -> ManifestSummary:
    """Validate a manifest site before it connects: every file readable, labels known, the split at
    patient level (checked against a saved split, which is not written). Only the decode cache is filled."""
    path = Path(path)
    loaded = _load(
        path,
        image_size=image_size,
        state_dir=state_dir,
        seed=seed,
        cache_dir=cache_dir,
        workers=workers,
        fractions=fractions,
        class_names=class_names,
        min_classes=2,
    )
    rows, index = loaded.rows, loaded.index
    counts: dict[str, list[int]] = {}
    patients: dict[str, int] = {}
    for i, name in enumerate(SPLITS):
        mine = [r for r, s in zip(rows, index.tolist(), strict=True) if s == i]
        labels = np.asarray([r.label for r in mine], dtype=np.int64)
        counts[name] = np.bincount(labels, minlength=len(loaded.class_names)).tolist()
        patients[name] = len({r.patient for r in mine})
    return ManifestSummary(
        path=str(path),
        n_images=len(rows),
        class_names=loaded.class_names,
        counts=counts,
        patients=patients,
        has_patients=loaded.manifest.has_patients,
        split_source=loaded.plan.source,
        decoded=loaded.stats.decoded,
        cached=loaded.stats.cached,
        colour=loaded.images.ndim == 4,
    )
