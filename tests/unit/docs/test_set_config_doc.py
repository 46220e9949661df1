"""docs/commands.md's `set_config` row names exactly the options the code refuses (SETTABLE_KEYS) and
exactly the ones it applies without a restart (HOT_OPTIONS): the doc and the code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

from agent.commands.handlers import HOT_OPTIONS
from agent.config import SCHEMA, SETTABLE_KEYS

DOC = Path(__file__).resolve().parents[3] / "docs" / "commands.md"


def _row() -> str:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `set_config` |")]
    assert len(rows) == 1
    return rows[0]


def _keys(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+\.[a-z_]+)`", text))


def test_the_options_the_cloud_may_not_set_are_the_ones_the_doc_names() -> None:
    part = _row().split("every option except", 1)[1].split(")", 1)[0]
    every = {f"{s}.{o}" for s, opts in SCHEMA.items() for o in opts}
    assert _keys(part) == every - SETTABLE_KEYS


def test_the_options_applied_at_once_are_the_ones_the_doc_names() -> None:
    part = _row().split("Applied at once", 1)[1].split(". ", 1)[0]
    assert _keys(part) == set(HOT_OPTIONS)
    assert HOT_OPTIONS <= SETTABLE_KEYS
