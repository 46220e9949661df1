"""The agent's side of the driver floor: the CLI maps a driver error to one line and its exit code, and the
config's protocol choices are the driver registry's."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.cli import dispatch
from agent.config import load_config
from agent.errors import ConfigError
from drivers.errors import NoPen, PortError, UnknownProtocol
from drivers.registry import CONFIG_CHOICES, PROTOCOLS


def _raising(exc: Exception) -> argparse.Namespace:
    def func(_: argparse.Namespace) -> int:
        raise exc

    return argparse.Namespace(func=func)


@pytest.mark.parametrize(
    ("exc", "code"),
    [(PortError("cannot open /dev/ttyUSB0: gone"), 20), (NoPen("no pen"), 20), (UnknownProtocol("unknown x"), 10)],
)
def test_a_driver_error_is_one_line_and_its_exit_code(
    exc: Exception, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch(_raising(exc), "glucoagent") == code
    assert capsys.readouterr().err == f"glucoagent: error: {exc}\n"


def test_every_registered_protocol_is_a_config_choice_and_nothing_else(tmp_path: Path) -> None:
    uci = tmp_path / "glucoagent"
    for protocol in CONFIG_CHOICES:
        uci.write_text(f"config meter 'm'\n\toption port '/dev/ttyUSB0'\n\toption protocol '{protocol}'\n")
        assert load_config(uci).ports[0].protocol == protocol
    uci.write_text("config meter 'm'\n\toption port '/dev/ttyUSB0'\n\toption protocol 'freestyle'\n")
    with pytest.raises(ConfigError, match=", ".join(["auto", *PROTOCOLS])):
        load_config(uci)
