"""DICOM display pixels: one file (one frame) to ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)``.

Grey-scale (MONOCHROME1/2) follows DICOM PS3.3 C.11: the modality LUT (Rescale Slope/Intercept or a
Modality LUT Sequence), then the VOI: a VOI LUT Sequence, else Window Center/Width (the first value
when there are several) with the VOI LUT Function LINEAR (default), LINEAR_EXACT or SIGMOID, written
out to 0..255. With no VOI, unsigned 8-bit data with no modality transform is used as is (fewer stored
bits, e.g. 1-bit masks, are stretched to 0..255); anything else is min-max scaled per image to 0..255
(:func:`minmax_uint8`). MONOCHROME1 is then inverted (255 - y), and the result rounded. Colour (RGB,
YBR_* converted to RGB by pydicom, PALETTE COLOR through its palette) is scaled from its stored bit
depth to 0..255.

Only the chosen frame's pixel data is read (``pydicom.pixels.pixel_array`` with an ``index``).
Compressed transfer syntaxes need pydicom's decoder plugins (``pip install "fedshift[dicom]"``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshift.common.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
INSTALL_DECODERS = 'pip install "fedshift[dicom]"'
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def has_dicom_preamble(path: Path) -> bool:
    """Whether ``path`` has the DICOM file preamble: ``b"DICM"`` at byte 128."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def minmax_uint8(values: np.ndarray) -> np.ndarray:
    """``values`` min-max scaled per image to 0..255 and rounded (a constant image becomes 0)."""
    x = np.asarray(values)
    if x.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    y = x.astype(np.float32)  # float32: well within one grey level, half the memory traffic
    y -= lo
    y *= 255.0 / (hi - lo)
    return np.rint(y, out=y).astype(np.uint8)


