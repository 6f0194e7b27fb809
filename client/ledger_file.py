"""The privacy ledger's file: its entries, its JSON format, and how it is read and written safely.

Crash safety and concurrency:

- a charge takes an exclusive ``flock`` on the sidecar ``privacy-ledger.json.lock``,
  re-reads the file, appends, and replaces the whole file atomically (temp file,
  fsync, ``os.replace``): a reader, or a process killed at any instant, sees the
  old ledger or the new one, never half of one, and two processes at one site
  never lose each other's entries;
- a (run, round, mechanism) is charged at most once;
- a ledger that fails any check (JSON, format, chain, anchor, entries,
  duplicates, monotone epsilon) raises :class:`LedgerError` and is never reset
  or overwritten: deleting or resetting it would reset the site's privacy budget.

Tamper evidence (:mod:`fedshift.client.integrity`): every entry carries an
HMAC chained to the one before, under the site's key kept outside the state
directory, and the anchor beside the key records the entry count and the
latest MAC. An edited entry breaks the chain; an older copy put back (a
rollback) is shorter than the anchor; a deleted ledger is missing where the
anchor counts entries. Each is refused on opening, before any data is read.
A version-1 ledger (an unkeyed sha256 from before) is read while the anchor
records no chained entry, and chained at the daemon's start
(:func:`chain_legacy_ledger`) or its next charge, with a warning: its
past cannot be proven, but refusing it would leave the site only the choice of
deleting it, which resets the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from fedshift.client import integrity
from fedshift.common.errors import LedgerError
from fedshift.common.io import atomic_write_bytes

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
LOCK_SUFFIX = ".lock"  # sidecar lock file: privacy-ledger.json.lock
FORMAT = "fedshift-privacy-ledger"
VERSION = 2  # 2: entries chained by HMAC (fedshift.client.integrity); 1: one unkeyed sha256
LEGACY_VERSION = 1
FILE_MODE = 0o600  # the ledger tells how much a hospital has spent: owner-only

_FIX = (
    "restore it from a backup; never delete it: deleting a ledger resets the privacy budget "
    "and breaks the site's promise"
)
_DOCUMENT_KEYS = ("format", "version", "accountant", "key-id", "entries")
_LEGACY_DOCUMENT_KEYS = ("format", "version", "accountant", "entries", "sha256")


@dataclass(frozen=True)
class LedgerEntry:
    """One charge: a mechanism run at this site, and the epsilon of the whole ledger after it."""

    run_id: str  # Flower run id as a string
    round: int  # server round
    mechanism: str  # e.g. "dp-sgd" (accounted as a Poisson-subsampled Gaussian)
    noise_multiplier: float  # sigma: noise std / clipping norm
    sample_rate: float  # q: Poisson sampling rate of one step
    steps: int  # optimizer steps taken with (sigma, q)
    delta: float  # the delta at which `epsilon` is reported
    epsilon: float  # epsilon of all entries up to and including this one, at `delta`
    accountant: str  # "rdp" or "prv"
    time: str  # ISO-8601 UTC timestamp of the charge

    @property
    def key(self) -> tuple[str, int, str]:
        """What makes an entry unique in a ledger: (run_id, round, mechanism)."""
        return (self.run_id, self.round, self.mechanism)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LedgerEntry:
        """Parse one entry, refusing missing, extra, wrongly typed or out-of-range fields."""
        if not isinstance(d, Mapping):
            raise LedgerError(f"Expected a ledger entry to be a JSON object, but got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        extra = sorted(str(k) for k in d if k not in hints)
        if missing or extra:
            raise LedgerError(
                f"Expected a ledger entry with exactly the fields {names}, "
                f"but got one with missing fields {missing} and unknown fields {extra}"
            )
        values: dict[str, Any] = {}
        for name in names:
            value, kind = d[name], hints[name]
            if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, kind) or isinstance(value, bool):
                raise LedgerError(
                    f"Expected the ledger entry field {name!r} to be {kind.__name__}, "
                    f"but got {type(value).__name__} {value!r}"
                )
            values[name] = value
        entry = cls(**values)
        problem = _entry_problem(entry)
        if problem is not None:
            raise LedgerError(
                f"{problem} (in the ledger entry for run {entry.run_id!r}, round {entry.round})"
            )
        return entry


def chain_legacy_ledger(state_dir: str | Path) -> int:
    """Chain a site's version-1 ledger now, under the ledger's lock, and advance the anchor to it; the
    number of entries chained (0: no ledger, an empty one, or one chained already).

    The daemon does this at its start: until then the anchor records no ledger entry, so a deleted
    version-1 file, or one edited with its sha256 recomputed, would pass unnoticed.
    """
    path = Path(state_dir) / LEDGER_FILE
    with exclusive_lock(path):
        contents = read_file(path)
        if contents is None or contents[2] or not contents[1]:
            return 0
        accountant, entries, _ = contents
        store(path, accountant, entries, legacy=len(entries))
    return len(entries)


def history_of(entries: Iterable[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def mechanism_problem(
    run_id: Any, round: Any, mechanism: Any, noise_multiplier: Any, sample_rate: Any, steps: Any
) -> str | None:
    """What is wrong with one charge's values, or ``None``."""
    if not isinstance(run_id, str) or not run_id:
        return f"Expected run_id to be a non-empty string, but got {run_id!r}"
    if not _is_integer(round) or round < 0:
        return f"Expected round to be an integer >= 0, but got {round!r}"
    if not isinstance(mechanism, str) or not mechanism:
        return f"Expected mechanism to be a non-empty string such as 'dp-sgd', but got {mechanism!r}"
    if not _is_number(noise_multiplier) or not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        return f"Expected noise_multiplier to be a finite number > 0, but got {noise_multiplier!r}"
    if not _is_number(sample_rate) or not 0 < sample_rate <= 1:
        return f"Expected sample_rate in (0, 1], but got {sample_rate!r}"
    if not _is_integer(steps) or steps < 1:
        return (
            f"Expected steps to be an integer >= 1 (a round without steps is not charged), but got {steps!r}"
        )
    return None


