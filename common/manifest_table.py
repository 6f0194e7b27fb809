"""A manifest's table: a CSV or TSV listing image files, their labels, patients and splits, checked.

Columns (header names are case-insensitive): ``path`` (relative to the manifest's folder), ``label`` (a
class name, or a class index when every label is an integer), and optionally ``patient_id``, ``split``
(train, val or test) and ``frame`` (the 0-based frame of a multi-frame DICOM). Other columns are ignored
and reported once. ``.tsv`` is tab-separated, ``.csv`` comma-separated (semicolon when its header has no
comma); a UTF-8 byte order mark is tolerated. Rows are numbered from 1 after the header; errors name the
row and its line in the file.

Class names are the sorted label names, except that one well-known negative name comes first when
present (case-insensitive, the first of :data:`NEGATIVE_NAMES` found), so that class 0 is the negative
class; to fix another order pass the class names, or write class indices. :mod:`fedshift.common.manifest`
decodes and splits the rows.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedshift.common.data import SPLITS, default_class_names
from fedshift.common.errors import DataError

logger = logging.getLogger(__name__)

COLUMNS = ("path", "label", "patient_id", "split", "frame")
REQUIRED = ("path", "label")
NEGATIVE_NAMES = ("normal", "negative", "healthy", "benign", "no finding", "control")
_INDEX = re.compile(r"^\d+$")
_reported: set[tuple[str, str]] = set()  # (manifest, what) already logged in this process


@dataclass(frozen=True)
class ManifestRow:
    """One data row, checked."""

    row: int  # 1-based data row
    line: int  # its line in the file (the header is line 1)
    rel: str  # the path as written
    file: Path  # the path resolved against the manifest's folder
    label: int  # class index into Manifest.class_names; -1 in a manifest without labels
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
    class_names: tuple[str, ...] | None  # None: a manifest without labels (to predict on)
    has_patients: bool
    has_split: bool


def report_once(manifest: Path, what: str, level: int, message: str, *args: object) -> None:
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
    if not text.strip():
        raise DataError(
            f"Expected a header line and at least one data row in {path}, but it is empty; "
            "list one image per row under a header (path,label)"
        )
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


def _columns(path: Path, header: list[str], n_rows: int, labelled: bool) -> dict[str, int]:
    """Column name -> position; the required ones present, others reported once."""
    required = REQUIRED if labelled else ("path",)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"Expected a '{missing[0]}' column in {path}, but its header has {header}; add a header line "
            f"naming the columns {list(required)} (optional: "
            f"{', '.join(c for c in COLUMNS if c not in required)})"
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
        report_once(path, "ignored", logging.INFO, "Ignoring the columns %s of %s", ignored, path)
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
    names = order_class_names({t for t, _ in raw})
    return [names.index(t) for t, _ in raw], names


def order_class_names(names: set[str] | Sequence[str]) -> tuple[str, ...]:
    """Sorted, with the first well-known negative name (:data:`NEGATIVE_NAMES`) moved to the front."""
    ordered = sorted(set(names))
    for negative in NEGATIVE_NAMES:
        found = [n for n in ordered if n.lower() == negative]
        if found:
            ordered.remove(found[0])
            return (found[0], *ordered)
    return tuple(ordered)


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
    if split == "":
        raise DataError(
            f"Expected a split ({'/'.join(SPLITS)}) in {where}, but it is empty; fill in every row's split, "
            "or leave the whole split column out for a seeded patient-level split"
        )
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
    path: str | Path, class_names: Sequence[str] | None = None, min_classes: int = 2, labelled: bool = True
) -> Manifest:
    """Parse and validate ``path`` (no image decoded): columns, rows, files present, labels, duplicates,
    splits per patient, at least ``min_classes`` classes (1: a set to predict on). ``labelled=False``:
    the label column may be missing or empty throughout (then ``class_names`` is None, labels -1)."""
    path = Path(path)
    header, table = _open_table(path)
    columns = _columns(path, header, len(table), labelled)
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
        key = f"{file}\0{frame}"  # one row per image: a file once, or each frame of it once
        if key in seen:
            image = f"'{rel}'" if frame is None else f"frame {frame} of '{rel}'"
            raise DataError(
                f"Expected each image once in {path}, but {where} repeats {image} of {seen[key]}; "
                "remove the duplicate row"
            )
        seen[key] = where
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
    unlabelled = not labelled and not any(t for t, _ in raw)
    labels, names = ([-1] * len(raw), None) if unlabelled else _labels(path, raw, class_names)
    rows = tuple(
        ManifestRow(n, line, rel, file, label, patient, split, frame)
        for (n, line, rel, file, patient, split, frame), label in zip(parsed, labels, strict=True)
    )
    _check_patient_splits(path, rows)
    if min_classes > 1 and names is not None:
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
