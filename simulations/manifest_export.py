"""A dataset as a hospital would export it: one DICOM (or PNG) file per image, listed in a CSV manifest.

For tests and benchmarks of the manifest path, and for researchers who want to hand a simulated site's data
to the same loader a hospital uses. Grey images become 8-bit MONOCHROME2 DICOMs and colour ones 8-bit RGB,
so the manifest loader decodes exactly the source pixels (before its resize).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import shutil
from pathlib import Path

import numpy as np

from fedshift.common.data import SPLITS, Dataset, load_dataset
from fedshift.common.dicom import write_dicom
from fedshift.common.errors import ConfigError
from fedshift.common.io import atomic_write_bytes

logger = logging.getLogger(__name__)

FORMATS = ("dcm", "png")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def export_manifest(
    dataset: Dataset,
    root: Path,
    *,
    fmt: str = "dcm",
    images_per_patient: int = 1,
    with_split: bool = True,
) -> Path:
    """Write every image of ``dataset`` under ``root/images/`` and list it in ``root/manifest.csv``.

    Columns: ``path`` (relative to the manifest), ``label`` (the class name), ``patient_id`` (consecutive
    images of a split share one patient, ``images_per_patient`` at a time) and, with ``with_split``,
    ``split``. Rows follow the dataset's splits in train, val, test order. Returns the manifest's path.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"Expected the export format to be one of {FORMATS}, but got {fmt!r}; pass 'dcm'")
    per = images_per_patient
    if isinstance(per, bool) or not isinstance(per, int) or per < 1:
        raise ConfigError(f"Expected images_per_patient to be an integer >= 1, but got {per!r}; pass e.g. 1")
    rows: list[dict[str, str]] = []
    for split in (s for s in SPLITS if s in dataset.splits):
        data = dataset.splits[split]
        for i in range(len(data)):
            relative = f"images/{split}/{i:06d}.{fmt}"
            patient = f"{split}-{i // per:06d}"
            if fmt == "dcm":
                write_dicom(root / relative, data.images[i], elements={"PatientID": patient})
            else:
                _write_png(root / relative, data.images[i])
            row = {"path": relative, "label": dataset.class_names[int(data.labels[i])], "patient_id": patient}
            rows.append({**row, "split": split} if with_split else row)
    manifest = root / "manifest.csv"
    text = io.StringIO()
    columns = ["path", "label", "patient_id", *(["split"] if with_split else [])]
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(manifest, text.getvalue().encode())
    logger.info("Exported %d images of %s to %s", len(rows), dataset.label, manifest)
    return manifest


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export-manifest",
        help="write a dataset as DICOM (or PNG) files and a CSV manifest, as a hospital exports its data",
        description="Write every image of a dataset (.npz, image folder or synthetic) as one DICOM or PNG "
        "file and list them in OUT/manifest.csv (path, label, patient_id, split): test data for the "
        "manifest path, or a simulated site handed to the loader a hospital uses.",
    )
    p.add_argument("--data", help="the dataset to export; none: built-in SYNTHETIC images")
    p.add_argument("--out", type=Path, required=True, help="folder for manifest.csv and images/")
    p.add_argument("--format", choices=FORMATS, default="dcm", help="file type of the images")
    p.add_argument(
        "--images-per-patient", type=int, default=1, help="consecutive images of a split share a patient id"
    )
    p.add_argument(
        "--no-split", action="store_true", help="leave out the split column: the loader splits by patient"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ConfigError(
            f"Expected --out {args.out} to be a new or empty folder, but it is a file or holds files; "
            "pick another"
        )
    dataset = load_dataset(args.data)
    partial = args.out.with_name(f".{args.out.name}.partial")  # written whole, then renamed
    shutil.rmtree(partial, ignore_errors=True)
    export_manifest(
        dataset,
        partial,
        fmt=args.format,
        images_per_patient=args.images_per_patient,
        with_split=not args.no_split,
    )
    if args.out.exists():
        args.out.rmdir()
    partial.rename(args.out)
    manifest = args.out / "manifest.csv"
    print(f"{sum(len(s) for s in dataset.splits.values())} images of {dataset.label} -> {manifest}")
    return 0
