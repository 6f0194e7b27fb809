"""A decode cache: every image file decoded and resized once, then read back from disk.

One entry per file, ``<cache_dir>/<hash of the manifest path>/<image_size>px-v<DECODER_VERSION>/<key>.npy``;
the key hashes the file's path, size, ``mtime_ns``, ``ctime_ns`` and inode, the frame and the settings,
so a changed file (also one copied with its old mtime), or changed settings, decode again and nothing
else does. Files are decoded one at a time straight into the cache (a full-resolution image is alive
only while it is decoded); entries are written atomically, an
unreadable entry is decoded again, and entries of files no longer listed (or changed) are pruned, as are
the entries of older decoder versions. Other image sizes keep their entries (a check at one size does
not evict training's). An entry is ``(S, S)`` grey, ``(S, S, 1)`` grey-as-RGB (an RGB file with equal
channels) or ``(S, S, 3)`` colour, so grey or colour is decided for the whole dataset
(:func:`fedshift.common.image_files.stack_images`'s rule).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedshift.common.dicom import error_reason
from fedshift.common.errors import DataError
from fedshift.common.image_files import COLOUR, GREY, GREY_AS_RGB, mixed_error, read_image_kind
from fedshift.common.io import atomic_write_bytes

logger = logging.getLogger(__name__)

DECODER_VERSION = 2  # bump when decoding or resizing changes: every entry decodes again
CACHE_SUBDIR = "decode-cache"
PROGRESS_MIN_FILES = 50  # fewer files to decode: no progress bar


@dataclass(frozen=True)
class DecodeStats:
    """What one :func:`decode_cached` call did."""

    decoded: int  # files decoded (not in the cache, or changed)
    cached: int  # files read back from the cache
    pruned: int  # entries removed (files no longer listed or changed, or of an older decoder version)
    seconds: float


def default_cache_dir(state_dir: Path | None) -> Path:
    """``state_dir/decode-cache``, else the per-user ``$XDG_CACHE_HOME/fedshift/decode``."""
    if state_dir is not None:
        return Path(state_dir) / CACHE_SUBDIR
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedshift" / "decode"


def manifest_dir(cache_dir: Path, manifest: str | Path, image_size: int) -> Path:
    """The folder holding one manifest's entries at ``image_size``."""
    digest = hashlib.sha256(str(Path(manifest).resolve()).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / digest / f"{image_size}px-v{DECODER_VERSION}"


def latest_cached_size(cache_dir: Path, manifest: str | Path) -> int | None:
    """The image size whose entries (this decoder version) for ``manifest`` were written most recently."""
    parent = manifest_dir(cache_dir, manifest, 1).parent
    sizes = []
    for folder in parent.glob(f"*px-v{DECODER_VERSION}") if parent.is_dir() else ():
        size = folder.name.split("px-", 1)[0]
        if folder.is_dir() and size.isdigit() and any(folder.glob("*.npy")):
            sizes.append((folder.stat().st_mtime_ns, int(size)))
    return max(sizes)[1] if sizes else None


def entry_key(file: Path, image_size: int, frame: int | None) -> str:
    """The entry name of ``file`` under these settings: its path, size, mtime_ns, ctime_ns (set by the
    system on any write, even when a copy keeps the mtime) and inode included."""
    try:
        st = file.stat()
    except OSError as exc:
        raise DataError(
            f"Expected {file} to be a readable file, but it cannot be read ({exc}); "
            "restore the file or remove its row"
        ) from exc
    stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    text = f"{file.resolve()}\0{stamp}\0{image_size}\0{frame}\0{DECODER_VERSION}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + ".npy"


_STORED_SHAPE = {GREY: (), GREY_AS_RGB: (1,), COLOUR: (3,)}  # an entry's trailing shape per kind


def _load_entry(path: Path, image_size: int) -> tuple[np.ndarray, str] | None:
    """An entry's image (``(S, S)`` or ``(S, S, 3)``) and kind; None when it is damaged."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    kind = next((k for k, tail in _STORED_SHAPE.items() if array.shape[2:] == tail), None)
    if array.dtype != np.uint8 or array.shape[:2] != (image_size, image_size) or kind is None:
        return None
    return (array[..., 0] if kind == GREY_AS_RGB else array), kind


def _store_entry(path: Path, array: np.ndarray, kind: str) -> None:
    buffer = io.BytesIO()
    stored = array[..., None] if kind == GREY_AS_RGB else array
    np.save(buffer, np.ascontiguousarray(stored), allow_pickle=False)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise DataError(
            f"Expected to write the decode cache in {path.parent}, but it is not writable "
            f"({error_reason(exc)}); make the folder writable for this user, or put the cache elsewhere "
            "(the site's state dir, or XDG_CACHE_HOME without one)"
        ) from exc


def _progress(total: int, label: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    quiet = total < PROGRESS_MIN_FILES or not sys.stderr.isatty()
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=quiet, leave=False)


def _prune(folder: Path, keep: set[str]) -> int:
    """Remove the entries of ``folder`` not in ``keep``, and sibling folders of other decoder versions."""
    pruned = 0
    for entry in folder.glob("*.npy"):
        if entry.name not in keep:
            entry.unlink(missing_ok=True)
            pruned += 1
    for old in folder.parent.glob("*px-v*"):
        if old.is_dir() and not old.name.endswith(f"-v{DECODER_VERSION}"):
            pruned += sum(1 for _ in old.glob("*.npy"))
            shutil.rmtree(old, ignore_errors=True)
    return pruned


def _place(out: np.ndarray, i: int, array: np.ndarray, kind: str) -> np.ndarray:
    """``array`` as image ``i`` of ``out``; the first colour image turns a grey ``out`` into colour
    (the images so far get three equal channels)."""
    if kind == COLOUR and out.ndim == 3:
        out = np.repeat(out[..., None], 3, axis=3)
    out[i] = array[..., None] if out.ndim == 4 and array.ndim == 2 else array
    return out


def _decode_one(
    file: Path, image_size: int, frame: int | None, name: str, entry: Path
) -> tuple[np.ndarray, str]:
    """Decode ``file`` and store it as ``entry``; its DataError prefixed by ``name``."""
    try:
        array, kind = read_image_kind(file, image_size, frame)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    _store_entry(entry, array, kind)
    return array, kind


def _decode_job(job: tuple[Path, int, int | None, str, Path]) -> tuple[np.ndarray, str]:
    return _decode_one(*job)


def _decode_all(
    jobs: list[tuple[Path, int, int | None, str, Path]], workers: int
) -> Generator[tuple[np.ndarray, str], None, None]:
    """The jobs' images in order: decoded here, or by ``workers`` processes (each stores its entries)."""
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            yield _decode_job(job)
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        yield from pool.map(_decode_job, jobs, chunksize=4)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_cached(
    files: Sequence[Path],
    frames: Sequence[int | None] | None = None,
    *,
    image_size: int,
    cache_dir: Path,
    manifest: str | Path,
    names: Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> tuple[np.ndarray, DecodeStats]:
    """The images of ``files`` (``(N, S, S)`` grey or ``(N, S, S, 3)`` colour uint8) through the cache.

    Each image is read back, or decoded and stored, straight into the one output array. ``names`` label
    each file in errors (default: the path), e.g. ``"row 3 (line 4 of m.csv): a.dcm"``; a file that
    cannot be decoded raises its one-line :class:`DataError`, prefixed by its name. ``workers`` > 1:
    that many processes decode the files not in the cache (each returns only its resized image).
    """
    start = time.perf_counter()
    frames = list(frames) if frames is not None else [None] * len(files)
    names = list(names) if names is not None else [str(f) for f in files]
    folder = manifest_dir(cache_dir, manifest, image_size)
    keys = [entry_key(Path(f), image_size, fr) for f, fr in zip(files, frames, strict=True)]
    missing = {i for i, k in enumerate(keys) if not (folder / k).is_file()}
    jobs = [(Path(files[i]), image_size, frames[i], names[i], folder / keys[i]) for i in sorted(missing)]
    fresh = _decode_all(jobs, workers)
    bar = _progress(len(missing), f"Decoding {Path(manifest).name}") if progress else None
    out = np.empty((len(keys), image_size, image_size), np.uint8)
    kinds: list[str] = []
    decoded = 0
    try:
        for i, key in enumerate(keys):
            loaded = next(fresh) if i in missing else _load_entry(folder / key, image_size)
            if loaded is None:  # a damaged entry
                loaded = _decode_one(Path(files[i]), image_size, frames[i], names[i], folder / key)
                decoded += 1
            elif i in missing:
                decoded += 1
                if bar is not None:
                    bar.update(1)
            kinds.append(loaded[1])
            out = _place(out, i, *loaded)
    finally:
        fresh.close()
        if bar is not None:
            bar.close()
    if (error := mixed_error(kinds, names)) is not None:
        raise error
    pruned = _prune(folder, set(keys)) if folder.is_dir() else 0
    stats = DecodeStats(decoded, len(keys) - decoded, pruned, time.perf_counter() - start)
    logger.info(
        "Decoded %d of %d images of %s at %d px (%d from the cache %s) in %.1f s",
        *(stats.decoded, len(keys), manifest, image_size, stats.cached, folder, stats.seconds),
    )
    return out, stats
