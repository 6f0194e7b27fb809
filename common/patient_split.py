"""Patient-level splits: seeded, stratified, and kept in the site's state directory.

A patient (a *group*) never lands in two splits. :func:`split_groups` is the generic core (labels,
groups, fractions, a generator -> a split index per image); :func:`plan_split` adds the manifest's
``split`` column and the saved ``data-split.json``, so a split stays the same across rounds, runs and
restarts, and new patients join without moving old ones. The split file also keeps each image's
split, so a re-keyed patient (a patient_id column added or changed) keeps its images' split, and a
change that would move a saved image to another split is refused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedshift.common.data import SPLITS
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.io import atomic_write_bytes

logger = logging.getLogger(__name__)

SPLIT_FILE = "data-split.json"
SPLIT_FILE_VERSION = 2  # 2: also each image's split (files of version 1 are read)
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
FIX_RESPLIT = (
    f"delete {SPLIT_FILE} to make a new split (its test patients were seen before: metrics on a new "
    "test split are not independent of the runs before)"
)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three finite, non-negative fractions (train, val, test) summing to 1, with train > 0."""
    values = tuple(float(f) for f in fractions)
    ok = len(values) == len(SPLITS) and all(math.isfinite(f) and f >= 0 for f in values)
    if not ok or abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise ConfigError(
            f"Expected split fractions (train, val, test) >= 0 summing to 1 with train > 0, but got "
            f"{list(fractions)}; pass e.g. (0.6, 0.2, 0.2)"
        )
    return values[0], values[1], values[2]


def group_labels(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """Each group's majority label; a tie goes to the label of the group's first image."""
    votes: dict[str, dict[int, int]] = {}
    for label, group in zip(labels.tolist(), groups.tolist(), strict=True):
        counts = votes.setdefault(str(group), {})
        counts[int(label)] = counts.get(int(label), 0) + 1
    # dicts keep insertion order: max() returns the first label of the highest count
    return {g: max(counts, key=lambda c: counts[c]) for g, counts in votes.items()}


def split_groups(
    labels: np.ndarray,
    groups: np.ndarray,
    fractions: Sequence[float],
    rng: np.random.Generator,
    fixed: Mapping[str, int] | None = None,
) -> np.ndarray:
    """A split index per image (0 train, 1 val, 2 test); every group's images share one split.

    Stratified per class: each group goes, largest first (ties shuffled by ``rng``), to the split whose
    image count of the group's majority label is furthest below ``fraction * n_class``. With groups of one
    label each class's image count per split is within the largest group's size of its target (+/-1
    with one image per group). ``fixed`` groups keep their
    split and count toward the targets.
    """
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups).astype(str)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise DataError(
            f"Expected one group per label, but got {groups.shape} groups for {labels.shape} labels; "
            "pass (N,) arrays"
        )
    fracs = np.asarray(check_fractions(fractions))
    num_classes = int(labels.max()) + 1 if labels.size else 0
    target = np.outer(np.bincount(labels, minlength=num_classes), fracs)  # (C, 3)
    current = np.zeros_like(target)
    fixed = dict(fixed or {})
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    assigned: dict[str, int] = {}
    for g, idx in members.items():
        if g in fixed:
            assigned[g] = int(fixed[g])
            np.add.at(current[:, assigned[g]], labels[idx], 1)
    majority = group_labels(labels, groups)
    free = [g for g in members if g not in assigned]
    order = rng.permutation(len(free))
    free = sorted((free[i] for i in order), key=lambda g: -len(members[g]))  # stable: shuffled ties
    for g in free:
        c = majority[g]
        deficit = target[c] - current[c]
        best = int(np.flatnonzero(deficit == deficit.max())[0])
        assigned[g] = best
        np.add.at(current[:, best], labels[members[g]], 1)
    return np.asarray([assigned[g] for g in groups.tolist()], dtype=np.int64)


@dataclass(frozen=True)
class SplitPlan:
    """Where every image goes, and what :func:`save_split` would write."""

    index: np.ndarray  # (N,) int64 split index per image
    patients: dict[str, str]  # patient id -> split name: the saved ones plus this manifest's
    source: str  # "column", "saved", "new" or "saved+new"
    seed: int
    fractions: tuple[float, float, float]
    manifest: str
    new_patients: int = 0
    changed: bool = field(default=True)  # False: the saved file already says exactly this
    images: dict[str, str] = field(default_factory=dict)  # image id -> split name, saved plus this manifest's


def split_file(state_dir: Path) -> Path:
    return Path(state_dir) / SPLIT_FILE


