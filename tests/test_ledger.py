"""The privacy ledger: epsilon against references, SIGKILL safety, locking, corruption, CLI."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedshift.client import integrity
from fedshift.client.ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger, format_ledger, open_ledger
from fedshift.common import privacy
from fedshift.common.cli import main
from fedshift.common.errors import LedgerError, PrivacyError
from fedshift.tests.helpers import one_line_error

DELTA = 1e-5
# (sigma, q, steps): different noise and rates, as rounds and runs at one site are
HISTORY = [(1.1, 0.01, 120), (2.0, 0.05, 40), (1.1, 0.01, 120)]

# Integer RDP orders, whose RDP has the closed form below; FEW_ORDERS keeps the crash and
# locking tests fast (the ledger re-accounts its whole history at every charge).
INTEGER_ORDERS = list(range(2, 65))
FEW_ORDERS = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
FEW = "rdp-few-orders"


class _IntegerOrdersRDP(RDPAccountant):
    DEFAULT_ALPHAS = INTEGER_ORDERS


class _FewOrdersRDP(RDPAccountant):
    DEFAULT_ALPHAS = FEW_ORDERS


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` points the root logger at the captured stderr of its test; undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def few_orders(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(privacy.ACCOUNTANTS, FEW, _FewOrdersRDP)
    return FEW


def _charge_all(
    ledger: PrivacyLedger, history: list[tuple[float, float, int]], run_id: str = "7"
) -> list[LedgerEntry]:
    return [
        ledger.charge(
            run_id=run_id,
            round=i,
            mechanism="dp-sgd",
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            delta=DELTA,
        )
        for i, (sigma, q, steps) in enumerate(history)
    ]


# ---------------------------------------------------------------------------- epsilon vs references


def _opacus_epsilon(
    factory: Callable[[], Any], history: list[tuple[float, float, int]], delta: float
) -> float:
    acc = factory()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def test_epsilon_equals_a_fresh_opacus_rdp_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant="rdp")
    entries = _charge_all(ledger, HISTORY)
    for k, entry in enumerate(entries, start=1):  # each entry: epsilon of the ledger up to it
        assert entry.epsilon == pytest.approx(_opacus_epsilon(RDPAccountant, HISTORY[:k], DELTA), abs=1e-6)
    for delta in (DELTA, 1e-7):
        assert ledger.epsilon(delta) == pytest.approx(
            _opacus_epsilon(RDPAccountant, HISTORY, delta), abs=1e-6
        )
    assert ledger.history() == HISTORY
    # reopened from disk: the same entries and history
    again = PrivacyLedger.at(tmp_path, accountant="rdp")
    assert again.entries == ledger.entries
    assert again.history() == HISTORY
    assert 0 < entries[0].epsilon < entries[1].epsilon < entries[2].epsilon


def test_epsilon_if_is_what_the_next_charge_records(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant="rdp")
    _charge_all(ledger, HISTORY[:2])
    planned = ledger.epsilon_if(1.3, 0.03, 25, DELTA)
    assert planned == pytest.approx(_opacus_epsilon(RDPAccountant, [*HISTORY[:2], (1.3, 0.03, 25)], DELTA))
    entry = ledger.charge(
        run_id="8", round=0, mechanism="dp-sgd", noise_multiplier=1.3, sample_rate=0.03, steps=25, delta=DELTA
    )
    assert entry.epsilon == planned == ledger.epsilon(DELTA)


def test_epsilon_equals_a_fresh_opacus_prv_accountant(tmp_path: Path) -> None:
    history = HISTORY[:2]  # PRV is slow: a short history
    ledger = PrivacyLedger.at(tmp_path, accountant="prv")
    entries = _charge_all(ledger, history)
    reference = _opacus_epsilon(PRVAccountant, history, DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(reference, abs=1e-6)
    assert entries[1].epsilon == pytest.approx(reference, abs=1e-6)
    assert 0 < entries[0].epsilon < entries[1].epsilon
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["accountant"] == "prv"


def _reference_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order ``alpha`` of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019):
    (1/(alpha-1)) log sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k) / (2 sigma^2)), in log space."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = np.array([math.log(math.comb(alpha, i)) for i in range(alpha + 1)])
    log_terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    return float(np.logaddexp.reduce(log_terms)) / (alpha - 1)


def _reference_epsilon(history: list[tuple[float, float, int]], orders: list[int], delta: float) -> float:
    """RDP composed over steps and entries, then RDP -> (epsilon, delta) as in Opacus 1.6
    ``get_privacy_spent`` (Balle et al. 2020, Thm. 21), minimised over ``orders``."""
    a = np.array(orders, dtype=np.float64)
    rdp = np.array(
        [sum(steps * _reference_rdp(q, sigma, alpha) for sigma, q, steps in history) for alpha in orders]
    )
    eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(eps.min())


@pytest.mark.parametrize(("sigma", "q"), [(1.1, 0.01), (0.8, 0.1), (2.5, 0.003), (0.6, 0.5)])
def test_opacus_rdp_matches_the_closed_form(sigma: float, q: float) -> None:
    ours = np.array([_reference_rdp(q, sigma, alpha) for alpha in INTEGER_ORDERS])
    theirs = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=INTEGER_ORDERS))
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=0)
    composed = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=37, orders=INTEGER_ORDERS))
    np.testing.assert_allclose(composed, 37 * ours, rtol=1e-6, atol=0)


def test_ledger_epsilon_equals_the_closed_form_at_integer_orders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(privacy.ACCOUNTANTS, "rdp-integer-orders", _IntegerOrdersRDP)
    ledger = PrivacyLedger.at(tmp_path, accountant="rdp-integer-orders")
    entries = _charge_all(ledger, HISTORY)
    for k, entry in enumerate(entries, start=1):
        reference = _reference_epsilon(HISTORY[:k], INTEGER_ORDERS, DELTA)
        assert entry.epsilon == pytest.approx(reference, rel=1e-6)
    assert ledger.epsilon(1e-6) == pytest.approx(_reference_epsilon(HISTORY, INTEGER_ORDERS, 1e-6), rel=1e-6)


def test_ledger_epsilon_equals_get_privacy_spent_over_summed_rdp(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant="rdp")
    _charge_all(ledger, HISTORY)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
        for sigma, q, steps in HISTORY
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert abs(ledger.epsilon(DELTA) - eps) <= 1e-9
    assert abs(ledger.entries[-1].epsilon - eps) <= 1e-9


# ---------------------------------------------------------------------------- file, duplicates, corruption


def test_absent_ledger_is_empty_and_not_created(tmp_path: Path) -> None:
    ledger = PrivacyLedger.at(tmp_path / "site")
    assert ledger.entries == ()
    assert ledger.history() == []
    assert ledger.epsilon(DELTA) == 0.0
    assert ledger.find("7", 0) is None
    assert not (tmp_path / "site").exists()
    assert open_ledger(tmp_path) is None


def _reference_chain(key: bytes, stream: str, records: list[dict[str, Any]]) -> list[str]:
    """HMAC-SHA256(key, previous MAC + newline + canonical JSON), from HMAC(key, genesis:<stream>)."""
    previous = hmac.new(key, f"fedshift-chain-genesis:{stream}".encode(), hashlib.sha256).hexdigest()
    macs = []
    for record in records:
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        previous = hmac.new(key, previous.encode() + b"\n" + body, hashlib.sha256).hexdigest()
        macs.append(previous)
    return macs


def test_file_format_chain_and_private_mode(tmp_path: Path, few_orders: str) -> None:
    state = tmp_path / "site"
    ledger = PrivacyLedger.at(state, accountant=few_orders)
    _charge_all(ledger, HISTORY[:2])
    path = state / LEDGER_FILE
    assert ledger.path == path
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert set(doc) == {"format", "version", "accountant", "key-id", "entries"}
    assert (doc["format"], doc["version"], doc["accountant"]) == ("fedshift-privacy-ledger", 2, FEW)
    # the key was made beside the state directory, owner-only; the chain is HMAC-SHA256 under it
    key_file = tmp_path / "site.integrity-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = bytes.fromhex(key_file.read_text().strip().removeprefix("fedshift-integrity-key-v1:"))
    plain = [{k: v for k, v in d.items() if k != "mac"} for d in doc["entries"]]
    assert [d["mac"] for d in doc["entries"]] == _reference_chain(key, "privacy-ledger", plain)
    assert doc["key-id"] == hmac.new(key, b"fedshift-integrity-key-id", hashlib.sha256).hexdigest()[:16]
    assert plain == [e.to_dict() for e in ledger.entries]
    assert [LedgerEntry.from_dict(d) for d in plain] == list(ledger.entries)
    # the anchor beside the key records the count and the last MAC
    anchor = json.loads((tmp_path / "site.integrity-key.anchor").read_text())
    assert anchor["streams"]["privacy-ledger"] == {"count": 2, "head": doc["entries"][-1]["mac"]}


def test_find_and_run_entries(tmp_path: Path, few_orders: str) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant=few_orders)
    _charge_all(ledger, HISTORY[:2], run_id="1")
    _charge_all(ledger, HISTORY[:1], run_id="2")
    assert [e.round for e in ledger.run_entries("1")] == [0, 1]
    assert [e.run_id for e in ledger.run_entries("2")] == ["2"]
    found = ledger.find("1", 1)
    assert found is not None and found.noise_multiplier == HISTORY[1][0]
    assert ledger.find("1", 1, mechanism="other") is None
    assert ledger.find("3", 0) is None


def test_duplicate_charge_is_refused_and_file_unchanged(tmp_path: Path, few_orders: str) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant=few_orders)
    _charge_all(ledger, HISTORY[:2])
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(LedgerError, match="already charged"):
        ledger.charge(
            run_id="7",
            round=1,
            mechanism="dp-sgd",
            noise_multiplier=5.0,
            sample_rate=0.1,
            steps=1,
            delta=DELTA,
        )
    # also from a second object that has not seen the entry in memory: the charge re-reads the file
    stale = PrivacyLedger.at(tmp_path / "elsewhere", accountant=few_orders)
    stale.path = tmp_path / LEDGER_FILE
    with pytest.raises(LedgerError, match="already charged"):
        stale.charge(
            run_id="7",
            round=0,
            mechanism="dp-sgd",
            noise_multiplier=5.0,
            sample_rate=0.1,
            steps=1,
            delta=DELTA,
        )
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert len(ledger.entries) == 2
    # another mechanism in the same round is a different charge
    ledger.charge(
        run_id="7", round=1, mechanism="other", noise_multiplier=5.0, sample_rate=0.1, steps=1, delta=DELTA
    )
    assert len(PrivacyLedger.at(tmp_path, accountant=few_orders).entries) == 3


@pytest.mark.parametrize(
    ("bad", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", float("nan")),
        ("sample_rate", 1.5),
        ("steps", 0),
        ("round", -1),
        ("delta", 0.0),
        ("run_id", ""),
    ],
)
def test_impossible_charge_is_refused_before_touching_the_file(tmp_path: Path, bad: str, value: Any) -> None:
    ledger = PrivacyLedger.at(tmp_path)
    args: dict[str, Any] = dict(
        run_id="7", round=0, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.01, steps=5, delta=DELTA
    )
    args[bad] = value
    with pytest.raises(PrivacyError, match=bad):
        ledger.charge(**args)
    assert not (tmp_path / LEDGER_FILE).exists()


def _rewrite(doc: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    """A ledger whose chain is valid again (re-sealed with the site's own key, as only someone holding
    the key could): damage that only the entry checks can see."""
    site = integrity.for_state_dir(_STATE[0])
    doc = {**doc, "entries": site.seal(integrity.LEDGER_STREAM, entries)}
    return json.dumps(doc).encode()


_STATE: list[Path] = []  # the state directory of the ledger a corruption is applied to


def _corruptions() -> dict[str, Callable[[bytes], bytes]]:
    def edit_epsilon(raw: bytes) -> bytes:
        doc = json.loads(raw)
        doc["entries"][1]["epsilon"] = doc["entries"][1]["epsilon"] / 2
        return json.dumps(doc, indent=2).encode()

    def wrong_format(raw: bytes) -> bytes:
        doc = json.loads(raw)
        doc["format"] = "opacus-ledger"
        return json.dumps(doc).encode()

    def missing_field(raw: bytes) -> bytes:
        doc = json.loads(raw)
        entries = doc["entries"]
        del entries[0]["steps"]
        return _rewrite(doc, entries)

    def wrong_type(raw: bytes) -> bytes:
        doc = json.loads(raw)
        entries = doc["entries"]
        entries[0]["steps"] = "120"
        return _rewrite(doc, entries)

    def duplicate_entry(raw: bytes) -> bytes:
        doc = json.loads(raw)
        entries = doc["entries"]
        return _rewrite(doc, [*entries, entries[-1]])

    def epsilon_decreases(raw: bytes) -> bytes:
        doc = json.loads(raw)
        entries = doc["entries"]
        entries[1]["epsilon"] = entries[0]["epsilon"] / 2
        return _rewrite(doc, entries)

    def duplicate_json_key(raw: bytes) -> bytes:
        return raw.replace(b'"version": 2,', b'"version": 2, "version": 2,')

    return {
        "truncated": lambda raw: raw[: len(raw) // 2],
        "empty": lambda raw: b"",
        "garbage": lambda raw: bytes(random.Random(0).randrange(256) for _ in range(300)),
        "edited epsilon": edit_epsilon,
        "wrong format": wrong_format,
        "missing field": missing_field,
        "wrong type": wrong_type,
        "duplicate entry": duplicate_entry,
        "epsilon decreases": epsilon_decreases,
        "duplicate JSON key": duplicate_json_key,
    }


@pytest.mark.parametrize("damage", sorted(_corruptions()))
def test_corrupt_ledger_is_refused_and_left_byte_identical(
    tmp_path: Path, damage: str, few_orders: str
) -> None:
    ledger = PrivacyLedger.at(tmp_path, accountant=few_orders)  # opened while the file is fine
    _charge_all(ledger, HISTORY[:2])
    path = tmp_path / LEDGER_FILE
    _STATE[:] = [tmp_path]
    corrupt = _corruptions()[damage](path.read_bytes())
    path.write_bytes(corrupt)
    with pytest.raises(LedgerError) as info:
        PrivacyLedger(path, accountant=few_orders)
    message = str(info.value)
    assert str(path) in message
    assert "never delete it" in message
    with pytest.raises(LedgerError):  # a charge re-reads, refuses, and never resets the file
        ledger.charge(
            run_id="7",
            round=9,
            mechanism="dp-sgd",
            noise_multiplier=1.0,
            sample_rate=0.01,
            steps=5,
            delta=DELTA,
        )
    assert path.read_bytes() == corrupt
    assert len(ledger.entries) == 2  # in-memory state unchanged as well


def test_accountant_mismatch_is_refused(tmp_path: Path, few_orders: str) -> None:
    _charge_all(PrivacyLedger.at(tmp_path, accountant=few_orders), HISTORY[:1])
    with pytest.raises(LedgerError, match=rf"kept with '{FEW}'.*dp-accountant"):
        PrivacyLedger.at(tmp_path, accountant="rdp")
    with pytest.raises(PrivacyError, match="one of"):
        PrivacyLedger.at(tmp_path, accountant="moments")
    reopened = open_ledger(tmp_path)  # the file's own accountant
    assert reopened is not None and reopened.accountant == FEW


def test_entry_from_dict_refuses_bad_fields() -> None:
    good = LedgerEntry(
        run_id="1",
        round=0,
        mechanism="dp-sgd",
        noise_multiplier=1.0,
        sample_rate=0.01,
        steps=3,
        delta=1e-5,
        epsilon=0.5,
        accountant="rdp",
        time="2025-01-01T00:00:00.000+00:00",
    ).to_dict()
    assert LedgerEntry.from_dict(good).to_dict() == good
    for change in ({"round": True}, {"steps": 3.0}, {"epsilon": "0.5"}, {"extra": 1}, {"time": "yesterday"}):
        with pytest.raises(LedgerError):
            LedgerEntry.from_dict({**good, **change})
    with pytest.raises(LedgerError, match="missing"):
        LedgerEntry.from_dict({k: v for k, v in good.items() if k != "delta"})


# ---------------------------------------------------------------------------- real processes, SIGKILL

# One warm process imports fedshift, Opacus and torch once (seconds) and forks a worker per
# job (milliseconds); the test SIGKILLs workers at random moments. Every worker is a real
# process writing the real ledger with the real lock.
_WORKER_HOST = r"""
import json, os, signal, sys, traceback
from opacus.accountants import RDPAccountant
from fedshift.client.ledger import PrivacyLedger
from fedshift.common.privacy import register_accountant

