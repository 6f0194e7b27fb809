"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: str | Path) -> Path:
    """Where :func:`atomic_write_folder` keeps the previous folder during its swap: ``.<name>.old``."""
    target = Path(path)
    return target.with_name(f".{target.name}.old")


def recover_folder(path: str | Path) -> None:
    """A swap interrupted between its two renames left the previous folder aside: put it back."""
    target, old = Path(path), set_aside(path)
    if old.is_dir() and not target.exists():
        os.rename(old, target)


def atomic_write_folder(path: str | Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (plain file name -> bytes) as the folder ``path``, atomically: a reader sees the old
    folder or the new one, whole. The files go into a temporary sibling, are fsynced, and the folder is
    renamed over the old one (kept aside as :func:`set_aside` until then; a crash between the two renames
    is undone by the next write, :func:`recover_folder`)."""
    target = Path(path)
    bad = [name for name in files if Path(name).name != name or name in ("", ".", "..")]
    if bad:
        raise ValueError(f"Expected plain file names, but got {bad[0]!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a write a crash cut short
        shutil.rmtree(stale, ignore_errors=True)
    old = set_aside(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _fsync_dir(tmp)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def as_jsonable(obj: Any) -> Any:
    """NaN -> None, tuples -> lists, keys -> str: strict JSON for reports."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return [as_jsonable(v) for v in obj]
    return obj
