"""Image folders: ``root/<class>/*.png`` or ``root/<split>/<class>/*.png`` (labelled), or images alone.

Images (PNG, JPEG, TIFF, DICOM) are read by :func:`fedshift.common.image_files.read_image`: grey or
colour, ``image_size`` x ``image_size`` (PIL bilinear); the class names are the sorted class folder names.
:func:`image_folder_files` names the files in the order of the images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedshift.common.data import FIX_DATA, SPLITS, Dataset, ImageSet, check_two_classes
from fedshift.common.errors import DataError
from fedshift.common.image_files import KINDS, check_image_size, is_image_file, read_image_kind, stack_images

logger = logging.getLogger(__name__)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(path: Path) -> list[Path]:
    return sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p)
    )


def _folder_listing(root: Path, require: str) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted class folder names) and, per split, its image files with their class indices."""
    if not root.is_dir():
        raise DataError(f"Expected {root} to be a directory of class folders, but it is not; {FIX_DATA}")
    top = _subdirs(root)
    split_layout = bool(top) and {p.name for p in top} <= set(SPLITS)
    layout = {p.name: p for p in top} if split_layout else {"train": root}
    class_dirs = {s: _subdirs(d) for s, d in layout.items()}
    class_names = tuple(sorted({c.name for dirs in class_dirs.values() for c in dirs}))
    if len(class_names) < 2:
        where = " ".join(str(d) for d in layout.values())
        raise DataError(
            f"Expected at least 2 class folders in {where}, but found {len(class_names)} "
            f"({', '.join(repr(c) for c in class_names) or 'none'}); put each class's images "
            "in its own subfolder, e.g. normal/ and abnormal/"
        )
    if split_layout and require not in layout:
        raise DataError(
            f"Expected a '{require}' folder in {root}, but it has only {sorted(layout)}; "
            f"add root/{require}/<class>/ images"
        )
    listing: dict[str, list[tuple[Path, int]]] = {}
    for s in (s for s in SPLITS if s in class_dirs):
        listing[s] = []
        for cdir in class_dirs[s]:
            files = _image_files(cdir)
            if not files:
                logger.warning("Class folder %s has no %s images", cdir, KINDS)
            listing[s].extend((f, class_names.index(cdir.name)) for f in files)
    return class_names, listing


def _read_all(files: list[Path], image_size: int) -> tuple[list[np.ndarray], list[str]]:
    """Each file's image and kind (grey, grey-as-RGB or colour)."""
    read = [read_image_kind(f, image_size) for f in files]
    return [a for a, _ in read], [k for _, k in read]


def image_folder_files(path: str | Path, require: str = "train") -> dict[str, list[Path]]:
    """Per split, the image files :func:`load_image_folder` reads, in the order of its images."""
    _, listing = _folder_listing(Path(path), require)
    return {s: [f for f, _ in files] for s, files in listing.items()}


def load_image_folder(path: str | Path, image_size: int = 64, require: str = "train") -> Dataset:
    """Read ``root/<class>/*.png`` (all into "train") or ``root/<split>/<class>/*.png``.

    Class names are the sorted class folder names; images are read by
    :func:`~fedshift.common.image_files.read_image` (grey or colour, ``image_size`` squared).
    :func:`image_folder_files` names their files.
    """
    root = Path(path)
    image_size = check_image_size(image_size)
    class_names, listing = _folder_listing(root, require)
    splits: dict[str, ImageSet] = {}
    for s, files in listing.items():
        images, kinds = _read_all([f for f, _ in files], image_size)
        stack = stack_images(images, [f for f, _ in files], image_size, kinds)
        splits[s] = ImageSet(images=stack, labels=np.asarray([c for _, c in files], dtype=np.int64))
    if sum(len(v) for v in splits.values()) == 0:
        raise DataError(
            f"Expected {KINDS} images in the class folders of {root}, but found none; "
            "check the path and file extensions"
        )
    check_two_classes(splits, str(root))
    logger.info("Loaded %s: %s, classes %s", root, {k: len(v) for k, v in splits.items()}, class_names)
    return Dataset(splits=splits, class_names=class_names, source=str(root), synthetic=False)


def load_unlabeled_folder(path: str | Path, image_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """The images directly in ``path`` (no labels), ``image_size`` squared, and their file names."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Expected {root} to be a folder of images, but it is not; {FIX_DATA}")
    files = _image_files(root)
    if not files:
        raise DataError(
            f"Expected {KINDS} images in {root}, but found none; check the path and file extensions"
        )
    arrays, kinds = _read_all(files, check_image_size(image_size))
    images = stack_images(arrays, files, image_size, kinds)
    logger.info("Loaded %d unlabeled images from %s", len(files), root)
    return images, [f.name for f in files]
