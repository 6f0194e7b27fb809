"""One image file to pixels, for every reader in fedshift: PNG, JPEG, TIFF (PIL) and DICOM.

:func:`read_image` decodes one file (DICOM through :func:`fedshift.common.dicom.read_dicom`),
decides grey or colour and resizes it to ``image_size`` x ``image_size`` (PIL bilinear):

- each file has a kind: ``GREY`` (stored with one channel: L, I;16, MONOCHROME), ``GREY_AS_RGB`` (RGB
  whose three channels are equal everywhere: a grey export, or a white background tile) or ``COLOUR``.
  Grey and grey-as-RGB images are ``(S, S)`` uint8, colour ``(S, S, 3)``.
- grey or colour is decided per dataset (:func:`stack_images`): with any colour image, grey-as-RGB
  images are colour (their three equal channels); without one, the dataset is grey. Only a
  one-channel file among colour images is refused as mixed.
- 16-bit and float grey images (PNG/TIFF modes I;16, I, F) are min-max scaled per image to 0..255,
  as deep DICOM data without a window is; 8-bit data is used as is.
- alpha is dropped (LA, RGBA, PA); palette images go through their palette; CMYK/YCbCr become RGB.

Only one full-resolution array is alive at a time: each file is decoded, resized and released.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedshift.common.dicom import (
    DICOM_SUFFIXES,
    check_frame,
    error_reason,
    has_dicom_preamble,
    minmax_uint8,
    read_dicom,
)
from fedshift.common.errors import ConfigError, DataError

PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
IMAGE_SUFFIXES = PIL_SUFFIXES | DICOM_SUFFIXES
KINDS = "PNG/JPEG/TIFF/DICOM"


def _may_be_dicom(path: Path) -> bool:
    """No suffix, or a numeric one (``1.2.840.113619.2.5``): DICOM if it has the preamble."""
    return (path.suffix == "" or path.suffix[1:].isdigit()) and has_dicom_preamble(path)


def is_image_file(path: Path) -> bool:
    """Whether :func:`read_image` reads ``path``: a known suffix, or a DICOM file without one."""
    return path.suffix.lower() in IMAGE_SUFFIXES or _may_be_dicom(path)


def _pil_frame(im: object, path: Path, frame: int | None) -> None:
    """Seek a multi-page image (TIFF) to ``frame``; refuse several pages without one."""
    index = check_frame(int(getattr(im, "n_frames", 1)), frame, path, "page")
    if frame is not None:
        im.seek(index)  # type: ignore[attr-defined]


def _pil_pixels(path: Path, frame: int | None) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 pixels of a PNG/JPEG/TIFF file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _pil_frame(im, path, frame)
            if im.mode in ("L", "RGB"):
                return np.asarray(im, dtype=np.uint8)
            if im.mode in ("1", "LA", "La"):
                return np.asarray(im.convert("L"), dtype=np.uint8)
            if im.mode.startswith(("I", "F")):  # 16-bit / 32-bit / float grey
                return minmax_uint8(np.asarray(im))
            if im.mode in ("P", "PA") and "transparency" in im.info:
                return np.asarray(im.convert("RGBA").convert("RGB"), dtype=np.uint8)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"Expected an image file at {path}, but it does not exist; check the path") from exc
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"Expected {path} to be a readable {KINDS} image, but it cannot be decoded "
            f"({error_reason(exc)}); remove or replace the file"
        ) from exc


GREY, GREY_AS_RGB, COLOUR = "grey", "grey-as-RGB", "colour"


def decode_image(path: Path, frame: int | None = None) -> tuple[np.ndarray, str]:
    """Full-resolution uint8 pixels of one file and its kind: ``(H, W)`` grey or grey-as-RGB (its one
    channel), ``(H, W, 3)`` colour."""
    path = Path(path)
    is_dicom = path.suffix.lower() in DICOM_SUFFIXES or (
        path.suffix.lower() not in PIL_SUFFIXES and has_dicom_preamble(path)
    )
    pixels = read_dicom(path, frame) if is_dicom else _pil_pixels(path, frame)
    if pixels.ndim == 3:
        first = pixels[..., 0]
        if np.array_equal(first, pixels[..., 1]) and np.array_equal(first, pixels[..., 2]):
            return np.ascontiguousarray(first), GREY_AS_RGB
        return pixels, COLOUR
    return pixels, GREY


def resize_image(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """``pixels`` (grey or RGB uint8) resized to ``image_size`` squared, PIL bilinear."""
    from PIL import Image

    im = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    return np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)


def check_image_size(image_size: object) -> int:
    """``image_size`` as an int; ConfigError unless it is a positive integer."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ConfigError(
            f"Expected image_size to be a positive integer, but got {image_size!r}; pass e.g. 64"
        )
    return int(image_size)


