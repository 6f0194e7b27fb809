"""The site's persistent privacy ledger: every DP release is charged to a file that outlives the process.

The ClientApp is created afresh each round and the SuperNode may be killed at
any moment, so the privacy a site has spent lives on disk, in
``<state-dir>/privacy-ledger.json``, and nowhere else. One entry per charged
mechanism (run, round, mechanism); each entry also records the epsilon of the
whole ledger after it, so the file alone tells what the site has promised. The
file's format, its crash safety and its tamper evidence are
:mod:`fedshift.client.ledger_file`.

Every mechanism is accounted as a Poisson-subsampled Gaussian with
``(noise_multiplier, sample_rate, steps)``, by the Opacus accountant the ledger
was started with (:mod:`fedshift.common.privacy`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from fedshift.client import integrity
from fedshift.client.ledger_file import (
    LEDGER_FILE,
    LedgerEntry,
    chain_legacy_ledger,
    delta_problem,
    exclusive_lock,
    history_of,
    mechanism_problem,
    read_file,
    store,
)
from fedshift.common import privacy
from fedshift.common.errors import LedgerError, PrivacyError
from fedshift.common.protocol import MECHANISM_DP_SGD

__all__ = [
    "LEDGER_FILE",
    "LedgerEntry",
    "PrivacyLedger",
    "chain_legacy_ledger",
    "format_ledger",
    "open_ledger",
    "verify_site",
]

logger = logging.getLogger(__name__)


class PrivacyLedger:
    """The privacy spent at one site, across rounds, runs and restarts, kept in one JSON file.

    Opening reads the file if it exists (:class:`LedgerError` if it cannot be
    trusted); an absent file is an empty ledger, created by the first
    :meth:`charge`. Reads (``entries``, ``epsilon``, ``find``) use the state as
    of opening or of this object's last charge; :meth:`charge` always re-reads
    the file under the lock first.
    """

    def __init__(self, path: str | Path, *, accountant: str = privacy.DEFAULT_ACCOUNTANT) -> None:
        if accountant not in privacy.ACCOUNTANTS:
            raise PrivacyError(
                f"Expected the ledger's accountant to be one of {sorted(privacy.ACCOUNTANTS)}, "
                f"but got {accountant!r}; set dp-accountant to one of them"
            )
        self.path: Path = Path(path)
        self.accountant: str = accountant
        self._entries: tuple[LedgerEntry, ...] = self._load()

    @classmethod
    def at(cls, state_dir: str | Path, *, accountant: str = privacy.DEFAULT_ACCOUNTANT) -> PrivacyLedger:
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
        return history_of(self._entries)

    def epsilon(self, delta: float) -> float:
        """The epsilon, at ``delta``, of everything this ledger holds."""
        return privacy.epsilon(self.history(), delta, self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """The epsilon that :meth:`charge` would record for one more such entry (at ``delta``)."""
        problem = mechanism_problem("planned", 0, MECHANISM_DP_SGD, noise_multiplier, sample_rate, steps)
        if problem is None:
            problem = delta_problem(delta)
        if problem is not None:
            raise PrivacyError(problem)
        return self._epsilon_after(self._entries, (noise_multiplier, sample_rate, steps), delta)

    def find(self, run_id: str, round: int, mechanism: str = MECHANISM_DP_SGD) -> LedgerEntry | None:
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
        problem = mechanism_problem(run_id, round, mechanism, noise_multiplier, sample_rate, steps)
        if problem is None:
            problem = delta_problem(delta)
        if problem is not None:
            raise PrivacyError(f"{problem}; nothing was charged to {self.path}")
        with exclusive_lock(self.path):
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
            store(self.path, self.accountant, new_entries, legacy=0 if chained else len(entries))
            self._entries = new_entries
        logger.info(
            "Charged run %s round %s (%s, sigma=%.4g, q=%.4g, %d steps) to %s: epsilon = %.4f at delta = %g",
            *(run_id, round, mechanism, entry.noise_multiplier, entry.sample_rate, entry.steps),
            *(self.path, eps, delta),
        )
        return entry

    def _load(self) -> tuple[LedgerEntry, ...]:
        return self._read()[0]

    def _read(self) -> tuple[tuple[LedgerEntry, ...], bool]:
        """The entries on disk, and whether they are chained (``False``: none yet, or version 1)."""
        contents = read_file(self.path)
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
        eps = privacy.epsilon([*history_of(entries), mech], delta, self.accountant)
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
    contents = read_file(path)
    if contents is None:
        return None
    return PrivacyLedger(path, accountant=contents[0])


def verify_site(state_dir: str | Path) -> str:
    """Check a site's ledger and egress log against its key and anchor; one line saying what holds.

    Reads only. :class:`LedgerError` names the first thing that does not verify.
    """
    from fedshift.client.egress import EGRESS_LOG_FILE

    state_dir = Path(state_dir)
    site = integrity.for_state_dir(state_dir)
    contents = read_file(state_dir / LEDGER_FILE)
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
