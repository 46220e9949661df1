"""A buffer migrated by a newer agent, opened by this one after a rollback (real SQLite files): used as it
is when the newer migrations are additive (their declared oldest reader is this schema or older), refused
with a clear error otherwise; rows the newer agent stored are read, acknowledged once, and numbered on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.buffer import store as store_mod
from agent.buffer.intake import Intake
from agent.buffer.schema import MIGRATIONS, OLDEST_READER, SCHEMA_VERSION
from agent.buffer.store import CLINICAL, PRIO_RECORD, Store
from agent.errors import StoreError

NEWER = SCHEMA_VERSION + 1
ADDITIVE = ("ALTER TABLE outbox ADD COLUMN origin TEXT", "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")


def rec(key: str) -> Intake:
    return Intake("reading", PRIO_RECORD, lambda seq: f"reading:{key}:{seq}".encode(), key)


def newer_agent(monkeypatch: pytest.MonkeyPatch, oldest_reader: int) -> None:
    monkeypatch.setattr(store_mod, "MIGRATIONS", {**MIGRATIONS, NEWER: ADDITIVE})
    monkeypatch.setattr(store_mod, "OLDEST_READER", {**OLDEST_READER, NEWER: oldest_reader})
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", NEWER)


def test_an_additive_newer_buffer_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.db"
    old = Store(path, max_records=100)
    assert old.accept([rec("a"), rec("b")], source="m") == [1, 2]
    old.close()
    with monkeypatch.context() as m:  # the new version migrates and stores more
        newer_agent(m, oldest_reader=SCHEMA_VERSION)
        new = Store(path, max_records=100)
        assert new.accept([rec("c"), rec("d")], source="m") == [3, 4]
        new.close()
    # rolled back: this agent's schema again
    back = Store(path, max_records=100)
    try:
        assert [r.seq for r in back.pending(10)] == [1, 2, 3, 4]
        assert back.accept([rec("a"), rec("d"), rec("e")], source="m") == [5]  # the ledger the newer one kept
        assert back.ack(CLINICAL, [1, 2, 3, 4, 5]) == 5
        assert back.pending(10) == []
    finally:
        back.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == NEWER  # never lowered: a re-update skips it
        assert db.execute("SELECT value FROM meta WHERE key = 'oldest_reader'").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_newer_buffer_older_agents_cannot_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.db"
    with monkeypatch.context() as m:
        newer_agent(m, oldest_reader=NEWER)
        Store(path, max_records=100).close()
    with pytest.raises(StoreError, match=rf"newer than this agent \({SCHEMA_VERSION}\).*at least schema {NEWER}"):
        Store(path, max_records=100)
