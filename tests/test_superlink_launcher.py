"""fedshift.deploy.superlink: Flower's SQL state, opened after the launcher's change, waits longer."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from flwr.supercore import sql_mixin
from sqlalchemy import MetaData, text

from fedshift.deploy import superlink


class _State(sql_mixin.SqlMixin):
    """Flower's SQL base with no tables: the engine and connection set-up the SuperLink's state uses."""

    def get_metadata(self) -> MetaData:
        return MetaData()


def _busy_timeout(db: Path) -> int:
    state = _State(str(db))
    state.initialize()
    with state.session() as session:
        return int(session.execute(text("PRAGMA busy_timeout")).scalar_one())


@pytest.fixture
def restore_pragmas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's pragmas back after the test (the launcher replaces the module attribute)."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)


@pytest.mark.usefixtures("restore_pragmas")
def test_flower_connections_get_the_longer_busy_timeout(tmp_path: Path) -> None:
    flowers = sql_mixin.SQLITE_PRAGMAS
    assert _busy_timeout(tmp_path / "before.db") == 5000  # Flower's own (if this fails, Flower changed it)
    assert superlink.lengthen_busy_timeout()
    assert _busy_timeout(tmp_path / "after.db") == superlink.BUSY_TIMEOUT_MS == 20_000
    # every other pragma is Flower's, in Flower's order
    assert [(k, v) for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"] == [
        (k, v) for k, v in flowers if k != "busy_timeout"
    ]
    assert [k for k, _ in sql_mixin.SQLITE_PRAGMAS] == [k for k, _ in flowers]


@pytest.mark.usefixtures("restore_pragmas")
def test_a_write_waits_out_a_lock_held_longer_than_flowers_five_seconds(tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    superlink.lengthen_busy_timeout()
    state = _State(str(db))
    state.initialize()
    sqlite3.connect(db).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    holding, held_s = threading.Event(), 6.0

    def hold_lock() -> None:  # another writer, as a busy SuperLink thread would be
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holding.set()
        time.sleep(held_s)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    holding.wait(5)
    start = time.monotonic()
    with state.session() as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
    waited = time.monotonic() - start
    holder.join()
    assert 5.0 < waited < superlink.BUSY_TIMEOUT_MS / 1000  # Flower's 5 s would have failed it
    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_an_unknown_flower_is_left_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (("journal_mode", "WAL"),))
    assert not superlink.lengthen_busy_timeout()
    assert sql_mixin.SQLITE_PRAGMAS == (("journal_mode", "WAL"),)
