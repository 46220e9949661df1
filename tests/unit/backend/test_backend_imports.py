"""The reference cloud's layering (issue 13): backend/ imports of agent/ are agent.wire (the message
codecs) and agent.errors (the error root) only, and no installed package imports the test rig."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if node.module == "agent")
    return names


def test_backend_imports_only_the_wire_and_the_error_root_of_agent() -> None:
    allowed = ("agent.wire", "agent.errors")
    bad = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "backend").rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] == "agent" and name != "agent" and not name.startswith(allowed)
    }
    assert bad == set()


def test_no_installed_package_imports_the_test_rig() -> None:
    bad = {
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("agent", "drivers", "backend")
        for path in (ROOT / package).rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] == "testbed"
    }
    assert bad == set()


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from agent.mqtt import MqttLink\nfrom agent import store\nimport testbed.harness\n")
    assert {"agent.mqtt", "agent.store", "testbed.harness"} <= imported_modules(probe)