def read_image_kind(path: Path, image_size: int, frame: int | None = None) -> tuple[np.ndarray, str]:
    """:func:`read_image` and the file's kind (``GREY``, ``GREY_AS_RGB`` or ``COLOUR``)."""
    size = check_image_size(image_size)
    pixels, kind = decode_image(path, frame)
    return resize_image(pixels, size), kind


def read_image(path: Path, image_size: int, frame: int | None = None) -> np.ndarray:
    """One file as ``(S, S)`` uint8 grey (or grey-as-RGB) or ``(S, S, 3)`` uint8 RGB, ``S = image_size``.

    ``frame`` chooses a frame of a multi-frame DICOM (or a page of a multi-page TIFF), which are
    refused without one. A file that cannot be read raises a one-line :class:`DataError` naming it.
    """
    return read_image_kind(path, image_size, frame)[0]


def is_colour(image: np.ndarray) -> bool:
    """Whether one image from :func:`read_image` (``(S, S)`` or ``(S, S, 3)``) is colour."""
    return image.ndim == 3


def mixed_error(kinds: Sequence[str], names: Sequence[str | Path]) -> DataError | None:
    """The error for one-channel grey files among colour ones (grey-as-RGB counts as colour), or None."""
    n_grey, n_colour = kinds.count(GREY), kinds.count(COLOUR)
    if not n_grey or not n_colour:
        return None
    n_colour = len(kinds) - n_grey
    few_colour = n_colour <= n_grey
    first = next(n for n, k in zip(names, kinds, strict=True) if (k != GREY) == few_colour)
    return DataError(
        f"Expected every image of one dataset to be grey-scale, or every one colour, but grey-scale "
        f"and colour images mixed in one dataset ({n_grey} grey-scale, {n_colour} "
        f"colour; first {'colour' if few_colour else 'grey-scale'} file {first}); convert them all "
        "to one kind (e.g. grey with PIL's Image.convert('L'), or colour with convert('RGB'))"
    )


def stack_images(
    arrays: Sequence[np.ndarray],
    names: Sequence[str | Path],
    image_size: int | None = None,
    kinds: Sequence[str] | None = None,
) -> np.ndarray:
    """Images of :func:`read_image` as ``(N, S, S)`` grey or ``(N, S, S, 3)`` colour uint8.

    ``kinds`` (from :func:`read_image_kind`; default: colour when 3-D, else grey): with any colour
    image, grey-as-RGB images get their three equal channels back; a grey one among colour raises
    :class:`DataError` naming the first file of the fewer kind. ``image_size``: an empty stack's shape.
    """
    if len(arrays) != len(names):
        raise ValueError(f"Expected one name per image, but got {len(names)} names for {len(arrays)} images")
    if not arrays:
        size = image_size or 0
        return np.zeros((0, size, size), np.uint8)
    kinds = list(kinds) if kinds is not None else [COLOUR if is_colour(a) else GREY for a in arrays]
    error = mixed_error(kinds, names)
    if error is not None:
        raise error
    if COLOUR in kinds:
        return np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays])
    return np.stack(arrays)
