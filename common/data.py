"""Image datasets: the MedMNIST ``.npz`` layout, image folders and a synthetic generator.

Everything here is plain numpy (PIL only to read folders, torch only in :func:`to_tensor`).
A :class:`Dataset` holds ``uint8`` images per split, all grey ``(N, H, W)`` or all colour
``(N, H, W, 3)``; ``synthetic`` marks generated
data so that every report can say so.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedshift.common.errors import ConfigError, DataError
from fedshift.common.io import atomic_write_bytes
from fedshift.common.synthetic_cxr import render_synthetic_cxr

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CLASS_NAMES_BINARY = ("normal", "abnormal")
SPLITS = ("train", "val", "test")
SYNTHETIC_SOURCE = "synthetic-cxr"

FIX_DATA = "pass --data with an existing .npz, .csv/.tsv manifest or image folder"
MANIFEST_SUFFIXES = frozenset({".csv", ".tsv"})


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and labels of one split."""

    images: np.ndarray  # (N, H, W) uint8 grey or (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64 class indices 0..C-1
    patients: np.ndarray | None = None  # (N,) str patient ids (a manifest's); None: each image its own

    def __post_init__(self) -> None:
        check_images(self.images)
        if self.labels.ndim != 1 or self.labels.dtype != np.int64:
            raise DataError(
                f"Expected labels to be a (N,) int64 array, but got shape {self.labels.shape} "
                f"and dtype {self.labels.dtype}; cast them with labels.astype(np.int64)"
            )
        if len(self.images) != len(self.labels):
            raise DataError(
                f"Expected as many labels as images, but got {len(self.images)} images and "
                f"{len(self.labels)} labels; give every image exactly one label"
            )
        if self.patients is not None and self.patients.shape != self.labels.shape:
            raise DataError(
                f"Expected one patient id per image, but got {self.patients.shape} ids for "
                f"{len(self.labels)} images; pass patients=None when the images have no patient ids"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        """1 for grey ``(N, H, W)`` images, 3 for colour ``(N, H, W, 3)``."""
        return image_channels(self.images)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Number of images per class, length ``num_classes`` (int64)."""
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at ``idx`` (integer indices or a boolean mask), as copies."""
        idx = np.asarray(idx)
        patients = None if self.patients is None else self.patients[idx].copy()
        return ImageSet(images=self.images[idx].copy(), labels=self.labels[idx].copy(), patients=patients)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset with named splits."""

    splits: dict[str, ImageSet]  # keys among "train", "val", "test"
    class_names: tuple[str, ...]  # one name per class index
    source: str  # a path, or "synthetic-cxr"
    synthetic: bool  # True for generated data; shown as "SYNTHETIC" in every report

    def __post_init__(self) -> None:
        unknown = sorted(set(self.splits) - set(SPLITS))
        if not self.splits or unknown:
            raise DataError(
                f"Expected split names among {list(SPLITS)}, but got {sorted(self.splits)}; rename the splits"
            )
        if len(self.class_names) < 1:
            raise DataError("Expected at least one class name, but got none; pass class_names")
        kinds = {name: s.channels for name, s in self.splits.items() if len(s)}
        if len(set(kinds.values())) > 1:
            raise DataError(
                f"Expected one kind of image in {self.label}, but its splits mix grey and colour "
                f"(channels {kinds}); convert every image to grey or every image to RGB"
            )
        shapes = {s.images.shape[1:] for s in self.splits.values() if len(s)}
        if len(shapes) > 1:
            raise DataError(
                f"Expected every split to have the same image size, but got {sorted(shapes)}; "
                "resize the images to one size"
            )
        for name, subset in self.splits.items():
            if len(subset) and int(subset.labels.max()) >= len(self.class_names):
                raise DataError(
                    f"Expected labels below {len(self.class_names)} (the number of class names), "
                    f"but split '{name}' has label {int(subset.labels.max())}; "
                    "pass one class name per class"
                )

    def split(self, name: str) -> ImageSet:
        """The split called ``name``; :class:`DataError` naming the available ones if missing."""
        if name not in self.splits:
            raise DataError(
                f"Expected a '{name}' split in {self.label}, but it has only "
                f"{sorted(self.splits)}; use one of those or add a '{name}' split"
            )
        return self.splits[name]

    @property
    def channels(self) -> int:
        """Image channels of every split: 1 (grey) or 3 (colour)."""
        kinds = [s.channels for s in self.splits.values() if len(s)]
        return kinds[0] if kinds else next(iter(self.splits.values())).channels

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    @property
    def label(self) -> str:
        """Short name for reports, e.g. ``pneumoniamnist.npz`` or ``synthetic-cxr (SYNTHETIC)``."""
        name = Path(self.source).name or self.source
        return f"{name} (SYNTHETIC)" if self.synthetic else name

    def pooled(self) -> ImageSet:
        """All splits concatenated, in train, val, test order."""
        parts = [self.splits[s] for s in SPLITS if s in self.splits]
        ids = [p.patients for p in parts]
        return ImageSet(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            patients=None if any(i is None for i in ids) else np.concatenate(ids),  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------- npz


def image_channels(images: np.ndarray) -> int:
    """1 for a grey ``(N, H, W)`` array, 3 for a colour ``(N, H, W, 3)`` one."""
    return 3 if images.ndim == 4 else 1


def check_images(images: np.ndarray) -> None:
    """:class:`DataError` unless ``images`` is ``(N, H, W)`` or ``(N, H, W, 3)`` uint8."""
    kind_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
    if not kind_ok or images.dtype != np.uint8:
        raise DataError(
            f"Expected images to be a (N, H, W) grey or (N, H, W, 3) RGB uint8 array, but got shape "
            f"{images.shape} and dtype {images.dtype}; convert them to grey or RGB uint8"
        )


def _as_uint8_images(images: np.ndarray, key: str, path: Path) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        pass
    elif images.ndim != 3:
        raise DataError(
            f"Expected '{key}' in {path} to have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), "
            f"but got {images.shape}; save grayscale or RGB images in the MedMNIST layout"
        )
    if images.dtype != np.uint8:
        ok = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
        if ok and images.size:
            ok = bool(np.all(np.isfinite(images))) and bool(np.all(images == np.round(images)))
            ok = ok and float(images.min()) >= 0 and float(images.max()) <= 255
        if not ok:
            raise DataError(
                f"Expected '{key}' in {path} to be uint8 pixel values 0..255, but got dtype "
                f"{images.dtype}; convert the images with np.clip(x, 0, 255).astype(np.uint8)"
            )
        images = images.astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return np.ascontiguousarray(images)


def _as_labels(labels: np.ndarray, key: str, path: Path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"Expected '{key}' in {path} to have shape (N,) or (N, 1), but got {labels.shape}; "
            "store one integer class index per image"
        )
    if labels.dtype == np.bool_:
        labels = labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating):
        finite = bool(np.all(np.isfinite(labels)))
        if not finite or not bool(np.all(labels == np.round(labels))):
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels))][0].item()
            raise DataError(
                f"Expected integer class labels in '{key}' of {path}, but got non-integer label "
                f"{bad!r}; store class indices 0..C-1 (soft or multi-label labels are unsupported)"
            )
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"Expected integer class labels in '{key}' of {path}, but got non-numeric dtype "
            f"{labels.dtype}; store class indices 0..C-1 and the names under 'class_names'"
        )
    if labels.size and float(labels.min()) < 0:
        raise DataError(
            f"Expected non-negative class labels in '{key}' of {path}, but got negative label "
            f"{labels.min().item()}; store class indices 0..C-1"
        )
    return labels.astype(np.int64)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                f"Expected {path} to be an .npz archive, but it holds a single array; "
                "save it with np.savez or fedshift's save_npz"
            )
        with loaded as archive:
            return {k: np.asarray(archive[k]) for k in archive.files}
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"Expected {path} to be a valid .npz archive, but it cannot be read ({exc}); "
            "the file is corrupt or not an .npz: re-download or re-export it"
        ) from exc


def default_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == 2:
        return CLASS_NAMES_BINARY
    return tuple(f"class-{i}" for i in range(num_classes))


def check_two_classes(splits: dict[str, ImageSet], where: str) -> None:
    present = np.unique(np.concatenate([s.labels for s in splits.values()]))
    if present.size < 2:
        raise DataError(
            f"Expected at least 2 classes in {where}, but found {present.size} "
            f"({present.tolist()}); a classifier needs examples of every class"
        )


def _npz_split(
    arrays: dict[str, np.ndarray], s: str, path: Path, *, labelled: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Split ``s``'s images and labels (``None`` when not stored and not ``labelled``), checked."""
    ikey, lkey = f"{s}_images", f"{s}_labels"
    if ikey not in arrays or (labelled and lkey not in arrays):
        missing = ikey if ikey not in arrays else lkey
        raise DataError(
            f"Expected both '{ikey}' and '{lkey}' in {path}, but '{missing}' is missing; "
            "save images and labels together"
        )
    images = _as_uint8_images(arrays[ikey], ikey, path)
    if lkey not in arrays:
        return images, None
    labels = _as_labels(arrays[lkey], lkey, path)
    if len(images) != len(labels):
        raise DataError(
            f"Expected as many labels as images in split '{s}' of {path}, but got "
            f"{len(images)} images and {len(labels)} labels; re-export the split"
        )
    return images, labels


def load_npz_split(
    path: str | Path, split: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """One split of an ``.npz`` to predict on: its images, its labels if stored (else ``None``) and the
    stored class names (else ``None``). Unlike :func:`load_npz` it needs neither labels nor two classes:
    new patients' images may have neither."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No such data file: {path}; {FIX_DATA}")
    arrays = _read_npz(path)
    if f"{split}_images" not in arrays:
        have = [s for s in SPLITS if f"{s}_images" in arrays]
        raise DataError(
            f"Expected a '{split}' split ('{split}_images') in {path}, but it has {have}; pass one as --split"
        )
    images, labels = _npz_split(arrays, split, path, labelled=False)
    names = (
        tuple(str(n) for n in np.asarray(arrays["class_names"]).ravel()) if "class_names" in arrays else None
    )
    return images, labels, names


def load_npz(path: str | Path, require: str = "train") -> Dataset:
    """Read a MedMNIST-v2-style ``.npz``: ``{split}_images`` and ``{split}_labels``; it must hold the split
    ``require`` (training needs ``train``; a test-only file serves ``require="test"``)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"Expected {path} to be an .npz file, but it is a directory; "
            "use fedshift.common.image_folders (or load_dataset) for image folders"
        )
    if not path.is_file():
        raise DataError(f"No such data file: {path}; {FIX_DATA}")
    arrays = _read_npz(path)
    found = [s for s in SPLITS if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    if not found:
        raise DataError(
            f"Expected {path} to contain '<split>_images' and '<split>_labels' arrays "
            f"(split among {list(SPLITS)}), but it has keys {sorted(arrays)}; "
            "save it in the MedMNIST layout (e.g. train_images, train_labels)"
        )
    splits: dict[str, ImageSet] = {}
    for s in found:
        images, labels = _npz_split(arrays, s, path, labelled=True)
        assert labels is not None
        splits[s] = ImageSet(images=images, labels=labels)
    if require not in splits:
        raise DataError(
            f"Expected a '{require}' split in {path}, but it has only {sorted(splits)}; "
            f"add {require}_images and {require}_labels"
        )
    check_two_classes(splits, str(path))
    num_classes = max(int(s.labels.max()) for s in splits.values() if len(s)) + 1
    if "class_names" in arrays:
        names = tuple(str(n) for n in np.asarray(arrays["class_names"]).ravel())
        if len(names) < num_classes:
            raise DataError(
                f"Expected at least {num_classes} entries in 'class_names' of {path}, but got "
                f"{len(names)} ({list(names)}); store one name per class"
            )
    else:
        names = default_class_names(num_classes)
    synthetic = bool(np.asarray(arrays["synthetic"]).item()) if "synthetic" in arrays else False
    logger.info("Loaded %s: %s", path, {k: len(v) for k, v in splits.items()})
    return Dataset(splits=splits, class_names=names, source=str(path), synthetic=synthetic)


def save_npz(path: str | Path, dataset: Dataset) -> None:
    """Write ``dataset`` in the layout :func:`load_npz` reads, atomically (temp file + rename).

    The file is written exactly at ``path`` (no ``.npz`` is appended).
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, subset in dataset.splits.items():
        small = len(subset) == 0 or int(subset.labels.max()) < 256
        arrays[f"{name}_images"] = subset.images
        arrays[f"{name}_labels"] = subset.labels.astype(np.uint8 if small else np.int64)[:, None]
    arrays["class_names"] = np.asarray(dataset.class_names, dtype=str)
    arrays["synthetic"] = np.asarray(dataset.synthetic, dtype=bool)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("Saved %s (%s)", path, {k: len(v) for k, v in dataset.splits.items()})


# ------------------------------------------------------------------ synthetic CXR


def check_synthetic(n: int, prevalence: float, size: int) -> None:
    """:class:`ConfigError` unless a synthetic generator can make ``n`` images of side ``size``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"Expected the number of synthetic images to be a positive integer, but got {n!r}; "
            "pass e.g. --synthetic-n 2000"
        )
    if not 0.0 <= float(prevalence) <= 1.0:
        raise ConfigError(f"Expected prevalence to be in [0, 1], but got {prevalence!r}; pass e.g. 0.5")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ConfigError(f"Expected size to be an integer >= 8, but got {size!r}; pass e.g. 28")


def make_synthetic_cxr(n: int, prevalence: float = 0.5, size: int = 28, seed: int = 0) -> Dataset:
    """SYNTHETIC chest-X-ray-like images; label 1 = a soft bright opacity in one lung.

    Exactly ``round(n * prevalence)`` positives, shuffled; deterministic for a seed.
    """
    check_synthetic(n, prevalence, size)
    images, labels = render_synthetic_cxr(n, prevalence, size, seed)
    positives = round(n * prevalence)
    logger.info("Generated %d SYNTHETIC chest X-rays (%d with lesion), size %d", n, positives, size)
    return Dataset(
        splits={"train": ImageSet(images=images, labels=labels)},
        class_names=CLASS_NAMES_BINARY,
        source=SYNTHETIC_SOURCE,
        synthetic=True,
    )


# ------------------------------------------------------------------ entry points


def load_dataset(
    path: str | Path | None,
    *,
    synthetic_n: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    require: str = "train",
    state_dir: Path | None = None,
) -> Dataset:
    """``None`` -> synthetic data; a ``.npz`` file -> :func:`load_npz`; a folder -> images; a ``.csv`` or
    ``.tsv`` manifest -> :func:`fedshift.common.manifest.load_manifest` (its split saved in and its decode
    cache under ``state_dir`` when given); each must hold the split ``require``."""
    if path is None:
        return make_synthetic_cxr(synthetic_n, 0.5, size=28, seed=seed)
    p = Path(path)
    if p.is_dir():
        from fedshift.common.image_folders import load_image_folder

        return load_image_folder(p, image_size=image_size, require=require)
    if not p.exists():
        raise DataError(f"No such data file: {p}; {FIX_DATA}")
    if p.suffix.lower() == ".npz":
        return load_npz(p, require=require)
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        from fedshift.common.manifest import load_manifest

        return load_manifest(p, image_size=image_size, state_dir=state_dir, seed=seed, require=require)
    raise DataError(
        f"Expected --data to be an .npz file, a .csv/.tsv manifest or an image folder, but got {p} "
        f"(suffix '{p.suffix}'); {FIX_DATA}"
    )


CHANNELS_KEY = "image-channels"


def check_channels(images: np.ndarray, expected: int, where: str = "the data") -> None:
    """:class:`DataError` unless ``images`` have ``expected`` channels (the model's run-config
    ``image-channels``)."""
    got = image_channels(images)
    if got != expected:
        kinds = {1: "grey", 3: "colour (RGB)"}
        want = kinds.get(expected, str(expected))
        raise DataError(
            f"Expected {want} images for this model ({CHANNELS_KEY} = {expected}), but {where} has "
            f"{kinds[got]} images ({got} channel{'s' if got > 1 else ''}); set {CHANNELS_KEY} = {got} in "
            f"the run config, or convert the images to {want}"
        )


def check_fits(data: Dataset, channels: int, num_classes: int, where: str = "the data") -> None:
    """:class:`DataError` unless a model of ``channels`` and ``num_classes`` (the run config's) can take
    ``data``: its images have those channels, its labels are below ``num_classes``, and class names (not
    indices) name every class, so that each class has one index at every site."""
    first = next((s for s in data.splits.values() if len(s)), None)
    if first is not None:
        check_channels(first.images, channels, where)
    top = max((int(s.labels.max()) for s in data.splits.values() if len(s)), default=-1)
    named = data.class_names != default_class_names(data.num_classes)
    if top >= num_classes or (named and data.num_classes != num_classes):
        raise DataError(
            f"Expected the {num_classes} classes of this model (num-classes = {num_classes}), but {where} "
            f"has {data.num_classes} ({', '.join(data.class_names)}); set num-classes = {data.num_classes} "
            "in the run config, or label the rows with class indices 0..num-classes-1 (names must name every "
            "class, so that each class has one index at every site)"
        )


def to_tensor(images: np.ndarray, image_size: int, channels: int | None = None) -> torch.Tensor:
    """``(N, H, W)`` or ``(N, H, W, 3)`` uint8 -> float32 ``(N, C, S, S)`` in [0, 1] (antialiased bilinear
    resize); ``channels`` (the model's ``in_chans``), when given, must be the images' ``C``."""
    import torch
    import torch.nn.functional as F

    from fedshift.common.image_files import check_image_size

    check_images(images)
    if channels is not None:
        check_channels(images, channels)
    image_size = check_image_size(image_size)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x = x.permute(0, 3, 1, 2).contiguous() if images.ndim == 4 else x.unsqueeze(1)
    if images.shape[1:3] != (image_size, image_size) and len(images):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    elif len(images) == 0:
        x = x.new_zeros((0, x.shape[1], image_size, image_size))
    return x
