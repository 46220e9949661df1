"""docs/architecture.md names every module once, and only modules that exist."""

from __future__ import annotations

import collections
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("agent", "drivers", "backend", "testbed", "openwrt", "bench")
ROW = re.compile(r"^\| `([^`]+)` \|")


def module_rows(doc: str) -> list[str]:
    """The module column of every table in the doc's "Modules" section, in order."""
    section = doc.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for line in section.splitlines() if (m := ROW.match(line))]


def modules(root: Path) -> set[str]:
    """Every Python module of the documented packages; a package's ``__init__.py`` has no row of its own."""
    return {
        p.relative_to(root).as_posix()
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def problems(rows: list[str], root: Path) -> list[str]:
    out = [f"row for {path} twice" for path, n in collections.Counter(rows).items() if n > 1]
    out += [f"row for {path}, which does not exist" for path in rows if not (root / path).is_file()]
    out += [f"no row for {path}" for path in sorted(modules(root) - set(rows))]
    return out


def test_every_module_has_exactly_one_row_and_every_row_exists() -> None:
    rows = module_rows((REPO / "docs" / "architecture.md").read_text())
    assert problems(rows, REPO) == []
    assert len(rows) >= len(modules(REPO))


def test_the_check_finds_a_missing_a_doubled_and_a_stale_row(tmp_path: Path) -> None:
    for name in ("agent/a.py", "agent/b.py", "agent/__init__.py", "bench/c.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    doc = (
        "# x\n\n## Modules\n\n| module | one line |\n| --- | --- |\n"
        "| `agent/a.py` | a |\n| `agent/a.py` | a again |\n| `agent/gone.py` | renamed |\n"
        "\n## Next\n\n| `bench/c.py` | outside the section |\n"
    )
    assert module_rows(doc) == ["agent/a.py", "agent/a.py", "agent/gone.py"]
    assert problems(module_rows(doc), tmp_path) == [
        "row for agent/a.py twice",
        "row for agent/gone.py, which does not exist",
        "no row for agent/b.py",
        "no row for bench/c.py",
    ]