def _package_hint(ts: UID) -> str:
    """The packages that decode transfer syntax ``ts`` (pydicom's plugins), for an error message."""
    from pydicom import uid

    if ts in uid.JPEGLSTransferSyntaxes:
        return f"{INSTALL_DECODERS} (pylibjpeg + pylibjpeg-libjpeg) or pip install pyjpegls"
    if ts in uid.JPEGTransferSyntaxes:
        return f"{INSTALL_DECODERS} (pylibjpeg + pylibjpeg-libjpeg)"
    if ts in uid.JPEG2000TransferSyntaxes or ts.keyword.startswith("HTJ2K"):
        return f"{INSTALL_DECODERS} (pylibjpeg + pylibjpeg-openjpeg)"
    if ts in uid.RLETransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-rle (or numpy, for pydicom's own RLE decoder)"
    return f"{INSTALL_DECODERS} (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"


def error_reason(exc: BaseException) -> str:
    """``exc`` as one short line, for an error message."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _read_header(path: Path) -> Dataset:
    """The dataset without its pixel data; DataError for a file that is not readable DICOM."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        header = dcmread(path, stop_before_pixels=True)
    except FileNotFoundError as exc:
        raise DataError(f"Expected a DICOM file at {path}, but it does not exist; check the path") from exc
    except InvalidDicomError as exc:
        raise DataError(
            f"Expected {path} to be a DICOM file, but it has no DICOM preamble ('DICM' at byte 128); "
            "export it from PACS as a DICOM Part 10 file or remove it"
        ) from exc
    except Exception as exc:  # pydicom raises many kinds on a truncated or corrupt header
        raise DataError(
            f"Expected {path} to be a readable DICOM file, but its header is corrupt "
            f"({error_reason(exc)}); re-export the file or remove it"
        ) from exc
    if "Rows" not in header or "PhotometricInterpretation" not in header:
        raise DataError(
            f"Expected {path} to be a DICOM image, but it has no pixel data (e.g. a report or "
            "structured document); remove it from the image list"
        )
    return header


def _check_decoder(header: Dataset, path: Path) -> None:
    """DataError naming the transfer syntax and the package when no decoder for it is installed."""
    from pydicom.pixels import get_decoder

    ts = header.file_meta.get("TransferSyntaxUID") if hasattr(header, "file_meta") else None
    if ts is None:
        raise DataError(
            f"Expected {path} to name its transfer syntax (0002,0010) in its file meta, but it has none; "
            "re-export it as a DICOM Part 10 file"
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DataError(
            f"Expected a transfer syntax pydicom can decode in {path}, but it is {ts.name} ({ts}); "
            "convert the file to an uncompressed transfer syntax (e.g. with gdcmconv --raw)"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DataError(
            f"Expected a decoder for {path}'s transfer syntax {ts.name} ({ts}), but none is installed "
            f"(pydicom's plugins: {missing}); install one with {_package_hint(ts)}"
        )


def check_frame(n: int, frame: int | None, path: Path, unit: str = "frame") -> int:
    """The 0-based frame (or page, ``unit``) of a file of ``n``: a file of several needs ``frame``."""
    if frame is None:
        if n > 1:
            raise DataError(
                f"Expected one image in {path}, but it has {n} {unit}s; choose one with the manifest's "
                f"'frame' column (or frame=0..{n - 1})"
            )
        return 0
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer) or not 0 <= frame < n:
        raise DataError(
            f"Expected a frame in 0..{n - 1} for {path} ({n} {unit}{'s' * (n > 1)}), but got {frame!r}; "
            "fix the manifest's 'frame' value"
        )
    return int(frame)


def _frame_index(header: Dataset, path: Path, frame: int | None) -> int:
    """The 0-based frame to read: refuses a multi-frame file without ``frame`` and a frame out of range."""
    return check_frame(int(_number(header, "NumberOfFrames", path) or 1), frame, path)


def _decode(path: Path, index: int) -> np.ndarray:
    """Frame ``index`` of ``path``'s pixel data (YBR converted to RGB by pydicom)."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(path, index=index)
    except Exception as exc:  # decoders raise many kinds on corrupt or truncated pixel data
        raise DataError(
            f"Expected {path} to hold decodable pixel data, but decoding failed "
            f"({error_reason(exc)}); re-export the file or remove it"
        ) from exc


def _number(header: Dataset, keyword: str, path: Path) -> float | None:
    """The (first) value of a numeric element, None when absent or empty; DataError when not a number."""
    from pydicom.multival import MultiValue

    value = _present(header, keyword)
    if value is None:
        return None
    try:
        number = float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
    except (ValueError, TypeError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise DataError(
            f"Expected a number in {keyword} of {path}, but got {str(value)[:60]!r}; "
            "fix or remove the element"
        )
    return number


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window ``x`` to 0..255 (float32) by DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = np.array(x, dtype=np.float32)  # a copy, transformed in place
    if function == "SIGMOID":
        x -= center  # 255 / (1 + exp(-4 (x - c) / w)) as tanh, which cannot overflow
        x *= 2.0 / width
        np.tanh(x, out=x)
        x += 1.0
        x *= 127.5
        return x
    c, w = (center - 0.5, width - 1.0) if function == "LINEAR" else (center, width)
    if w <= 0:  # LINEAR with width 1: a threshold at c
        return np.where(x > c, 255.0, 0.0).astype(np.float32)
    x -= c  # ((x - c) / w + 0.5) * 255, clipped to 0..255
    x *= 255.0 / w
    x += 127.5
    return np.clip(x, 0.0, 255.0, out=x)


def _windowing(x: np.ndarray, header: Dataset, path: Path) -> np.ndarray:
    """Window Center/Width (first values) and the VOI LUT Function applied to ``x``."""
    center, width = _number(header, "WindowCenter", path), _number(header, "WindowWidth", path)
    assert center is not None and width is not None  # checked by the caller
    function = str(_present(header, "VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        raise DataError(
            f"Expected VOI LUT Function {' / '.join(_VOI_FUNCTIONS)} in {path}, but got {function!r}; "
            "fix (0028,1056) or remove it (LINEAR is the default)"
        )
    if width < 1 if function == "LINEAR" else width <= 0:
        raise DataError(
            f"Expected a Window Width of at least 1 ({function}: > 0) in {path}, but got {width}; "
            "fix (0028,1051) or remove the window"
        )
    return window(x, center, width, function)


def _lut_data(item: Dataset, entries: int, header: Dataset) -> np.ndarray:
    """The LUT Data of a LUT item as integers (US words, or OW bytes in the file's byte order)."""
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, bytes):
        if len(element.value) == entries and int(item.LUTDescriptor[2]) == 8:
            return np.frombuffer(element.value, np.uint8).astype(np.int64)  # 8-bit entries packed
        little = getattr(header, "original_encoding", (None, True))[1] is not False
        return np.frombuffer(element.value, "<u2" if little else ">u2").astype(np.int64)
    values = element.value
    return np.asarray([values] if isinstance(values, int) else list(values), dtype=np.int64)


def _voi_lut(x: np.ndarray, header: Dataset, path: Path) -> np.ndarray:
    """The first VOI LUT Sequence item applied to ``x``, scaled from its entry depth to 0..255.

    The lookup is done here (any number of entries at any depth 8..16); values below the first
    mapped value take the first entry, above the last the last entry (PS3.3 C.11.2.1.1).
    """
    item = header.VOILUTSequence[0]
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        if int(header.get("PixelRepresentation", 0)) == 1 and first >= 2**15:
            first -= 2**16  # a signed first value written as US
        lut = _lut_data(item, entries, header)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"Expected a valid VOI LUT Sequence in {path}, but it cannot be read ({error_reason(exc)}); "
            "re-export the file or remove its VOI LUT Sequence"
        ) from exc
    if not 8 <= bits <= 16 or len(lut) < entries:
        raise DataError(
            f"Expected a VOI LUT of {entries} entries of 8..16 bits in {path}, but it has {len(lut)} "
            f"entries of {bits} bits; re-export the file or remove its VOI LUT Sequence"
        )
    iv = np.clip(np.rint(x), first, first + entries - 1).astype(np.int64)
    iv -= first
    return lut[iv].astype(np.float32) * (255.0 / (2**bits - 1))


def _present(header: Dataset, keyword: str) -> Any | None:
    """The value of ``keyword``, or None when it is absent or empty."""
    from pydicom.multival import MultiValue

    value = header.get(keyword)
    if value is None or (isinstance(value, str | bytes | list | tuple | MultiValue) and len(value) == 0):
        return None
    return value


_FRAME_GROUPS = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


def _apply_functional_groups(header: Dataset, index: int) -> None:
    """Enhanced multi-frame files: copy the shared, then frame ``index``'s, rescale and window to the top."""
    shared, per_frame = (
        header.get("SharedFunctionalGroupsSequence"),
        header.get("PerFrameFunctionalGroupsSequence"),
    )
    items = ([shared[0]] if shared else []) + (
        [per_frame[index]] if per_frame and index < len(per_frame) else []
    )
    for item in items:
        for sequence, keywords in _FRAME_GROUPS:
            if group := item.get(sequence):
                for keyword in (k for k in keywords if k in group[0]):
                    setattr(header, keyword, group[0][keyword].value)


def _modality(stored: np.ndarray, header: Dataset, path: Path) -> tuple[np.ndarray, bool]:
    """The modality LUT (sequence) or rescale applied to ``stored``, and whether it changed anything."""
    from pydicom.pixels import apply_modality_lut

    if header.get("ModalityLUTSequence"):
        try:
            return apply_modality_lut(stored, header), True
        except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
            raise DataError(
                f"Expected a valid Modality LUT Sequence in {path}, but it cannot be applied "
                f"({error_reason(exc)}); re-export the file or remove its Modality LUT Sequence"
            ) from exc
    slope, intercept = _number(header, "RescaleSlope", path), _number(header, "RescaleIntercept", path)
    s = 1.0 if slope is None else slope
    i = 0.0 if intercept is None else intercept
    if (s, i) == (1.0, 0.0):
        return stored, False
    x = stored.astype(np.float32)
    x *= s
    x += i
    return x, True


def _grey(stored: np.ndarray, header: Dataset, path: Path) -> np.ndarray:
    """Grey display pixels: modality LUT, VOI (or 8-bit as is / min-max), MONOCHROME1 inverted."""
    x, transformed = _modality(stored, header, path)
    lut = header.get("VOILUTSequence")
    bits = int(header.get("BitsStored", 8))
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        y = _voi_lut(x, header, path)
    elif _present(header, "WindowCenter") is not None and _present(header, "WindowWidth") is not None:
        y = _windowing(x, header, path)
    elif bits <= 8 and int(header.get("PixelRepresentation", 0)) == 0 and not transformed:
        y = x.astype(np.float32) * (255.0 / (2**bits - 1))
    else:
        y = minmax_uint8(x).astype(np.float32)
    if header.PhotometricInterpretation == "MONOCHROME1":
        np.subtract(255.0, y, out=y)
    np.clip(y, 0.0, 255.0, out=y)
    return np.rint(y, out=y).astype(np.uint8)


def _colour(arr: np.ndarray, header: Dataset, path: Path) -> np.ndarray:
    """RGB display pixels: a palette applied, then scaled from the stored depth to 0..255."""
    photometric = header.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, header)[..., :3]
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise DataError(
                f"Expected a valid Palette Color LUT in {path}, but it cannot be applied "
                f"({error_reason(exc)}); re-export the file as RGB"
            ) from exc
        bits = int(header.RedPaletteColorLookupTableDescriptor[2])  # nominal entry depth
    else:
        bits = int(header.get("BitsStored", 8))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(
            f"Expected 3 samples per pixel for {photometric} in {path}, but got shape {arr.shape}; "
            "re-export the file"
        )
    if bits == 8:
        return arr.astype(np.uint8)
    return np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1))).clip(0, 255).astype(np.uint8)