class FewOrdersRDP(RDPAccountant):
    DEFAULT_ALPHAS = %(orders)r

register_accountant(%(name)r, FewOrdersRDP)

def job(path, run_id, count=None, die_on_replace=None):
    if die_on_replace is not None:  # be killed inside atomic_write_bytes, after fsync, before os.replace
        real_replace, calls = os.replace, [0]
        def replace(src, dst):
            calls[0] += os.path.basename(dst) == "privacy-ledger.json"  # the ledger's, not the anchor's
            if calls[0] == die_on_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
    ledger = PrivacyLedger(path, accountant=%(name)r)
    done = 0
    while count is None or done < count:
        rounds = [e.round for e in ledger.run_entries(run_id)]
        ledger.charge(run_id=run_id, round=max(rounds, default=-1) + 1, mechanism="dp-sgd",
                      noise_multiplier=1.1, sample_rate=0.01, steps=10, delta=1e-5)
        done += 1

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "fork":
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                job(**request["job"])
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        reply = {"pid": pid}
    else:
        _, status = os.waitpid(request["pid"], 0)
        reply = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    print(json.dumps(reply), flush=True)
"""


class _Workers:
    def __init__(self) -> None:
        script = _WORKER_HOST % {"orders": FEW_ORDERS, "name": FEW}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.ready = False  # it imports in the background while the other tests run

    def _reply(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the helper process did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the helper process died (exit code {self.proc.poll()})"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _ask(self, request: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        if not self.ready:
            assert self._reply(timeout=180) == {"ready": True}
            self.ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def start(self, path: Path, run_id: str, **job: Any) -> int:
        pid: int = self._ask({"cmd": "fork", "job": {"path": str(path), "run_id": run_id, **job}})["pid"]
        return pid

    def wait(self, pid: int) -> dict[str, Any]:
        return self._ask({"cmd": "wait", "pid": pid})

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.terminate()  # it holds no ledger lock; its workers have all been waited for
        self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def workers() -> Iterator[_Workers]:
    """Started when this module starts, so that the helper's imports overlap the other tests."""
    helper = _Workers()
    yield helper
    helper.close()


