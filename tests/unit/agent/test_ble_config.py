"""`config ble 'NAME'`: the controller section, read by agent/uci.py as the real uci writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import BleRadio, load_config
from agent.errors import ConfigError


def _cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "glucoagent"
    path.write_text(text)
    return path


def test_no_ble_section_means_no_ble(tmp_path: Path) -> None:
    assert load_config(_cfg(tmp_path, "config agent 'agent'\n\toption log_level 'info'\n")).ble == ()


def test_ble_sections_as_uci_writes_them(tmp_path: Path) -> None:
    text = (
        "config ble 'radio'\n\toption port '/dev/ttyACM0'\n\n"
        "config ble 'cuffs'\n\toption port '/dev/ttyACM1'\n\toption scan_s '60'\n\toption connect_s '5'\n"
    )
    assert load_config(_cfg(tmp_path, text)).ble == (
        BleRadio("radio", "/dev/ttyACM0"),
        BleRadio("cuffs", "/dev/ttyACM1", scan_s=60.0, connect_s=5.0),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config ble 'r'\n\toption scan_s '5'\n", ":1: ble[r].port: required"),
        ("config ble 'r'\n\toption port '/dev/x'\n\toption passkey '123456'\n", ":3: ble[r].passkey: unknown option"),
        ("config ble 'r'\n\toption port '/dev/x'\n\toption scan_s '0'\n", ":3: ble[r].scan_s: expected 1..86400"),
    ],
)
def test_ble_section_errors_name_file_line_and_option(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(_cfg(tmp_path, text))


def test_a_section_named_twice_is_one_section_as_uci_merges_it(tmp_path: Path) -> None:
    text = "config ble 'r'\n\toption port 'a'\nconfig ble 'r'\n\toption port 'b'\n"
    assert load_config(_cfg(tmp_path, text)).ble == (BleRadio("r", "b"),)