def _entry_problem(entry: LedgerEntry) -> str | None:
    """What is wrong with the values of a well-typed entry read from a file, or ``None``."""
    e = entry
    problem = mechanism_problem(e.run_id, e.round, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps)
    if problem is None:
        problem = delta_problem(e.delta)
    if problem is None and not (math.isfinite(e.epsilon) and e.epsilon >= 0):
        problem = f"Expected epsilon to be a finite number >= 0, but got {e.epsilon!r}"
    if problem is None and not e.accountant:
        problem = "Expected a non-empty accountant name, but got ''"
    return problem if problem is not None else _time_problem(e.time)


def delta_problem(delta: Any) -> str | None:
    if not _is_number(delta) or not 0 < delta < 1:
        return f"Expected delta in (0, 1), but got {delta!r}"
    return None


def _time_problem(time: str) -> str | None:
    try:
        stamp = datetime.fromisoformat(time)
    except ValueError:
        return f"Expected time to be an ISO-8601 timestamp, but got {time!r}"
    if stamp.utcoffset() is None:
        return f"Expected time to be an ISO-8601 timestamp with a UTC offset, but got {time!r}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checksum(entries: Any) -> str:
    """Version 1's unkeyed checksum (read for migration only)."""
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _document(
    site: integrity.SiteIntegrity, accountant: str, entries: Sequence[LedgerEntry]
) -> tuple[bytes, str]:
    """The ledger file with every entry chained under the site's key, and the last entry's MAC."""
    items = site.seal(integrity.LEDGER_STREAM, [e.to_dict() for e in entries])
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "accountant": accountant,
        "key-id": site.key_id(),
        "entries": items,
    }
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(), items[-1][integrity.MAC_FIELD]