def _assert_rounds_in_order(path: Path, run_id: str) -> list[LedgerEntry]:
    entries = PrivacyLedger(path, accountant=FEW).run_entries(run_id)
    assert [e.round for e in entries] == list(range(len(entries)))
    assert all(a.epsilon <= b.epsilon for a, b in itertools.pairwise(entries))
    return entries


def test_sigkill_at_random_moments_never_loses_or_damages_the_ledger(
    tmp_path: Path, workers: _Workers, few_orders: str
) -> None:
    path = tmp_path / LEDGER_FILE
    rng = random.Random(20240611)
    counts = [0]
    for _ in range(10):
        pid = workers.start(path, "42")
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        assert workers.wait(pid)["signal"] == signal.SIGKILL
        entries = _assert_rounds_in_order(path, "42") if path.exists() else []
        assert len(entries) >= counts[-1]  # nothing lost; the next worker continues from here
        counts.append(len(entries))
    assert counts[-1] > 10, f"too few charges between kills to test anything: {counts}"
    # a new process continues with the next round
    pid = workers.start(path, "42", count=1)
    assert workers.wait(pid) == {"signal": None, "code": 0}
    entries = _assert_rounds_in_order(path, "42")
    assert len(entries) == counts[-1] + 1
    ledger = PrivacyLedger(path, accountant=FEW)
    assert ledger.entries[-1].epsilon == pytest.approx(ledger.epsilon(DELTA), abs=1e-12)
    assert ledger.epsilon(DELTA) == pytest.approx(
        _opacus_epsilon(_FewOrdersRDP, [(1.1, 0.01, 10)] * len(entries), DELTA), abs=1e-9
    )


