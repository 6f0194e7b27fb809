"""One image file to pixels, for every reader in fedshift: PNG, JPEG, TIFF (PIL) and DICOM.

:func:`read_image` decodes one file (DICOM through :func:`fedshift.common.dicom.read_dicom`),
decides grey or colour and resizes it to ``image_size`` x ``image_size`` (PIL bilinear):

- grey: a one-channel image, or an RGB image whose three channels are equal everywhere (exports
  often store grey as RGB); returned as ``(S, S)`` uint8. Colour: ``(S, S, 3)`` uint8 RGB.
- 16-bit and float grey images (PNG/TIFF modes I;16, I, F) are min-max scaled per image to 0..255,
  as deep DICOM data without a window is; 8-bit data is used as is.
- alpha is dropped (LA, RGBA, PA); palette images go through their palette; CMYK/YCbCr become RGB.

Only one full-resolution array is alive at a time: each file is decoded, resized and released.
:func:`stack_images` stacks the results and refuses grey-scale and colour mixed in one dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedshift.common.dicom import DICOM_SUFFIXES, error_reason, has_dicom_preamble, minmax_uint8, read_dicom
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
    n = int(getattr(im, "n_frames", 1))
    if frame is None:
        if n > 1:
            raise DataError(
                f"Expected one image in {path}, but it has {n} pages; choose one with the manifest's "
                f"'frame' column (or frame=0..{n - 1})"
            )
        return
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer) or not 0 <= frame < n:
        raise DataError(
            f"Expected a frame in 0..{n - 1} for {path} ({n} page{'s' * (n > 1)}), but got {frame!r}; "
            "fix the manifest's 'frame' value"
        )
    im.seek(int(frame))  # type: ignore[attr-defined]


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


def decode_image(path: Path, frame: int | None = None) -> np.ndarray:
    """Full-resolution ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 pixels of one file (grey-as-RGB -> grey)."""
    path = Path(path)
    is_dicom = path.suffix.lower() in DICOM_SUFFIXES or (
        path.suffix.lower() not in PIL_SUFFIXES and has_dicom_preamble(path)
    )
    pixels = read_dicom(path, frame) if is_dicom else _pil_pixels(path, frame)
    if pixels.ndim == 3:
        first = pixels[..., 0]
        if np.array_equal(first, pixels[..., 1]) and np.array_equal(first, pixels[..., 2]):
            return np.ascontiguousarray(first)
    return pixels


def resize_image(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """``pixels`` (grey or RGB uint8) resized to ``image_size`` squared, PIL bilinear."""
    from PIL import Image

    im = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    return np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_image(path: Path, image_size: int, frame: int | None = None) -> np.ndarray:
    """One file as ``(S, S)`` uint8 grey or ``(S, S, 3)`` uint8 RGB, ``S = image_size``.

    ``frame`` chooses a frame of a multi-frame DICOM (or a page of a multi-page TIFF), which are
    refused without one. A file that cannot be read raises a one-line :class:`DataError` naming it.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ConfigError(
            f"Expected image_size to be a positive integer, but got {image_size!r}; pass e.g. 64"
        )
    return resize_image(decode_image(path, frame), int(image_size))


def is_colour(image: np.ndarray) -> bool:
    """Whether one image from :func:`read_image` (``(S, S)`` or ``(S, S, 3)``) is colour."""
    return image.ndim == 3


def stack_images(
    arrays: Sequence[np.ndarray], names: Sequence[str | Path], image_size: int | None = None
) -> np.ndarray:
    """Images of :func:`read_image` as ``(N, S, S)`` grey or ``(N, S, S, 3)`` colour uint8.

    Grey-scale and colour mixed raise :class:`DataError` naming the first file of the fewer kind.
    ``image_size`` gives the shape of an empty stack, ``(0, S, S)``.
    """
    if len(arrays) != len(names):
        raise ValueError(f"Expected one name per image, but got {len(names)} names for {len(arrays)} images")
    if not arrays:
        size = image_size or 0
        return np.zeros((0, size, size), np.uint8)
    colour = [is_colour(a) for a in arrays]
    n_colour = sum(colour)
    if 0 < n_colour < len(arrays):
        few_colour = n_colour <= len(arrays) - n_colour
        first = names[colour.index(few_colour)]
        raise DataError(
            f"Expected every image of one dataset to be grey-scale, or every one colour, but grey-scale "
            f"and colour images mixed in one dataset ({len(arrays) - n_colour} grey-scale, {n_colour} "
            f"colour; first {'colour' if few_colour else 'grey-scale'} file {first}); convert them all "
            "to one kind (e.g. grey with PIL's Image.convert('L'), or colour with convert('RGB'))"
        )
    return np.stack(arrays)
