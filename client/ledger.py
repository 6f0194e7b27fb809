"""The site's persistent privacy ledger: every DP round is charged to a file that outlives the process.

The ClientApp is created afresh each round and the SuperNode may be killed at
any moment, so the privacy a site has spent lives on disk, in
``<state-dir>/privacy-ledger.json``, and nowhere else. One entry per charged
mechanism (run, round, mechanism); each entry also records the epsilon of the
whole ledger after it, so the file alone tells what the site has promised.

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

Every mechanism is accounted as a Poisson-subsampled Gaussian with
``(noise_multiplier, sample_rate, steps)``, by the Opacus accountant the ledger
was started with (:mod:`fedshift.common.privacy`).
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedshift.client import integrity
from fedshift.common import privacy
from fedshift.common.errors import LedgerError, PrivacyError
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


class PrivacyLedger:
    """The privacy spent at one site, across rounds, runs and restarts, kept in one JSON file.

    Opening reads the file if it exists (:class:`LedgerError` if it cannot be
    trusted); an absent file is an empty ledger, created by the first
    :meth:`charge`. Reads (``entries``, ``epsilon``, ``find``) use the state as
    of opening or of this object's last charge; :meth:`charge` always re-reads
    the file under the lock first.
    """

    def __init__(self, path: str | Path, *, accountant: str = "rdp") -> None:
        if accountant not in privacy.ACCOUNTANTS:
            raise PrivacyError(
                f"Expected the ledger's accountant to be one of {sorted(privacy.ACCOUNTANTS)}, "
                f"but got {accountant!r}; set dp-accountant to one of them"
            )
        self.path: Path = Path(path)
        self.accountant: str = accountant
        self._entries: tuple[LedgerEntry, ...] = self._load()

    @classmethod
    def at(cls, state_dir: str | Path, *, accountant: str = "rdp") -> PrivacyLedger:
        """The ledger of the site whose state directory is ``state_dir``."""
        return cls(Path(state_dir) / LEDGER_FILE, accountant=accountant)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({str(self.path)!r}, accountant={self.accountant!r}, entries={len(self._entries)})"
        )

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return self._entries

    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` of every entry, in charge order."""
        return _history(self._entries)

    def epsilon(self, delta: float) -> float:
        """The epsilon, at ``delta``, of everything this ledger holds."""
        return privacy.epsilon(self.history(), delta, self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """The epsilon that :meth:`charge` would record for one more such entry (at ``delta``)."""
        problem = _mechanism_problem("planned", 0, "dp-sgd", noise_multiplier, sample_rate, steps)
        if problem is None:
            problem = _delta_problem(delta)
        if problem is not None:
            raise PrivacyError(problem)
        return self._epsilon_after(self._entries, (noise_multiplier, sample_rate, steps), delta)

    def find(self, run_id: str, round: int, mechanism: str = "dp-sgd") -> LedgerEntry | None:
        """The entry charged for (run_id, round, mechanism), or ``None``."""
        key = (run_id, round, mechanism)
        return next((e for e in self._entries if e.key == key), None)

    def run_entries(self, run_id: str) -> list[LedgerEntry]:
        """The entries of one run, in charge order."""
        return [e for e in self._entries if e.run_id == run_id]

    def charge_mechanism(
        self, *, run_id: str, round: int, mechanism: str, cost: privacy.Mechanism, delta: float
    ) -> LedgerEntry:
        """:meth:`charge` with the cost as one ``(noise multiplier, sample rate, steps)`` triple."""
        sigma, q, steps = cost
        return self.charge(
            run_id=run_id,
            round=round,
            mechanism=mechanism,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            delta=delta,
        )

    def charge(
        self,
        *,
        run_id: str,
        round: int,
        mechanism: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
    ) -> LedgerEntry:
        """Append one entry and write the ledger to disk before returning it.

        Under an exclusive lock: re-read the file (entries charged by other
        processes count too), refuse a (run_id, round, mechanism) that is
        already there, compute the epsilon of the whole ledger with the new
        entry, and replace the file atomically. In-memory state changes only
        after the file is on disk.
        """
        problem = _mechanism_problem(run_id, round, mechanism, noise_multiplier, sample_rate, steps)
        if problem is None:
            problem = _delta_problem(delta)
        if problem is not None:
            raise PrivacyError(f"{problem}; nothing was charged to {self.path}")
        with _exclusive_lock(self.path):
            entries, chained = self._read()
            key = (run_id, round, mechanism)
            if any(e.key == key for e in entries):
                raise LedgerError(
                    f"Expected each (run, round, mechanism) to be charged once to the privacy ledger "
                    f"{self.path}, but run {run_id!r} round {round} {mechanism!r} is already charged; "
                    "look it up with find() before charging (a restarted round must not pay twice, "
                    "nor train uncharged)"
                )
            mech = (float(noise_multiplier), float(sample_rate), int(steps))
            eps = self._epsilon_after(entries, mech, delta)
            entry = LedgerEntry(
                run_id=run_id,
                round=int(round),
                mechanism=mechanism,
                noise_multiplier=mech[0],
                sample_rate=mech[1],
                steps=mech[2],
                delta=float(delta),
                epsilon=eps,
                accountant=self.accountant,
                time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            )
            new_entries = (*entries, entry)
            _store(self.path, self.accountant, new_entries, legacy=0 if chained else len(entries))
            self._entries = new_entries
        logger.info(
            "Charged run %s round %s (%s, sigma=%.4g, q=%.4g, %d steps) to %s: epsilon = %.4f at delta = %g",
            run_id,
            round,
            mechanism,
            entry.noise_multiplier,
            entry.sample_rate,
            entry.steps,
            self.path,
            eps,
            delta,
        )
        return entry

    def _load(self) -> tuple[LedgerEntry, ...]:
        return self._read()[0]

    def _read(self) -> tuple[tuple[LedgerEntry, ...], bool]:
        """The entries on disk, and whether they are chained (``False``: none yet, or version 1)."""
        contents = _read(self.path)
        if contents is None:
            return (), False
        accountant, entries, chained = contents
        if accountant != self.accountant:
            raise LedgerError(
                f"Expected the privacy ledger {self.path} to be kept with the {self.accountant!r} "
                f"accountant, but it was kept with {accountant!r}; set dp-accountant to {accountant!r} "
                "for this site (one ledger is accounted by one accountant; never start a new ledger "
                "to switch, that resets the privacy budget)"
            )
        return entries, chained

    def _epsilon_after(
        self, entries: Sequence[LedgerEntry], mech: tuple[float, float, int], delta: float
    ) -> float:
        eps = privacy.epsilon([*_history(entries), mech], delta, self.accountant)
        if not math.isfinite(eps):
            raise LedgerError(
                f"Expected a finite epsilon after charging sigma={mech[0]:g}, q={mech[1]:g}, "
                f"{mech[2]} steps to {self.path}, but the {self.accountant} accountant gives {eps!r}; "
                "raise the noise multiplier or take fewer steps"
            )
        # never report less than an earlier entry at an equal or larger delta: more mechanisms
        # cannot leak less; this only absorbs the numerical error of an accountant (PRV)
        return max([eps, *(e.epsilon for e in entries if e.delta >= delta)])


def open_ledger(path: str | Path) -> PrivacyLedger | None:
    """The existing ledger at ``path`` (the file, or a state directory holding it), opened
    with the accountant it was kept with; ``None`` when there is no ledger there."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILE
    contents = _read(path)
    if contents is None:
        return None
    return PrivacyLedger(path, accountant=contents[0])


def chain_legacy_ledger(state_dir: str | Path) -> int:
    """Chain a site's version-1 ledger now, under the ledger's lock, and advance the anchor to it; the
    number of entries chained (0: no ledger, an empty one, or one chained already).

    The daemon does this at its start: until then the anchor records no ledger entry, so a deleted
    version-1 file, or one edited with its sha256 recomputed, would pass unnoticed.
    """
    path = Path(state_dir) / LEDGER_FILE
    with _exclusive_lock(path):
        contents = _read(path)
        if contents is None or contents[2] or not contents[1]:
            return 0
        accountant, entries, _ = contents
        _store(path, accountant, entries, legacy=len(entries))
    return len(entries)


def verify_site(state_dir: str | Path) -> str:
    """Check a site's ledger and egress log against its key and anchor; one line saying what holds.

    Reads only. :class:`LedgerError` names the first thing that does not verify.
    """
    from fedshift.client.egress import EGRESS_LOG_FILE

    state_dir = Path(state_dir)
    site = integrity.for_state_dir(state_dir)
    contents = _read(state_dir / LEDGER_FILE)
    entries, chained = (0, True) if contents is None else (len(contents[1]), contents[2] or not contents[1])
    records, macs = integrity.read_chained_lines(state_dir / EGRESS_LOG_FILE, integrity.EGRESS_STREAM, "line")

    def state(ok: bool) -> str:
        return "chained" if ok else "UNCHAINED (version 1: chained at the next write)"

    if not site.installed():
        return (
            f"integrity: nothing recorded yet ({entries} ledger entries, {len(records)} egress-log lines); "
            f"the key will be made at {site.key_path}"
        )
    ledger = site.anchor(integrity.LEDGER_STREAM).count
    egress = site.anchor(integrity.EGRESS_STREAM).count
    return (
        f"integrity verified with key {site.key_path} (id {site.key_id()}): ledger {entries} "
        f"entries {state(chained)} (anchor {ledger}), egress log {len(records)} lines "
        f"{state(bool(macs) or not records)} (anchor {egress})"
    )


def format_ledger(ledger: PrivacyLedger, delta: float | None = None) -> str:
    """A human table of the ledger and a total line (at ``delta``; default: the latest entry's)."""
    entries = ledger.entries
    if delta is None and entries:
        delta = entries[-1].delta
    header = ("run", "round", "mechanism", "sigma", "q", "steps", "delta", "epsilon-after", "time")
    rows = [
        (
            e.run_id,
            str(e.round),
            e.mechanism,
            f"{e.noise_multiplier:.4g}",
            f"{e.sample_rate:.4g}",
            str(e.steps),
            f"{e.delta:.3g}",
            f"{e.epsilon:.4f}",
            e.time,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {1, 3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [f"privacy ledger {ledger.path} (accountant {ledger.accountant})", line(header)]
    out += [line(row) for row in rows]
    n = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    if delta is None:
        out.append(f"epsilon = 0 (accountant {ledger.accountant}), {n}: nothing charged yet")
    else:
        eps = ledger.epsilon(delta)
        out.append(f"epsilon = {eps:.4f} at delta = {delta:g} (accountant {ledger.accountant}), {n}")
    return "\n".join(out)


def _history(entries: Iterable[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _mechanism_problem(
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
    problem = _mechanism_problem(e.run_id, e.round, e.mechanism, e.noise_multiplier, e.sample_rate, e.steps)
    if problem is None:
        problem = _delta_problem(e.delta)
    if problem is None and not (math.isfinite(e.epsilon) and e.epsilon >= 0):
        problem = f"Expected epsilon to be a finite number >= 0, but got {e.epsilon!r}"
    if problem is None and not e.accountant:
        problem = "Expected a non-empty accountant name, but got ''"
    return problem if problem is not None else _time_problem(e.time)


def _delta_problem(delta: Any) -> str | None:
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


def _store(path: Path, accountant: str, entries: Sequence[LedgerEntry], *, legacy: int) -> None:
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


def _read(path: Path) -> tuple[str, tuple[LedgerEntry, ...], bool] | None:
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
    accountant, items = doc["accountant"], doc["entries"]
    if not isinstance(accountant, str) or not accountant:
        raise corrupt(f"its accountant is {accountant!r}, not an accountant name")
    if not isinstance(items, list):
        raise corrupt(f"its entries are a JSON {type(items).__name__}, not a list")
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


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
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