def test_sigkill_inside_the_atomic_write_keeps_the_old_file(
    tmp_path: Path, workers: _Workers, few_orders: str
) -> None:
    path = tmp_path / LEDGER_FILE
    pid = workers.start(path, "42", count=5, die_on_replace=3)
    assert workers.wait(pid)["signal"] == signal.SIGKILL
    entries = _assert_rounds_in_order(path, "42")
    assert [e.round for e in entries] == [0, 1]
    # the third charge was fully written to a temp file, then killed before os.replace
    (orphan,) = tmp_path.glob(f".{LEDGER_FILE}.*.tmp")
    unfinished = [
        {k: v for k, v in d.items() if k != "mac"} for d in json.loads(orphan.read_text())["entries"]
    ]
    assert [e.to_dict() for e in entries] == unfinished[:2] and len(unfinished) == 3
    # a new process continues (and clears the orphan under the lock)
    pid = workers.start(path, "42", count=1)
    assert workers.wait(pid) == {"signal": None, "code": 0}
    assert [e.round for e in _assert_rounds_in_order(path, "42")] == [0, 1, 2]
    assert not list(tmp_path.glob(f".{LEDGER_FILE}.*.tmp"))


def test_two_processes_charging_at_once_lose_nothing(
    tmp_path: Path, workers: _Workers, few_orders: str
) -> None:
    path = tmp_path / LEDGER_FILE
    pids = [workers.start(path, run_id, count=20) for run_id in ("run-a", "run-b")]
    for pid in pids:
        assert workers.wait(pid) == {"signal": None, "code": 0}
    ledger = PrivacyLedger(path, accountant=FEW)
    assert len(ledger.entries) == 40
    for run_id in ("run-a", "run-b"):
        assert len(_assert_rounds_in_order(path, run_id)) == 20
    epsilons = [e.epsilon for e in ledger.entries]
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(
        _opacus_epsilon(_FewOrdersRDP, [(1.1, 0.01, 10)] * 40, DELTA), abs=1e-9
    )


