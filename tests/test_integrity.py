"""Tamper evidence: the ledger and egress log are HMAC-chained under a key kept
outside the state directory, and anchored there, so an edit, a rollback or a deletion is detected.

Every ledger here is written by real ``charge`` calls (the Opacus accountant), every egress log by
real ``append_egress_log`` calls; the damage is what a person with write access to the state
directory (but not to the key) can do with a text editor, ``cp`` and ``rm``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedshift.client import integrity
from fedshift.client.egress import EGRESS_LOG_FILE, append_egress_log, read_egress_log
from fedshift.client.ledger import LEDGER_FILE, PrivacyLedger, open_ledger
from fedshift.common.cli import main
from fedshift.common.errors import LedgerError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, SITE_ERROR
from fedshift.tests.helpers import call_client_app, one_line_error, site_run_config, write_site

DELTA = 1e-5
ROUNDS = [(1.1, 0.01, 120), (2.0, 0.05, 40), (1.3, 0.02, 60)]  # (sigma, q, steps) per round


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """``main`` points the root logger at the captured stderr of its test; undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _charge(ledger: PrivacyLedger, round: int, run_id: str = "7") -> None:
    sigma, q, steps = ROUNDS[round % len(ROUNDS)]
    ledger.charge(
        run_id=run_id,
        round=round,
        mechanism="dp-sgd",
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=DELTA,
    )


def _site(tmp_path: Path, rounds: int = 2) -> tuple[Path, PrivacyLedger]:
    state = tmp_path / "hospital-a"
    ledger = PrivacyLedger.at(state)
    for r in range(rounds):
        _charge(ledger, r)
    return state, ledger


def _refused(state: Path, *needles: str) -> str:
    """Opening the ledger, and charging it, are both refused naming ``needles``; the file stays as it is."""
    path = state / LEDGER_FILE
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.at(state)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message
    stale = PrivacyLedger.at(state.parent / "elsewhere")  # opened before the damage, as a running site
    stale.path = path
    with pytest.raises(LedgerError):  # a charge re-reads under the lock and refuses too: never a reset
        _charge(stale, 9)
    assert (path.read_bytes() if path.exists() else None) == before
    return message


# ---------------------------------------------------------------------------- the ledger


