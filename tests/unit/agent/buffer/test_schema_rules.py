"""The buffer's migrations keep a rolled-back agent able to use the buffer (agent/buffer/schema.py): each
declares its oldest reader, and one that an older schema may read is additive only."""

from __future__ import annotations

import re

import pytest

from agent.buffer.schema import MIGRATIONS, OLDEST_READER, SCHEMA_VERSION

ADDITIVE = (
    re.compile(r"^CREATE TABLE \w+ \(", re.S),
    re.compile(r"^CREATE INDEX \w+ ON \w+ ", re.S),
    re.compile(r"^INSERT INTO meta \(key, value\) VALUES ", re.S),
    # a new column an older writer may leave out: nullable, or NOT NULL with a DEFAULT
    re.compile(r"^ALTER TABLE \w+ ADD COLUMN \w+ \w+(?! .*NOT NULL)( DEFAULT .+)?$", re.S),
    re.compile(r"^ALTER TABLE \w+ ADD COLUMN \w+ \w+ NOT NULL DEFAULT .+$", re.S),
)


def additive(statement: str) -> bool:
    text = " ".join(statement.split())
    return any(p.match(text) for p in ADDITIVE)


def test_every_version_declares_its_oldest_reader() -> None:
    assert set(OLDEST_READER) == set(MIGRATIONS) == set(range(1, SCHEMA_VERSION + 1))
    for version, oldest in OLDEST_READER.items():
        assert 1 <= oldest <= version
        assert oldest >= OLDEST_READER.get(version - 1, 1)  # a later version never reopens to older readers


@pytest.mark.parametrize("version", [v for v in MIGRATIONS if OLDEST_READER[v] < v])
def test_a_migration_older_agents_may_read_is_additive(version: int) -> None:
    for statement in MIGRATIONS[version]:
        assert additive(statement), f"migration {version} is readable from {OLDEST_READER[version]}: {statement}"


@pytest.mark.parametrize(
    ("statement", "ok"),
    [
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)", True),
        ("ALTER TABLE outbox ADD COLUMN origin TEXT", True),
        ("ALTER TABLE outbox ADD COLUMN tries INTEGER NOT NULL DEFAULT 0", True),
        ("ALTER TABLE outbox ADD COLUMN tries INTEGER NOT NULL", False),
        ("ALTER TABLE outbox DROP COLUMN acked_at", False),
        ("ALTER TABLE outbox RENAME TO outbox_old", False),
        ("DROP TABLE ledger", False),
        ("CREATE UNIQUE INDEX x ON outbox (cose)", False),
        ("UPDATE outbox SET priority = 0", False),
    ],
)
def test_the_additive_rule(statement: str, ok: bool) -> None:
    assert additive(statement) is ok