def store(path: Path, accountant: str, entries: Sequence[LedgerEntry], *, legacy: int) -> None:
    """Write ``entries`` chained under the site's key, then advance its anchor (the caller holds the
    lock); ``legacy``: how many of them came from a version-1 ledger (chained now, with a warning)."""
    site = integrity.for_state_dir(path.parent)
    site.install()  # the site's first charge: make its key and anchor (nothing if they exist)
    data, head = _document(site, accountant, entries)
    _write(path, data)
    site.advance(integrity.LEDGER_STREAM, len(entries), head)
    if legacy:
        logger.warning(
            "Chained the %d entries of the version-1 privacy ledger %s with the site's integrity "
            "key %s (what they say was not tamper-evident before; what follows is)",
            legacy,
            path,
            site.key_path,
        )


def read_file(path: Path) -> tuple[str, tuple[LedgerEntry, ...], bool] | None:
    """(accountant, entries, chained) of the ledger file at ``path``, or ``None`` when there is none.

    A missing file where the site's anchor counts entries is refused (it was deleted).
    """
    site = integrity.for_state_dir(path.parent).snapshot()  # the anchor before the file it covers
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        site.check_missing(integrity.LEDGER_STREAM, path, "ledger entry")
        return None
    except IsADirectoryError:
        raise LedgerError(
            f"Expected the privacy ledger {path} to be a file, but it is a directory; "
            f"pass the file, or open the site's ledger with PrivacyLedger.at(state_dir)"
        ) from None
    except OSError as exc:
        raise LedgerError(
            f"Expected the privacy ledger {path} to be readable, but reading it failed ({exc}); "
            "fix its permissions (owner read/write)"
        ) from exc
    return _parse(path, raw, site)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in one JSON object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in strict JSON")


def _parse(
    path: Path, raw: bytes, site: integrity.SiteIntegrity
) -> tuple[str, tuple[LedgerEntry, ...], bool]:
    def corrupt(what: str) -> LedgerError:
        return LedgerError(f"Expected {path} to be a valid privacy ledger, but {what}; {_FIX}")

    doc = _document_of(raw, corrupt)
    version = doc["version"]
    accountant, items = doc["accountant"], doc["entries"]
    if not isinstance(accountant, str) or not accountant:
        raise corrupt(f"its accountant is {accountant!r}, not an accountant name")
    if not isinstance(items, list):
        raise corrupt(f"its entries are a JSON {type(items).__name__}, not a list")
    plain, macs = _verified_items(path, doc, site, corrupt)
    entries = _entries_of(plain, accountant, corrupt)
    if version == VERSION:
        site.check_anchor(integrity.LEDGER_STREAM, len(macs), macs.__getitem__, path, "ledger entry")
    elif entries:
        logger.warning(
            "%s is an unchained version-%d ledger (%d entries); it will be chained with the site's "
            "integrity key at the daemon's start or its next charge",
            path,
            LEGACY_VERSION,
            len(entries),
        )
    return accountant, tuple(entries), version == VERSION


Corrupt = Callable[[str], LedgerError]