def test_an_edited_entry_is_detected_even_when_rehashed(tmp_path: Path) -> None:
    """Before: the ledger carried one unkeyed sha256, so an edit plus a recomputed sha256 was accepted."""
    state, _ = _site(tmp_path)
    path = state / LEDGER_FILE
    doc = json.loads(path.read_text())
    doc["entries"][0]["noise_multiplier"] = 50.0  # claim far more noise: less epsilon spent
    doc["entries"][0]["epsilon"] = doc["entries"][0]["epsilon"] / 100
    if "sha256" in doc:  # what anyone can recompute without a key
        canonical = json.dumps(doc["entries"], sort_keys=True, separators=(",", ":"))
        doc["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(doc, indent=2))
    message = _refused(state, str(path), "chain breaks at ledger entry 0", "edited", "never delete it")
    assert str(integrity.default_key_path(state)) in message


def test_a_rolled_back_ledger_is_detected_against_the_anchor(tmp_path: Path) -> None:
    """Before: an older copy of the ledger is a valid ledger, and its budget was spent again."""
    state, ledger = _site(tmp_path, rounds=1)
    path = state / LEDGER_FILE
    copy = tmp_path / "after-round-1.json"
    shutil.copy2(path, copy)
    _charge(ledger, 1)
    spent = ledger.epsilon(DELTA)
    current = path.read_bytes()
    shutil.copy2(copy, path)  # put the round-1 copy back
    _refused(state, str(path), "holds 1", "records", "rolled back")
    # with the true ledger restored, the site carries on with what it really spent
    path.write_bytes(current)
    assert PrivacyLedger.at(state).epsilon(DELTA) == pytest.approx(spent)


def test_another_sites_ledger_is_refused(tmp_path: Path) -> None:
    state, ledger = _site(tmp_path, rounds=2)
    path = state / LEDGER_FILE
    good = path.read_bytes()
    other = PrivacyLedger.at(tmp_path / "other")  # a valid ledger, chained under another site's key
    _charge(other, 0)
    shutil.copy2(other.path, path)
    _refused(state, str(path), "another integrity key")
    path.write_bytes(good)
    assert PrivacyLedger.at(state).entries == ledger.entries


def test_a_deleted_ledger_stops_the_site_instead_of_resetting_its_budget(tmp_path: Path) -> None:
    """Before: a missing ledger was an empty one, so deleting it reset the site's budget to zero."""
    state, _ = _site(tmp_path)
    (state / LEDGER_FILE).unlink()
    _refused(state, str(state / LEDGER_FILE), "records 2", "deleted")
    assert not (state / LEDGER_FILE).exists()
    with pytest.raises(LedgerError, match="deleted"):
        open_ledger(state)


def test_a_crash_between_the_ledger_and_its_anchor_is_not_a_rollback(tmp_path: Path) -> None:
    """The ledger is written before the anchor: a ledger one entry ahead of its anchor is accepted."""
    state, ledger = _site(tmp_path, rounds=1)
    anchor = integrity.for_state_dir(state).anchor_path
    before = anchor.read_bytes()
    _charge(ledger, 1)
    anchor.write_bytes(before)  # as if killed after the ledger's os.replace, before the anchor's
    reopened = PrivacyLedger.at(state)
    assert [e.round for e in reopened.entries] == [0, 1]
    _charge(reopened, 2)  # and the next charge brings the anchor up to date
    assert integrity.for_state_dir(state).anchor(integrity.LEDGER_STREAM).count == 3


def test_a_ledger_without_its_key_or_with_another_key_is_refused(tmp_path: Path) -> None:
    state, _ = _site(tmp_path)
    key = integrity.default_key_path(state)
    saved = key.read_bytes()
    key.unlink()
    _refused(state, str(key), "integrity key", "missing", "restore it")
    # another valid key (with its own anchor): the MACs are someone else's
    other, _ = _site(tmp_path / "b")
    key.write_bytes(integrity.default_key_path(other).read_bytes())
    anchor = integrity.for_state_dir(state).anchor_path
    good_anchor = anchor.read_bytes()
    anchor.write_bytes(integrity.for_state_dir(other).anchor_path.read_bytes())
    _refused(state, str(state / LEDGER_FILE), "another integrity key", "set integrity-key")
    # the right key with a wrong anchor, and an edited anchor
    key.write_bytes(saved)
    _refused(state, str(anchor), "does not verify")
    doc = json.loads(good_anchor)
    doc["streams"]["privacy-ledger"]["count"] = 1
    anchor.write_text(json.dumps(doc))
    _refused(state, str(anchor), "does not verify")
    anchor.write_bytes(good_anchor)
    assert len(PrivacyLedger.at(state).entries) == 2
    # an anchor deleted on its own is refused too (it cannot tell a rollback apart any more)
    anchor.unlink()
    _refused(state, str(anchor), "missing")


def test_a_reader_during_the_install_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes at a new site: one makes the key; the other, reading between the key and the
    anchor being written, waits for the install (its lock) instead of calling the anchor missing."""
    state = tmp_path / "hospital-a"
    site = integrity.for_state_dir(state)
    entered, release = threading.Event(), threading.Event()
    write_anchor = integrity.SiteIntegrity._write_anchor

    def slow(self: integrity.SiteIntegrity, streams: Any) -> None:
        entered.set()
        release.wait(10)
        write_anchor(self, streams)

    monkeypatch.setattr(integrity.SiteIntegrity, "_write_anchor", slow)
    installer = threading.Thread(target=site.install)
    installer.start()
    assert entered.wait(10)
    assert site.key_path.exists() and not site.anchor_path.exists()  # half installed, right now
    opened: list[Any] = []
    reader = threading.Thread(target=lambda: opened.append(PrivacyLedger.at(state).entries))
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive() and opened == []  # waiting on the install's lock
    release.set()
    installer.join(10)
    reader.join(10)
    assert opened == [()]


def test_a_bound_key_outside_the_state_dir_is_used_and_one_inside_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "hospital-b"
    key = tmp_path / "keys" / "hospital-b.key"
    integrity.bind_key(state, key)
    try:
        _charge(PrivacyLedger.at(state), 0)
        assert key.is_file() and not integrity.default_key_path(state).exists()
        assert len(PrivacyLedger.at(state).entries) == 1
    finally:
        integrity._BOUND.pop(state.absolute())
    with pytest.raises(LedgerError, match="outside the state directory"):
        integrity.bind_key(state, state / "key")


def _v1_ledger(tmp_path: Path) -> tuple[dict[str, Any], PrivacyLedger]:
    """A version-1 ledger document (unkeyed sha256) of two real entries, and the ledger they came from."""
    _, ledger = _site(tmp_path / "old")
    entries = [e.to_dict() for e in ledger.entries]
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    v1 = {
        "format": "fedshift-privacy-ledger",
        "version": 1,
        "accountant": ledger.accountant,
        "entries": entries,
        "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
    }
    return v1, ledger


def test_a_version_1_ledger_is_chained_once_and_its_old_copy_then_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sites upgrading keep their spent budget (migrated with a warning); the unchained copy is then
    a rollback like any other."""
    v1, ledger = _v1_ledger(tmp_path)  # real entries, rewritten as fedshift wrote them before
    state = ledger.path.parent
    site = tmp_path / "upgraded"
    site.mkdir()
    (site / LEDGER_FILE).write_text(json.dumps(v1))
    with caplog.at_level(logging.WARNING):
        upgraded = PrivacyLedger.at(site)
        assert upgraded.entries == ledger.entries
        _charge(upgraded, 2)
    assert any("unchained version-1" in r.getMessage() for r in caplog.records)
    assert any("Chained the 2 entries" in r.getMessage() for r in caplog.records)
    assert json.loads((site / LEDGER_FILE).read_text())["version"] == 2
    assert PrivacyLedger.at(site).epsilon(DELTA) == pytest.approx(
        PrivacyLedger.at(state).epsilon_if(*ROUNDS[2], DELTA)
    )
    (site / LEDGER_FILE).write_text(json.dumps(v1))
    _refused(site, "unchained version-1", "rolled back")


def test_the_daemons_start_chains_a_version_1_ledger_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the daemon's start made an anchor recording 0 ledger entries and left the version-1 file
    unchained until its next DP charge: meanwhile deleting it passed check_missing (the budget reset),
    and an edited copy with its sha256 recomputed was accepted."""
    from fedshift.deploy.certs import make_certs
    from fedshift.deploy.client import check_site
    from fedshift.deploy.settings import ClientSettings
    from fedshift.tests.deploy_support import toml, write_site_data

    v1, ledger = _v1_ledger(tmp_path)
    root = tmp_path / "site"
    make_certs(root / "certs", sites=["hospital-a"])
    write_site_data(root / "a.npz", seed=0)
    connection = {
        "superlink": "127.0.0.1:9",
        "ca-cert": str(root / "certs" / "ca.crt"),
        "private-key": str(root / "certs" / "nodes" / "hospital-a.key"),
    }
    site = {"site-name": "hospital-a", "data-path": "a.npz", "state-dir": "state", "dp-epsilon": 8.0}
    (root / "site.toml").write_text(toml({"connection": connection, "site": site}))
    state = root / "state"
    state.mkdir()
    (state / LEDGER_FILE).write_text(json.dumps(v1))
    old_log = [{"run": "1", "round": r, "bytes": 8} for r in range(2)]  # an egress log from before too
    (state / EGRESS_LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in old_log))
    with caplog.at_level(logging.WARNING):
        check = check_site(ClientSettings.load(root / "site.toml"))
    assert check.spent == pytest.approx(ledger.epsilon(DELTA))
    assert any("Chained the 2 entries of the version-1" in r.getMessage() for r in caplog.records)
    assert json.loads((state / LEDGER_FILE).read_text())["version"] == 2
    assert integrity.for_state_dir(state).snapshot().anchor(integrity.LEDGER_STREAM).count == 2
    assert PrivacyLedger.at(state).entries == ledger.entries
    check_site(ClientSettings.load(root / "site.toml"))  # a second start: nothing left to chain
    assert integrity.for_state_dir(state).snapshot().anchor(integrity.LEDGER_STREAM).count == 2
    assert integrity.for_state_dir(state).snapshot().anchor(integrity.EGRESS_STREAM).count == 2
    assert read_egress_log(state) == old_log
    (state / EGRESS_LOG_FILE).unlink()  # before, a deleted unchained log went unnoticed until its next line
    with pytest.raises(LedgerError, match="missing"):
        read_egress_log(state)

    # an edited version-1 copy with its sha256 recomputed: a rollback now, not accepted
    v1["entries"] = v1["entries"][:1]
    canonical = json.dumps(v1["entries"], sort_keys=True, separators=(",", ":"))
    v1["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (state / LEDGER_FILE).write_text(json.dumps(v1))
    _refused(state, "unchained version-1", "rolled back")
    # deleted: missing where the anchor counts entries, not an empty ledger (a reset budget)
    (state / LEDGER_FILE).unlink()
    _refused(state, "records 2 ledger entry(s)", "missing")


# ---------------------------------------------------------------------------- the egress log


def _log(state: Path, n: int = 3) -> list[dict[str, Any]]:
    entries = [
        {"run": "7", "round": r, "stage": "train", "items": [{"key": "auc", "bytes": 8}], "bytes": 8}
        for r in range(n)
    ]
    for entry in entries:
        append_egress_log(state, entry)
    return entries


def test_an_edited_egress_line_is_detected(tmp_path: Path) -> None:
    """Before: the egress log was plain JSON lines; an edited line read back as if it had been sent."""
    state = tmp_path / "hospital-a"
    entries = _log(state)
    assert read_egress_log(state) == entries  # read back as appended, the MACs stripped
    path = state / EGRESS_LOG_FILE
    good = path.read_text()
    lines = good.splitlines()
    edited = json.loads(lines[1])
    edited["bytes"] = 0  # hide what left
    edited["items"] = []
    lines[1] = json.dumps(edited, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(LedgerError) as info:
        read_egress_log(state)
    message = str(info.value)
    assert str(path) in message and "chain breaks at line 1" in message and "edited" in message
    assert path.read_bytes() == before
    # the last line edited: the next append checks the tail, refuses, and appends nothing
    lines = good.splitlines()
    tail = json.loads(lines[2])
    tail["blocked"] = ["added afterwards"]
    path.write_text("\n".join([*lines[:2], json.dumps(tail, sort_keys=True)]) + "\n")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="chain breaks at line 2"):
        append_egress_log(state, {"run": "7", "round": 9})
    assert path.read_bytes() == before
    path.write_text(good)  # restored: the site logs on
    append_egress_log(state, {"run": "7", "round": 9})
    assert read_egress_log(state) == [*entries, {"run": "7", "round": 9}]


def test_a_truncated_or_deleted_egress_log_is_detected(tmp_path: Path) -> None:
    state = tmp_path / "hospital-a"
    _log(state)
    path = state / EGRESS_LOG_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # the last line removed
    with pytest.raises(LedgerError, match=r"holds 2.*rolled back"):
        read_egress_log(state)
    with pytest.raises(LedgerError, match=r"holds 2.*rolled back"):
        append_egress_log(state, {"run": "7", "round": 9})
    path.unlink()
    with pytest.raises(LedgerError, match=r"records 3 line.*deleted"):
        read_egress_log(state)
    with pytest.raises(LedgerError, match=r"records 3 line.*deleted"):  # never a fresh log
        append_egress_log(state, {"run": "7", "round": 9})
    assert not path.exists()


def test_an_unchained_egress_log_from_before_is_chained_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "hospital-a"
    state.mkdir()
    old = [{"run": "1", "round": r, "bytes": 8} for r in range(2)]
    (state / EGRESS_LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in old))
    assert read_egress_log(state) == old  # readable as it is, before the site's first new line
    with caplog.at_level(logging.WARNING):
        append_egress_log(state, {"run": "2", "round": 1})
    assert any("chained its 2 unchained lines" in r.getMessage() for r in caplog.records)
    assert read_egress_log(state) == [*old, {"run": "2", "round": 1}]
    assert integrity.for_state_dir(state).anchor(integrity.EGRESS_STREAM).count == 3
    (state / EGRESS_LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in old))  # the old copy back
    with pytest.raises(LedgerError, match="chain breaks at line 0"):
        read_egress_log(state)


def test_a_half_written_last_line_is_dropped_not_a_break(tmp_path: Path) -> None:
    """A crash inside the append leaves a line without its newline: it was never sent, never logged."""
    state = tmp_path / "hospital-a"
    entries = _log(state, n=2)
    path = state / EGRESS_LOG_FILE
    with path.open("a") as f:
        f.write('{"run": "7", "round": 2, "sta')
    assert read_egress_log(state) == entries
    append_egress_log(state, {"run": "7", "round": 2})
    assert read_egress_log(state) == [*entries, {"run": "7", "round": 2}]


# ---------------------------------------------------------------------------- the ClientApp, the CLI

MODEL = ModelConfig(image_size=32)


def _train_message(server_round: int) -> Message:
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("task_identity")
def test_a_deleted_ledger_stops_training_at_the_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real ClientApp: round 1 is charged; the ledger is deleted; round 2 trains nothing and
    sends nothing but a generic error, and the ledger is not recreated."""
    from fedshift.client.app import make_client_app

    site_dir = write_site(tmp_path)
    config = site_run_config(tmp_path, num_rounds=3, **{"dp": True, "dp-epsilon": 8.0})
    app = make_client_app()
    first = call_client_app(app, _train_message(1), config)
    assert not first.has_error() and len(PrivacyLedger.at(site_dir).entries) == 1
    (site_dir / LEDGER_FILE).unlink()
    with caplog.at_level(logging.ERROR):
        second = call_client_app(app, _train_message(2), config)
    assert second.has_error() and not second.has_content()
    assert second.error.reason == SITE_ERROR  # no text from the site
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and "it is missing: it was deleted" in r.getMessage()
    ]
    assert logged and str(site_dir / LEDGER_FILE) in logged[0]
    assert not (site_dir / LEDGER_FILE).exists()


def test_cli_verifies_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, _ = _site(tmp_path)
    _log(state, n=2)
    assert main(["ledger", str(state)]) == 0
    out = capsys.readouterr().out
    key = integrity.default_key_path(state)
    assert f"integrity verified with key {key}" in out
    assert "ledger 2 entries chained (anchor 2), egress log 2 lines chained (anchor 2)" in out
    # an edited egress log fails the command with one line naming it
    path = state / EGRESS_LOG_FILE
    path.write_text(path.read_text().replace('"round": 0', '"round": 5'))
    code = main(["ledger", str(state)])
    one_line_error(code, capsys.readouterr().err, str(path), "chain breaks at line 0")
    # a key elsewhere is named with --key
    moved = tmp_path / "keys" / "a.key"
    moved.parent.mkdir()
    key.rename(moved)
    integrity.for_state_dir(state).anchor_path.rename(moved.with_name("a.key.anchor"))
    code = main(["ledger", str(state)])
    one_line_error(code, capsys.readouterr().err, str(key), "missing")
    try:
        code = main(["ledger", str(state), "--key", str(moved)])
        one_line_error(code, capsys.readouterr().err, "chain breaks at line 0")  # the key fits; the log not
    finally:
        integrity._BOUND.pop(state.absolute(), None)
