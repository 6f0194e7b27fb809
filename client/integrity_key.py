"""A site's integrity key file: 32 random bytes as hex behind a header, mode 600, made once, never replaced.

:func:`create_key` makes it in one step (refusing to replace one that exists);
:func:`read_key` reads it back, refusing a missing or malformed file and warning
when others can read it. Where the key lives, and what it signs, is
:mod:`fedshift.client.integrity`.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from fedshift.common.errors import LedgerError

logger = logging.getLogger(__name__)

KEY_HEADER = "fedshift-integrity-key-v1:"
FILE_MODE = 0o600


def read_key(path: Path) -> bytes:
    """The key in ``path``; :class:`LedgerError` when it is missing or malformed."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise LedgerError(
            f"Expected the site's integrity key at {path}, but it is missing; restore it "
            "(it was made when the site was installed, outside the state directory), or set "
            "integrity-key to where it is: without it the ledger and egress log cannot be verified"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(
            f"Expected the integrity key {path} to be readable, but reading it failed "
            f"({exc}); give the daemon's user read access (mode 600)"
        ) from None
    body = text.removeprefix(KEY_HEADER)
    try:
        key = bytes.fromhex(body)
    except ValueError:
        key = b""
    if not text.startswith(KEY_HEADER) or len(key) != 32:
        raise LedgerError(
            f"Expected {path} to hold a fedshift integrity key ({KEY_HEADER}<64 hex digits>), "
            "but it does not; restore the site's key file"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s is readable by others (mode %o); run: chmod 600 %s", path, mode, path)
    return key


def create_key(path: Path) -> bytes:
    """A new random key, written to ``path`` (mode 600); :class:`LedgerError` if one exists there."""
    key = secrets.token_bytes(32)
    _create_exclusive(path, (KEY_HEADER + key.hex() + "\n").encode())
    return key


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write a new file (mode 600) in one step; refuse to replace one that exists."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LedgerError(
            f"Expected to make the site's integrity key at {path}, but it failed ({exc}); make that folder "
            "writable, or set integrity-key to a writable place outside the state directory"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.link(tmp, path)  # fails if the key exists: a key is never replaced
    except FileExistsError:
        raise LedgerError(
            f"Expected to make a new integrity key at {path}, but one exists; keep it"
        ) from None
    except OSError as exc:
        raise LedgerError(
            f"Expected to make the site's integrity key at {path}, but it failed ({exc})"
        ) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