def _document_of(raw: bytes, corrupt: Corrupt) -> dict[str, Any]:
    """The ledger's JSON object, with a known format, version and top-level keys."""
    try:
        doc = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as exc:
        raise corrupt(f"it is not UTF-8 text ({exc})") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, NaN/Infinity
        raise corrupt(f"it is not valid JSON ({exc}; {len(raw)} bytes)") from None
    if not isinstance(doc, dict):
        raise corrupt(f"it holds a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != FORMAT:
        raise corrupt(f"its format is {doc.get('format')!r}, not {FORMAT!r}")
    version = doc.get("version")
    if type(version) is not int or version not in (VERSION, LEGACY_VERSION):
        raise corrupt(
            f"its version is {version!r}; this fedshift reads versions {LEGACY_VERSION} and {VERSION}"
        )
    keys = _DOCUMENT_KEYS if version == VERSION else _LEGACY_DOCUMENT_KEYS
    if sorted(doc) != sorted(keys):
        raise corrupt(f"its top-level keys are {sorted(doc)}, not {sorted(keys)}")
    return doc


def _verified_items(
    path: Path, doc: dict[str, Any], site: integrity.SiteIntegrity, corrupt: Corrupt
) -> tuple[list[Any], list[str]]:
    """The entries without their MACs, verified against the chain (version 2) or the checksum (1)."""
    version, items = doc["version"], doc["entries"]
    macs: list[str] = []
    if version == LEGACY_VERSION:
        if not integrity.legacy_allowed(site, integrity.LEDGER_STREAM):
            raise corrupt(
                f"it is an unchained version-{LEGACY_VERSION} ledger while the integrity anchor "
                f"{site.anchor_path} records {site.anchor(integrity.LEDGER_STREAM).count} chained entries: "
                "an old copy from before the upgrade was put back (rolled back)"
            )
        recorded, actual = doc["sha256"], _checksum(items)
        if recorded != actual:
            raise corrupt(
                f"its entries do not match their sha256 checksum (recorded {str(recorded)[:16]}..., "
                f"computed {actual[:16]}...): the file was edited or damaged after it was written"
            )
        plain = items
    else:
        if doc["key-id"] != site.key_id():  # key() first: a missing key says so
            raise corrupt(
                f"it was chained with another integrity key (id {doc['key-id']!r}) than {site.key_path} "
                f"(id {site.key_id()!r}); set integrity-key to this site's own key"
            )
        macs = site.verify(integrity.LEDGER_STREAM, items, path, "ledger entry")
        plain = [{k: v for k, v in item.items() if k != integrity.MAC_FIELD} for item in items]
    return plain, macs


def _entries_of(plain: list[Any], accountant: str, corrupt: Corrupt) -> list[LedgerEntry]:
    """The parsed entries: well formed, one accountant, no duplicate, epsilon never decreasing."""
    entries: list[LedgerEntry] = []
    seen: dict[tuple[str, int, str], int] = {}
    highest: dict[float, tuple[int, LedgerEntry]] = {}  # delta -> entry with the largest epsilon
    for i, item in enumerate(plain):
        try:
            entry = LedgerEntry.from_dict(item)
        except LedgerError as exc:
            raise corrupt(f"entry {i} is malformed ({exc})") from None
        if entry.accountant != accountant:
            raise corrupt(
                f"entry {i} was accounted with {entry.accountant!r} in a ledger kept with {accountant!r}"
            )
        if entry.key in seen:
            raise corrupt(
                f"entries {seen[entry.key]} and {i} charge the same run {entry.run_id!r} round "
                f"{entry.round} {entry.mechanism!r}"
            )
        seen[entry.key] = i
        # epsilon never decreases, compared at an equal or larger delta (few distinct deltas per site)
        for d, (j, e) in highest.items():
            if d >= entry.delta and e.epsilon > entry.epsilon:
                raise corrupt(
                    f"epsilon decreases from {e.epsilon!r} (entry {j}, delta {e.delta:g}) to "
                    f"{entry.epsilon!r} (entry {i}, delta {entry.delta:g}); spent privacy never decreases"
                )
        if entry.delta not in highest or entry.epsilon > highest[entry.delta][1].epsilon:
            highest[entry.delta] = (i, entry)
        entries.append(entry)
    return entries


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``<path>.lock``; the kernel releases it if the process dies."""
    with integrity.exclusive_lock(path.with_name(path.name + LOCK_SUFFIX)):
        yield


def _write(path: Path, data: bytes) -> None:
    """Replace the ledger atomically; the caller holds the lock."""
    # temp files of writers killed before their os.replace: no writer is running (we hold the lock)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        logger.debug("Removing %s, left by a process killed while writing the ledger", stale)
        with contextlib.suppress(OSError):
            stale.unlink(missing_ok=True)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise LedgerError(
            f"Expected to write the privacy ledger {path}, but it failed ({exc}); nothing was charged "
            "and the file on disk is unchanged; free disk space or fix the directory's permissions"
        ) from exc
    try:
        os.chmod(path, FILE_MODE)
    except OSError as exc:  # e.g. a filesystem without modes: the ledger is written all the same
        logger.warning("Could not make %s private (mode 600): %s", path, exc)
    with contextlib.suppress(OSError):  # make the rename itself durable across a power loss
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