def _read_split_file(state_dir: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """The saved patient -> split and image -> split maps of ``state_dir`` (empty when none is saved)."""
    if state_dir is None or not split_file(state_dir).is_file():
        return {}, {}
    path = split_file(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        patients, images = data["patients"], data.get("images", {})
        ok = all(isinstance(m, dict) and all(v in SPLITS for v in m.values()) for m in (patients, images))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"Expected {path} to be a split file written by fedshift, but it cannot be read ({exc}); "
            f"restore it from a backup, or {FIX_RESPLIT}"
        ) from exc
    if not ok:
        raise DataError(
            f"Expected {path} to map patient ids and images to one of {list(SPLITS)}, but it holds other "
            f"values; restore it from a backup, or {FIX_RESPLIT}"
        )
    return {str(k): str(v) for k, v in patients.items()}, {str(k): str(v) for k, v in images.items()}


def read_saved_split(state_dir: Path | None) -> dict[str, str]:
    """The saved patient -> split map of ``state_dir`` (empty when none is saved)."""
    return _read_split_file(state_dir)[0]


def read_saved_image_splits(state_dir: Path | None) -> dict[str, str]:
    """The saved image (a manifest row's path) -> split map of ``state_dir`` (empty when none is saved)."""
    return _read_split_file(state_dir)[1]


def _fixed_by_images(
    patients: list[str], images: list[str], saved: Mapping[str, str], saved_images: Mapping[str, str]
) -> dict[str, int]:
    """Saved patients' splits, and for a patient not saved (re-keyed) the split its saved images share."""
    fixed = {p: SPLITS.index(s) for p, s in saved.items()}
    seen: dict[str, set[str]] = {}
    for patient, image in zip(patients, images or [""] * len(patients), strict=True):
        if patient not in saved and image in saved_images:
            seen.setdefault(patient, set()).add(saved_images[image])
    fixed.update({p: SPLITS.index(next(iter(s))) for p, s in seen.items() if len(s) == 1})
    return fixed


def _check_images_not_moved(
    index: np.ndarray,
    patients: list[str],
    images: list[str],
    saved_images: Mapping[str, str],
    image_where: Sequence[str],
    path: Path,
) -> None:
    """Refuse a split that puts a saved image in another split than the saved one."""
    for i, (patient, image) in enumerate(zip(patients, images, strict=True)):
        was, now = saved_images.get(image), SPLITS[int(index[i])]
        if was is not None and was != now:
            raise DataError(
                f"Expected image '{image}' ({image_where[i]}, patient '{patient}') to stay in split "
                f"'{was}' as saved in {path}, but the split would move it to '{now}' (its patient's "
                f"images are saved in different splits, or the row's split changed); give the patient's "
                f"rows their saved split in a split column, or {FIX_RESPLIT}"
            )


def _check_not_moved(
    wanted: Mapping[str, str], saved: Mapping[str, str], where: Mapping[str, str], path: Path
) -> None:
    for patient, split in wanted.items():
        if patient in saved and saved[patient] != split:
            raise DataError(
                f"Expected patient '{patient}' ({where[patient]}) to stay in split '{saved[patient]}' as "
                f"saved in {path}, but the manifest now puts it in '{split}'; restore the row's split, "
                f"or {FIX_RESPLIT}"
            )


def plan_split(
    patients: np.ndarray,
    labels: np.ndarray,
    split_column: Sequence[str | None] | None,
    *,
    state_dir: Path | None,
    seed: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    manifest: str = "",
    where: Mapping[str, str] | None = None,
    images: Sequence[str] | None = None,
    image_where: Sequence[str] | None = None,
) -> SplitPlan:
    """The split of a manifest's images: its ``split`` column when given, else the saved split for
    known patients (a patient not saved: its saved images' split) and :func:`split_groups` for new
    ones. A patient, or an image (``images``: one id per image), that the saved split puts elsewhere is
    refused; ``where`` names each patient's first row, ``image_where`` each image's row."""
    fracs = check_fractions(fractions)
    ids = np.asarray(patients).astype(str).tolist()
    images = list(images) if images is not None else []
    saved, saved_images = _read_split_file(state_dir)
    where = where or {p: f"patient {p}" for p in ids}
    path = split_file(state_dir) if state_dir is not None else Path(SPLIT_FILE)
    if split_column is not None:
        wanted = {p: str(s) for p, s in zip(ids, split_column, strict=True)}
        _check_not_moved(wanted, saved, where, path)
        index = np.asarray([SPLITS.index(str(s)) for s in split_column], dtype=np.int64)
        source, new = "column", sum(p not in saved for p in wanted)
    else:
        fixed = _fixed_by_images(ids, images, saved, saved_images)
        index = split_groups(labels, np.asarray(ids), fracs, np.random.default_rng(seed), fixed=fixed)
        new = len({p for p in ids if p not in fixed})
        known = len(set(ids)) - new
        source = "new" if not known else ("saved" if not new else "saved+new")
    if images:
        _check_images_not_moved(index, ids, images, saved_images, image_where or images, path)
    if saved and not set(saved) & set(ids) and not set(saved_images) & set(images):
        logger.warning(
            "None of the %d patients saved in %s is in %s: every patient is split anew (patient ids "
            "changed? then old test images may land in training; delete the file if the data is new)",
            *(len(saved), path, manifest or "the manifest"),
        )
    merged, merged_images = dict(saved), dict(saved_images)
    merged.update({p: SPLITS[i] for p, i in zip(ids, index.tolist(), strict=True)})
    merged_images.update({m: SPLITS[i] for m, i in zip(images, index.tolist(), strict=True)})
    return SplitPlan(
        index=index,
        patients=merged,
        source=source,
        seed=int(seed),
        fractions=fracs,
        manifest=manifest,
        new_patients=new,
        changed=merged != saved or merged_images != saved_images,
        images=merged_images,
    )


def save_split(state_dir: Path, plan: SplitPlan) -> Path:
    """Write ``plan``'s patient and image -> split maps to ``state_dir/data-split.json``, atomically."""
    path = split_file(state_dir)
    if not plan.changed and path.is_file():
        return path
    payload = {
        "version": SPLIT_FILE_VERSION,
        "manifest": plan.manifest,
        "seed": plan.seed,
        "fractions": list(plan.fractions),
        "patients": dict(sorted(plan.patients.items())),
        "images": dict(sorted(plan.images.items())),
    }
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode("utf-8"))
    logger.info(
        "Saved the patient split (%d patients, %d new) to %s", len(plan.patients), plan.new_patients, path
    )
    return path
