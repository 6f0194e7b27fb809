"""A manifest: a CSV or TSV listing a site's image files, their labels, patients and splits.

Columns (header names are case-insensitive): ``path`` (relative to the manifest's folder), ``label`` (a
class name, or a class index when every label is an integer), and optionally ``patient_id``, ``split``
(train, val or test) and ``frame`` (the 0-based frame of a multi-frame DICOM). Other columns are ignored
and reported once. ``.tsv`` is tab-separated, ``.csv`` comma-separated (semicolon when its header has no
comma); a UTF-8 byte order mark is tolerated. Rows are numbered from 1 after the header; errors name the
row and its line in the file.

:func:`load_manifest` decodes the images through :mod:`fedshift.common.decode_cache` and splits them at
patient level with :mod:`fedshift.common.patient_split` (the split saved in the site's state directory).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshift.common.data import SPLITS, Dataset, ImageSet, check_two_classes, default_class_names
from fedshift.common.decode_cache import DecodeStats, decode_cached, default_cache_dir
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.patient_split import DEFAULT_FRACTIONS, SplitPlan, plan_split, save_split

logger = logging.getLogger(__name__)

COLUMNS = ("path", "label", "patient_id", "split", "frame")
REQUIRED = ("path", "label")
_INDEX = re.compile(r"^\d+$")
_reported: set[tuple[str, str]] = set()  # (manifest, what) already logged in this process


@dataclass(frozen=True)
class ManifestRow:
    """One data row, checked."""

    row: int  # 1-based data row
    line: int  # its line in the file (the header is line 1)
    rel: str  # the path as written
    file: Path  # the path resolved against the manifest's folder
    label: int  # class index into Manifest.class_names
    patient: str  # the patient_id, or ``rel`` when there is no patient_id column
    split: str | None
    frame: int | None

    def where(self, manifest: Path) -> str:
        return f"row {self.row} (line {self.line} of {manifest.name})"


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest (no image decoded yet)."""

    path: Path
    rows: tuple[ManifestRow, ...]
    class_names: tuple[str, ...]
    has_patients: bool
    has_split: bool


def _report_once(manifest: Path, what: str, level: int, message: str, *args: object) -> None:
    key = (str(manifest.resolve()), what)
    if key not in _reported:
        _reported.add(key)
        logger.log(level, message, *args)


