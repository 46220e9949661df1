"""The driver registry is the one list of protocol names; drivers are the ground floor (no agent, no backend)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.drivers import REPO

from drivers import errors
from drivers.registry import AUTO, CONFIG_CHOICES, METERS, PENS, PROBE_ORDER, PROTOCOLS, driver_module, is_pen


def test_meters_and_the_pen_are_registered_alike() -> None:
    assert set(PROTOCOLS) == {"onetouch-ultra2", "contour-astm", "onetouch-ultraeasy", "novopen"}
    assert set(PROTOCOLS) == set(METERS) | set(PENS) and not set(METERS) & set(PENS)
    assert (AUTO, *PROTOCOLS) == CONFIG_CHOICES
    assert set(PROBE_ORDER) == set(METERS)  # the pen reader is never probed
    for protocol in PROTOCOLS:
        module = driver_module(protocol)
        assert protocol == module.PROTOCOL and callable(module.decode_capture)
    assert [p for p in PROTOCOLS if is_pen(p)] == ["novopen"]


def test_an_unknown_protocol_is_a_driver_error_with_the_config_exit_code() -> None:
    with pytest.raises(errors.UnknownProtocol, match="freestyle") as caught:
        driver_module("freestyle")
    assert isinstance(caught.value, errors.DriverError) and caught.value.exit_code == 10


def test_the_error_root() -> None:
    assert issubclass(errors.NoPen, errors.NoResponse) and issubclass(errors.NoResponse, errors.DriverError)
    for cls in (errors.PortError, errors.InvalidChecksum, errors.MissingChecksum, errors.MeterNotReady):
        assert issubclass(cls, errors.DriverError)
    assert errors.DriverError.exit_code == errors.PortError.exit_code == 20
    assert errors.BadRecordsFile.exit_code == 10
    assert errors.DriverError.__mro__[1] is Exception  # its own root, not the agent's


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # lazy imports inside functions too
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    names.update(
        n.args[0].value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call)
        and getattr(n.func, "attr", getattr(n.func, "id", "")) in ("import_module", "__import__")
        and n.args
        and isinstance(n.args[0], ast.Constant)
        and isinstance(n.args[0].value, str)
    )
    return names


def test_drivers_import_neither_agent_nor_backend() -> None:
    files = sorted((REPO / "drivers").rglob("*.py"))
    assert len(files) > 20
    offending = {
        str(f.relative_to(REPO)): sorted(m for m in _imported_modules(f) if m.split(".")[0] in ("agent", "backend"))
        for f in files
    }
    assert {f: m for f, m in offending.items() if m} == {}


