"""agent.wire is the contract both sides share: it imports only the error root, itself, cbor2 and cryptography."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

WIRE = Path(__file__).resolve().parents[3] / "agent" / "wire"
ALLOWED_THIRD_PARTY = {"cbor2", "cryptography"}
ALLOWED_OWN = ("agent.errors", "agent.wire")
NO_IO = {"logging", "os", "socket", "subprocess", "threading", "time", "pathlib", "sqlite3"}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] if node.module != "agent" else [f"agent.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("path", sorted(WIRE.glob("*.py")), ids=lambda p: p.name)
def test_imports(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "agent":
            assert name.startswith(ALLOWED_OWN), f"{path.name} imports {name}"
        else:
            assert top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names, f"{path.name} imports {name}"
            assert top not in NO_IO, f"{path.name} imports {name}: the codecs do no I/O and no logging"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from agent import store\nimport logging\n")
    assert _imports(bad) == ["agent.store", "logging"]
