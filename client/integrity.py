"""Tamper evidence for a site's records: a keyed hash chain over each, anchored outside the state directory.

A site's privacy ledger and egress log live in its state directory, which
backups copy, volumes carry and administrators edit. What they record must not
change unseen, so each is a *chain*: every ledger entry and every egress-log
line carries ``mac = HMAC-SHA256(key, previous mac || canonical JSON)``, the
first one chained to a per-stream genesis value. Editing, inserting, removing
or reordering anything breaks the chain at that point; without the key nobody
can mend it.

The key (32 random bytes) lives *outside* the state directory, in one file per
site, made once when the site is installed (``fedshift client``'s first start,
the simulator, or the first charge when nothing exists yet). Beside it, the
*anchor* records, under the same key, how many entries each chain holds and
its latest MAC. An internally valid but older copy of the ledger (a rollback)
has fewer entries than the anchor; a missing ledger where the anchor counts
entries is a deleted one. Both are refused; nothing is ever reset.

Where the key is: ``<state-dir>.integrity-key``, beside (not in) the state
directory, unless the site's node config sets ``integrity-key`` (bound for the
process by :meth:`fedshift.client.site.SiteSettings.from_node_config`, see
:func:`bind_key`). The anchor is ``<key>.anchor``. Whoever can write the key's
folder can forge or reset everything: keep it off the state directory's volume
and out of its backups.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshift.client.integrity_key import FILE_MODE, create_key, read_key
from fedshift.common.errors import LedgerError
from fedshift.common.io import atomic_write_bytes

logger = logging.getLogger(__name__)

KEY_SUFFIX = ".integrity-key"  # default key file: <state-dir>.integrity-key
ANCHOR_SUFFIX = ".anchor"  # the anchor beside the key: <key>.anchor
LOCK_SUFFIX = ".lock"
ANCHOR_FORMAT = "fedshift-integrity-anchor"
ANCHOR_VERSION = 1
MAC_FIELD = "mac"  # the field each chained record carries
LEDGER_STREAM = "privacy-ledger"  # the chains a site keeps; each has its own genesis
EGRESS_STREAM = "egress-log"

_RESTORE = "restore it from a backup; never delete it (that resets what the site has spent)"

# state directory -> key file, for sites whose node config names the key (see bind_key)
_BOUND: dict[Path, Path] = {}


def default_key_path(state_dir: str | Path) -> Path:
    """Where a site keeps its key when its node config names none: beside its state directory."""
    state = Path(state_dir).absolute()
    return state.with_name(state.name + KEY_SUFFIX)


def bind_key(state_dir: str | Path, key_path: str | Path) -> None:
    """Use ``key_path`` for the site whose state directory is ``state_dir``, in this process."""
    state, key = Path(state_dir).absolute(), Path(key_path).absolute()
    if key == state or state in key.parents:
        raise LedgerError(
            f"Expected integrity-key to be outside the state directory {state}, but got {key}; "
            "put it where the state directory's backups and volume do not reach (e.g. beside it)"
        )
    _BOUND[state] = key


def for_state_dir(state_dir: str | Path) -> SiteIntegrity:
    """The key and anchor of the site whose state directory is ``state_dir``."""
    state = Path(state_dir).absolute()
    return SiteIntegrity(_BOUND.get(state, default_key_path(state)))


def canonical(obj: Any) -> bytes:
    """The bytes a MAC covers: sorted keys, no spaces, ASCII; stable across a JSON round trip.

    ``obj`` is as JSON gives it back (see :func:`as_read`): what a reader recomputes.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def as_read(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as a reader will see it: tuples as lists, keys as strings (a JSON round trip)."""
    normal: dict[str, Any] = json.loads(json.dumps(dict(record)))
    return normal


@dataclass(frozen=True)
class Anchor:
    """What the anchor records of one chain: how many entries it holds and the MAC of the last."""

    count: int
    head: str


class SiteIntegrity:
    """One site's integrity key and anchor (files outside its state directory)."""

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self.anchor_path = key_path.with_name(key_path.name + ANCHOR_SUFFIX)
        self._key: bytes | None = None
        self._anchors: dict[str, Anchor] | None = None  # the anchor as last read (see snapshot)

    def __repr__(self) -> str:
        return f"SiteIntegrity({str(self.key_path)!r})"

    def installed(self) -> bool:
        return self.key_path.exists() or self.anchor_path.exists()

    # ------------------------------------------------------------------ key

    def key(self) -> bytes:
        """The key, read once; :class:`LedgerError` when it is missing or malformed."""
        if self._key is not None:
            return self._key
        self._key = read_key(self.key_path)
        return self._key

    def key_id(self) -> str:
        """A public fingerprint of the key (an HMAC of a constant): tells keys apart, reveals nothing."""
        return hmac.new(self.key(), b"fedshift-integrity-key-id", hashlib.sha256).hexdigest()[:16]

    def install(self) -> bool:
        """Make the key and an empty anchor if the site has neither; ``True`` when it made them.

        A key without its anchor (or the reverse) is refused: one of them was deleted.
        """
        with self._anchor_lock():
            if self.key_path.exists() and self.anchor_path.exists():
                self.key()
                return False
            if self.key_path.exists() or self.anchor_path.exists():
                present, missing = (
                    (self.key_path, self.anchor_path)
                    if self.key_path.exists()
                    else (self.anchor_path, self.key_path)
                )
                raise LedgerError(
                    f"Expected the integrity key and its anchor together, but {present} exists and "
                    f"{missing} is missing; {_RESTORE}"
                )
            self._key = create_key(self.key_path)
            self._write_anchor({})
        logger.info(
            "Made the site's integrity key %s and anchor %s (keep them outside the state directory "
            "and its backups)",
            self.key_path,
            self.anchor_path,
        )
        return True

    # ------------------------------------------------------------------ chains

    def genesis(self, stream: str) -> str:
        return hmac.new(self.key(), f"fedshift-chain-genesis:{stream}".encode(), hashlib.sha256).hexdigest()

    def mac(self, previous: str, record: Mapping[str, Any]) -> str:
        """The MAC of ``record`` (without its own ``mac`` field) chained to ``previous``."""
        body = {k: v for k, v in record.items() if k != MAC_FIELD}
        return hmac.new(self.key(), previous.encode() + b"\n" + canonical(body), hashlib.sha256).hexdigest()

    def seal(self, stream: str, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``records`` with a chained ``mac`` field each, from the stream's genesis."""
        out, previous = [], self.genesis(stream)
        for record in records:
            body = as_read({k: v for k, v in record.items() if k != MAC_FIELD})
            previous = self.mac(previous, body)
            out.append({**body, MAC_FIELD: previous})
        return out

    def verify(self, stream: str, records: Sequence[Any], path: Path, what: str) -> list[str]:
        """The MACs of a chain read from ``path``; :class:`LedgerError` at the first that does not verify."""
        macs, previous = [], self.genesis(stream)
        for i, record in enumerate(records):
            recorded = record.get(MAC_FIELD) if isinstance(record, Mapping) else None
            expected = self.mac(previous, record) if isinstance(record, Mapping) else ""
            if not isinstance(recorded, str) or not hmac.compare_digest(recorded, expected):
                raise LedgerError(
                    f"Expected every {what} in {path} to carry its chained MAC, but the chain breaks at "
                    f"{what} {i}: it was edited, inserted, removed or reordered after it was written "
                    f"(or signed with another key than {self.key_path}); {_RESTORE}"
                )
            macs.append(expected)
            previous = expected
        return macs

    # ------------------------------------------------------------------ anchor

    def snapshot(self) -> SiteIntegrity:
        """Read the anchor now (nothing recorded when the site has no key yet), for the checks that follow.

        Readers take it *before* reading the file it covers: writers write the file first and the
        anchor second, so the file read after is never shorter than the anchor read before.
        """
        if self.key_path.exists() != self.anchor_path.exists():  # half there: an install under way?
            with self._anchor_lock():  # install() holds it until both exist
                self._anchors = self._read_anchor() if self.installed() else {}
            return self
        self._anchors = self._read_anchor() if self.installed() else {}
        return self

    def anchor(self, stream: str) -> Anchor:
        """What the anchor records of ``stream`` (zero entries before its first): the snapshot's, if any."""
        if self._anchors is None:
            self.snapshot()
        assert self._anchors is not None
        return self._anchors.get(stream, Anchor(0, ""))

    def check_anchor(
        self, stream: str, count: int, mac_at: Callable[[int], str], path: Path, what: str
    ) -> None:
        """Refuse a chain of ``count`` entries (``mac_at(i)``: the MAC of entry i) that is shorter than
        the anchor records (rolled back, truncated) or does not hold the entry it names (replaced)."""
        recorded = self.anchor(stream)
        if count < recorded.count:
            raise LedgerError(
                f"Expected {path} to hold at least the {recorded.count} {what}(s) its integrity anchor "
                f"{self.anchor_path} records, but it holds {count}: an older copy was put back "
                f"(rolled back) or {what}s were removed; {_RESTORE}"
            )
        if recorded.count and not hmac.compare_digest(mac_at(recorded.count - 1), recorded.head):
            raise LedgerError(
                f"Expected {path} to continue the chain its integrity anchor {self.anchor_path} records "
                f"({recorded.count} {what}(s)), but its {what} {recorded.count - 1} differs: the file was "
                f"replaced by another one; {_RESTORE}"
            )

    def check_missing(self, stream: str, path: Path, what: str) -> None:
        """Refuse an absent file where the anchor records entries (it was deleted)."""
        recorded = self.anchor(stream)
        if recorded.count:
            raise LedgerError(
                f"Expected {path} to exist, since the integrity anchor {self.anchor_path} records "
                f"{recorded.count} {what}(s) in it, but it is missing: it was deleted or moved; {_RESTORE}"
            )

    def advance(self, stream: str, count: int, head: str) -> None:
        """Record that ``stream`` now holds ``count`` entries ending in ``head`` (never moves back)."""
        with self._anchor_lock():
            streams = self._read_anchor()
            current = streams.get(stream)
            if current is None or current.count < count:
                streams[stream] = Anchor(count, head)
                self._write_anchor(streams)
            self._anchors = streams

    def _read_anchor(self) -> dict[str, Anchor]:
        key_id = self.key_id()  # the key first: a missing key is the clearer message
        try:
            raw = self.anchor_path.read_bytes()
        except FileNotFoundError:
            raise LedgerError(
                f"Expected the integrity anchor {self.anchor_path} beside the key {self.key_path}, but it "
                f"is missing: without it a rolled-back or deleted ledger cannot be told apart; {_RESTORE}"
            ) from None
        except OSError as exc:
            raise LedgerError(
                f"Expected the integrity anchor {self.anchor_path} to be readable, but reading it failed "
                f"({exc}); fix its permissions (owner read/write)"
            ) from None
        try:
            doc = json.loads(raw)
            body = {k: v for k, v in doc.items() if k != MAC_FIELD}
            valid = hmac.compare_digest(str(doc[MAC_FIELD]), self._anchor_mac(body))
            streams = {
                str(name): Anchor(int(value["count"]), str(value["head"]))
                for name, value in doc["streams"].items()
            }
        except (ValueError, TypeError, KeyError, AttributeError):
            valid, streams = False, {}
        if not valid:
            raise LedgerError(
                f"Expected {self.anchor_path} to be the integrity anchor of the key {self.key_path} "
                f"(key id {key_id}), but its MAC does not verify: it was edited, damaged or belongs to "
                f"another key; {_RESTORE}"
            )
        return streams

    def _anchor_mac(self, body: Mapping[str, Any]) -> str:
        return hmac.new(self.key(), b"fedshift-anchor\n" + canonical(body), hashlib.sha256).hexdigest()

    def _write_anchor(self, streams: Mapping[str, Anchor]) -> None:
        body = {
            "format": ANCHOR_FORMAT,
            "version": ANCHOR_VERSION,
            "key-id": self.key_id(),
            "streams": {k: {"count": a.count, "head": a.head} for k, a in sorted(streams.items())},
        }
        doc = {**body, MAC_FIELD: self._anchor_mac(body)}
        for stale in self.anchor_path.parent.glob(f".{self.anchor_path.name}.*.tmp"):  # we hold the lock
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            atomic_write_bytes(self.anchor_path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
            os.chmod(self.anchor_path, FILE_MODE)
        except OSError as exc:
            raise LedgerError(
                f"Expected to write the integrity anchor {self.anchor_path}, but it failed ({exc}); make "
                "its folder writable by the daemon's user, or set integrity-key to a writable place "
                "outside the state directory"
            ) from exc

    @contextlib.contextmanager
    def _anchor_lock(self) -> Iterator[None]:
        with exclusive_lock(self.anchor_path.with_name(self.anchor_path.name + LOCK_SUFFIX)):
            yield


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``lock_path``; the kernel releases it if the process dies."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise LedgerError(
            f"Expected to create the lock file {lock_path}, but it failed ({exc}); make its folder "
            "writable by the user running the site"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------- chained JSON lines (egress log)


def legacy_allowed(integrity: SiteIntegrity, stream: str) -> bool:
    """Whether an unchained file (written before fedshift chained it) may still be read and chained once:
    only while the anchor records no chained entry of ``stream`` (else it is a rolled-back copy)."""
    return integrity.anchor(stream).count == 0


def read_chained_lines(path: Path, stream: str, what: str = "line") -> tuple[list[dict[str, Any]], list[str]]:
    """The records (without their ``mac``) and MACs of a chained JSONL file, verified and anchored.

    An unchained file from before fedshift chained it (no record has a MAC) is returned with no MACs
    while :func:`legacy_allowed`; :func:`append_chained_line` then chains it.
    """
    integrity = for_state_dir(path.parent).snapshot()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        integrity.check_missing(stream, path, what)
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(
            f"Expected {path} to be readable UTF-8 text, but reading it failed ({exc})"
        ) from None
    lines = text.split("\n")
    if lines[-1]:  # a crash while appending leaves a last line without its newline: never written
        logger.warning("%s: ignoring a half-written last line (the site stopped while appending it)", path)
    records: list[Any] = []
    for i, line in enumerate(lines[:-1]):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise LedgerError(
                f"Expected every {what} of {path} to be a JSON object, but {what} {i} is not: the file "
                f"was edited or damaged; {_RESTORE}"
            )
        records.append(record)
    if not records:
        integrity.check_missing(stream, path, what)
        return [], []
    if all(MAC_FIELD not in r for r in records) and legacy_allowed(integrity, stream):
        return records, []
    macs = integrity.verify(stream, records, path, what)
    integrity.check_anchor(stream, len(macs), macs.__getitem__, path, what)
    return [{k: v for k, v in r.items() if k != MAC_FIELD} for r in records], macs


def append_chained_line(path: Path, stream: str, record: Mapping[str, Any], what: str = "line") -> None:
    """Append ``record`` with its chained MAC (fsynced) and advance the anchor.

    The file's tail is checked first (its last line's MAC, and the line the anchor names), in
    constant JSON work: a log rolled back, truncated, deleted or with its last line edited is refused
    and nothing is appended. A full check of every line is :func:`read_chained_lines` (the daemon's
    start, ``fedshift ledger``, every reader).
    """
    integrity = for_state_dir(path.parent)
    with exclusive_lock(path.with_name(path.name + LOCK_SUFFIX)):
        count, previous = _checked_tail(integrity, path, stream, what)
        body = as_read(record)
        mac = integrity.mac(previous, body)
        line = json.dumps({**body, MAC_FIELD: mac}, sort_keys=True) + "\n"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            _drop_partial_line(fd)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        integrity.advance(stream, count + 1, mac)


def chain_legacy_lines(path: Path, stream: str, what: str = "line") -> None:
    """Chain an unchained JSONL file from before now, not at its next append (the daemon's start), so
    that deleting it from then on is seen; a chained file's tail is checked, a missing one is fine."""
    if path.is_file():
        with exclusive_lock(path.with_name(path.name + LOCK_SUFFIX)):
            _checked_tail(for_state_dir(path.parent), path, stream, what)


def _checked_tail(integrity: SiteIntegrity, path: Path, stream: str, what: str) -> tuple[int, str]:
    """(complete lines, last MAC) of a chained JSONL file whose tail agrees with the anchor; an
    unchained file from before is chained here, once (the caller holds the file's lock)."""
    integrity.snapshot()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
        integrity.check_missing(stream, path, what)
    lines = [ln for ln in data[: data.rfind(b"\n") + 1].split(b"\n") if ln.strip()]
    if lines and b'"mac":' not in lines[-1] and legacy_allowed(integrity, stream):
        records, _ = read_chained_lines(path, stream, what)
        integrity.install()
        sealed = integrity.seal(stream, records)
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in sealed).encode())
        os.chmod(path, FILE_MODE)
        integrity.advance(stream, len(sealed), sealed[-1][MAC_FIELD])
        logger.warning(
            "%s: chained its %d unchained %ss (written before fedshift kept it tamper-evident); what "
            "they say cannot be verified, what follows can",
            path,
            len(sealed),
            what,
        )
        return len(sealed), str(sealed[-1][MAC_FIELD])
    integrity.install()  # the site's first record: make its key (nothing when it exists)
    if not lines:
        integrity.check_missing(stream, path, what)
        return 0, integrity.genesis(stream)

    def recorded(i: int) -> tuple[dict[str, Any], str]:
        try:
            record = json.loads(lines[i])
            mac = record.get(MAC_FIELD) if isinstance(record, dict) else None
        except ValueError:
            record, mac = {}, None
        if not isinstance(mac, str):
            raise LedgerError(
                f"Expected every {what} of {path} to be a JSON object with its chained MAC, but {what} {i} "
                f"is not: the file was edited or damaged; {_RESTORE}"
            )
        return record, mac

    n = len(lines)
    last, last_mac = recorded(n - 1)
    previous = recorded(n - 2)[1] if n > 1 else integrity.genesis(stream)
    if not hmac.compare_digest(last_mac, integrity.mac(previous, last)):
        integrity.verify(stream, [recorded(i)[0] for i in range(n)], path, what)  # names the line
    integrity.check_anchor(stream, n, lambda i: recorded(i)[1], path, what)
    return n, last_mac


def _drop_partial_line(fd: int) -> None:
    """Cut a last line left without its newline by a crash (it was never written whole)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, data.rfind(b"\n") + 1)