# ---------------------------------------------------------------------------- CLI

_TOTAL = re.compile(r"^epsilon = (\S+) at delta = (\S+) \(accountant (\w+)\), (\d+) entries$", re.MULTILINE)


def test_cli_table_total_matches_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = PrivacyLedger.at(tmp_path)
    _charge_all(ledger, HISTORY)
    assert main(["ledger", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    match = _TOTAL.search(out)
    assert match, out
    eps, delta, accountant, n = match.groups()
    assert float(delta) == DELTA and accountant == "prv" and int(n) == len(HISTORY)
    assert abs(float(eps) - ledger.epsilon(DELTA)) <= 1e-3
    assert out.count("dp-sgd") == len(HISTORY)
    table, verified, audit = out.rstrip("\n").rsplit("\n", 2)
    assert table == format_ledger(ledger)
    assert audit == "privacy audit: none yet (fedshift audit)"
    key = tmp_path.with_name(tmp_path.name + ".integrity-key")
    assert verified.startswith(f"integrity verified with key {key} ")
    assert "ledger 3 entries chained (anchor 3)" in verified
    # at another delta, given the ledger file itself
    assert main(["ledger", str(tmp_path / LEDGER_FILE), "--delta", "1e-3"]) == 0
    match = _TOTAL.search(capsys.readouterr().out)
    assert match and float(match.group(2)) == 1e-3
    assert abs(float(match.group(1)) - ledger.epsilon(1e-3)) <= 1e-3


def test_cli_json_matches_the_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = PrivacyLedger.at(tmp_path)
    _charge_all(ledger, HISTORY[:2])
    assert main(["ledger", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["entries"] == [e.to_dict() for e in ledger.entries]
    assert report["accountant"] == "prv" and report["delta"] == DELTA
    assert report["epsilon"] == pytest.approx(ledger.epsilon(DELTA), abs=1e-12)


def test_cli_missing_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ledger", str(tmp_path)])
    one_line_error(code, capsys.readouterr().err, "no privacy ledger", str(tmp_path / LEDGER_FILE))


def test_cli_corrupt_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(b'{"format": "fedshift-privacy-ledger", "vers')
    code = main(["ledger", str(tmp_path)])
    one_line_error(code, capsys.readouterr().err, str(tmp_path / LEDGER_FILE), "never delete it")


def test_cli_bad_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str], few_orders: str) -> None:
    _charge_all(PrivacyLedger.at(tmp_path, accountant=few_orders), HISTORY[:1])
    code = main(["ledger", str(tmp_path), "--delta", "2"])
    one_line_error(code, capsys.readouterr().err, "--delta")


def test_cli_wrong_file_is_not_called_a_corrupt_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.npz"
    data.write_bytes(b"PK\x03\x04 not a ledger")
    code = main(["ledger", str(data)])
    one_line_error(code, capsys.readouterr().err, "state directory", "data.npz")
    assert data.read_bytes() == b"PK\x03\x04 not a ledger"