def _open_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header and the non-blank rows (with their file line) of ``path``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Expected {path} to be UTF-8 text, but byte {exc.start} is not ({exc.reason}); "
            "save the manifest as UTF-8 CSV"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"Expected {path} to be a readable manifest, but it is not ({exc}); check the path"
        ) from exc
    first = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ("," if "," in first or ";" not in first else ";")
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = [c.strip().lower() for c in next(reader, [])]
        rows = [(reader.line_num, [c.strip() for c in r]) for r in reader if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise DataError(
            f"Expected {path} to be a valid {'TSV' if delimiter == chr(9) else 'CSV'} file, but line "
            f"{reader.line_num} cannot be parsed ({exc}); fix the quoting on that line"
        ) from exc
    return header, rows


def _columns(path: Path, header: list[str], n_rows: int) -> dict[str, int]:
    """Column name -> position; the required ones present, others reported once."""
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(
            f"Expected a '{missing[0]}' column in {path}, but its header has {header}; add a header line "
            f"naming the columns {list(REQUIRED)} (optional: patient_id, split, frame)"
        )
    dupes = sorted({c for c in header if c in COLUMNS and header.count(c) > 1})
    if dupes:
        raise DataError(
            f"Expected one '{dupes[0]}' column in {path}, but the header has it twice; remove one"
        )
    if n_rows == 0:
        raise DataError(
            f"Expected at least one data row in {path}, but it has only a header or nothing; "
            "list one image per row (path,label)"
        )
    ignored = [c or "(unnamed)" for c in header if c not in COLUMNS]
    if ignored:
        _report_once(path, "ignored", logging.INFO, "Ignoring the columns %s of %s", ignored, path)
    return {c: header.index(c) for c in COLUMNS if c in header}


def _cell(cells: list[str], columns: dict[str, int], name: str) -> str:
    i = columns.get(name)
    return cells[i] if i is not None and i < len(cells) else ""


def _labels(
    path: Path, raw: list[tuple[str, str]], class_names: Sequence[str] | None
) -> tuple[list[int], tuple[str, ...]]:
    """Class indices and names for the raw labels (each with its row's description)."""
    for text, where in raw:
        if not text:
            raise DataError(f"Expected a label in {where}, but it is empty; fill in the row's class")
    as_index = all(_INDEX.match(t) for t, _ in raw)
    if not as_index and class_names is None:
        mixed = next(((t, w) for t, w in raw if _INDEX.match(t)), None)
        if mixed is not None:
            raise DataError(
                f"Expected either class names or class indices in the label column of {path}, but "
                f"{mixed[1]} has index '{mixed[0]}' among names; write every label the same way"
            )
    if class_names is not None:
        names = tuple(class_names)
        known = {n: i for i, n in enumerate(names)}
        for t, where in raw:
            if t not in known and not (as_index and int(t) < len(names)):
                raise DataError(
                    f"Expected a label among {list(names)} (or an index below {len(names)}) in {where}, "
                    f"but got unknown label '{t}'; correct the label or train with this class"
                )
        return [int(t) if as_index else known[t] for t, _ in raw], names
    if as_index:
        indices = [int(t) for t, _ in raw]
        return indices, default_class_names(max(indices) + 1)
    names = tuple(sorted({t for t, _ in raw}))
    return [names.index(t) for t, _ in raw], names


def _row_fields(
    path: Path, where: str, cells: list[str], columns: dict[str, int]
) -> tuple[str, str | None, int | None]:
    """The row's path, split and frame, checked."""
    rel = _cell(cells, columns, "path")
    if not rel:
        raise DataError(
            f"Expected a file path in {where}, but it is empty; fill in the path or remove the row"
        )
    split = _cell(cells, columns, "split").lower() if "split" in columns else None
    if split is not None and split not in SPLITS:
        raise DataError(
            f"Expected split to be one of {list(SPLITS)} in {where}, but got '{split}'; "
            "correct it (or leave the whole split column out for a seeded patient-level split)"
        )
    text = _cell(cells, columns, "frame")
    if text and not _INDEX.match(text):
        raise DataError(
            f"Expected frame to be a 0-based frame number in {where}, but got '{text}'; "
            "write e.g. 0, or leave it empty for a single-frame file"
        )
    return rel, split, int(text) if text else None


def read_manifest(
    path: str | Path, class_names: Sequence[str] | None = None, min_classes: int = 2
) -> Manifest:
    """Parse and validate ``path`` (no image decoded): columns, rows, files present, labels, duplicates,
    splits per patient, at least ``min_classes`` classes (1: a set to predict on)."""
    path = Path(path)
    header, table = _open_table(path)
    columns = _columns(path, header, len(table))
    base = path.parent
    seen: dict[str, str] = {}
    parsed: list[tuple[int, int, str, Path, str, str | None, int | None]] = []
    for n, (line, cells) in enumerate(table, start=1):
        where = f"row {n} (line {line} of {path.name})"
        if len(cells) > len(header):
            raise DataError(
                f"Expected at most {len(header)} cells in {where} (the header's), but got {len(cells)}; "
                "quote values that contain the delimiter"
            )
        rel, split, frame = _row_fields(path, where, cells, columns)
        file = Path(os.path.normpath(base / rel))
        if str(file) in seen:
            raise DataError(
                f"Expected each file once in {path}, but {where} repeats '{rel}' of {seen[str(file)]}; "
                "remove the duplicate row"
            )
        seen[str(file)] = where
        if not file.is_file():
            raise DataError(
                f"Expected the file '{rel}' of {where} to exist, but there is no {file}; "
                "correct the path (relative to the manifest's folder) or remove the row"
            )
        patient = _cell(cells, columns, "patient_id") if "patient_id" in columns else rel
        if not patient:
            raise DataError(f"Expected a patient_id in {where}, but it is empty; fill in the row's patient")
        parsed.append((n, line, rel, file, patient, split, frame))
    raw = [
        (_cell(cells, columns, "label"), f"row {n} (line {line} of {path.name})")
        for n, (line, cells) in enumerate(table, 1)
    ]
    labels, names = _labels(path, raw, class_names)
    rows = tuple(
        ManifestRow(n, line, rel, file, label, patient, split, frame)
        for (n, line, rel, file, patient, split, frame), label in zip(parsed, labels, strict=True)
    )
    _check_patient_splits(path, rows)
    if min_classes > 1:
        _check_classes(path, rows, names)
    return Manifest(path, rows, names, "patient_id" in columns, "split" in columns)


def _check_patient_splits(path: Path, rows: Sequence[ManifestRow]) -> None:
    first: dict[str, ManifestRow] = {}
    for r in rows:
        other = first.setdefault(r.patient, r)
        if r.split is not None and other.split != r.split:
            raise DataError(
                f"Expected every row of patient '{r.patient}' in one split, but {other.where(path)} says "
                f"'{other.split}' and {r.where(path)} says '{r.split}'; give all the patient's rows one split"
            )


def _check_classes(path: Path, rows: Sequence[ManifestRow], names: tuple[str, ...]) -> None:
    present = sorted({r.label for r in rows})
    if len(present) < 2:
        raise DataError(
            f"Expected at least 2 classes in {path}, but every row has label '{names[present[0]]}'; "
            "a classifier needs examples of every class: add rows of the other classes"
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
    fractions: Sequence[float],
    class_names: Sequence[str] | None,
    min_classes: int,
) -> _Loaded:
    """Read, split (not saved) and decode a manifest; raises before anything but the cache is written."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(
            f"Expected image_size to be a positive integer, but got {image_size!r}; pass e.g. 64"
        )
    manifest = read_manifest(path, class_names, min_classes)
    rows = manifest.rows
    if not manifest.has_patients:
        _report_once(
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
    )
    order = np.argsort(plan.index, kind="stable")
    rows = tuple(rows[i] for i in order.tolist())
    images, stats = decode_cached(
        [r.file for r in rows],
        [r.frame for r in rows],
        image_size=image_size,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(state_dir),
        manifest=path,
        names=[f"{r.where(path)}: {r.rel}" for r in rows],
    )
    return _Loaded(manifest, rows, plan.index[order], images, plan, stats)


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
        fractions=fractions,
        class_names=class_names,
        min_classes=2 if require == "train" else 1,
    )
    manifest, plan = loaded.manifest, loaded.plan
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
    dataset = Dataset(splits=splits, class_names=manifest.class_names, source=str(path), synthetic=False)
    if state_dir is not None:
        save_split(Path(state_dir), plan)
    logger.info(
        "Loaded %s: %s, classes %s, split %s",
        path,
        {k: len(v) for k, v in splits.items()},
        manifest.class_names,
        plan.source,
    )
    return dataset


def check_manifest(
    path: str | Path,
    *,
    image_size: int = 64,
    state_dir: Path | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    class_names: Sequence[str] | None = None,
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
        counts[name] = np.bincount(labels, minlength=len(loaded.manifest.class_names)).tolist()
        patients[name] = len({r.patient for r in mine})
    return ManifestSummary(
        path=str(path),
        n_images=len(rows),
        class_names=loaded.manifest.class_names,
        counts=counts,
        patients=patients,
        has_patients=loaded.manifest.has_patients,
        split_source=loaded.plan.source,
        decoded=loaded.stats.decoded,
        cached=loaded.stats.cached,
        colour=loaded.images.ndim == 4,
    )