def read_dicom(path: Path, frame: int | None = None) -> np.ndarray:
    """Display pixels of ``path``: ``(H, W)`` uint8 grey, or ``(H, W, 3)`` uint8 RGB.

    ``frame`` (0-based) chooses a frame of a multi-frame file, which is refused without one.
    Any unreadable, corrupt or undecodable file raises a one-line :class:`DataError` naming it.
    """
    path = Path(path)
    header = _read_header(path)
    photometric = str(header.PhotometricInterpretation)
    if photometric not in _GREY + _COLOUR:
        raise DataError(
            f"Expected a photometric interpretation of {', '.join(_GREY + _COLOUR)} in {path}, "
            f"but got {photometric!r}; convert the file to MONOCHROME2 or RGB"
        )
    _check_decoder(header, path)
    index = _frame_index(header, path, frame)
    arr = _decode(path, index)
    _apply_functional_groups(header, index)
    if photometric in _GREY:
        if arr.ndim != 2:
            raise DataError(
                f"Expected one sample per pixel for {photometric} in {path}, but got shape {arr.shape}; "
                "re-export the file"
            )
        return _grey(arr, header, path)
    return _colour(arr, header, path)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str | None = None,
    bits_stored: int | None = None,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    elements: dict[str, Any] | None = None,
) -> None:
    """Write ``pixels`` as a DICOM Part 10 file (Secondary Capture), atomically.

    ``pixels``: uint8/uint16/int8/int16, ``(H, W)`` grey, ``(H, W, 3)`` RGB, ``(F, H, W)`` grey frames
    (with a MONOCHROME ``photometric``) or ``(F, H, W, 3)``. ``photometric`` defaults to MONOCHROME2 or
    RGB, ``bits_stored`` to the dtype's bits; ``elements`` are further keywords (e.g. RescaleSlope,
    WindowCenter, PatientID). ``transfer_syntax``: a compressed one (RLE Lossless, JPEG 2000 Lossless)
    is encoded with pydicom's encoders. For test data, examples and benchmarks.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid

    from fedshift.common.io import atomic_write_bytes

    arr = np.asarray(pixels)
    if photometric is None:
        photometric = "RGB" if arr.ndim >= 3 and arr.shape[-1] == 3 else "MONOCHROME2"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.set_pixel_data(arr, photometric, bits_stored or 8 * arr.dtype.itemsize, generate_instance_uid=False)
    for keyword, value in (elements or {}).items():
        setattr(ds, keyword, value)
    if UID(transfer_syntax).is_compressed:
        ds.compress(UID(transfer_syntax), arr, generate_instance_uid=False)
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(Path(path), buffer.getvalue())
