"""Configuration: every error names the file, line and option; bad combinations are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "glucoagent"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.mqtt.keepalive, cfg.buffer.max_records, cfg.alerts.hypo_mgdl) == (30, 200_000, 70)


def test_values_are_read_and_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "config mqtt 'mqtt'\n\toption keepalive '45'\nconfig meter 'm'\n\toption port '/dev/ttyUSB0'\n"))
    assert cfg.mqtt.keepalive == 45
    assert [(p.name, p.port, p.protocol) for p in cfg.ports] == [("m", "/dev/ttyUSB0", "auto")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config mqtt 'mqtt'\n\toption keepalive '0'\n", r"glucoagent:2: mqtt\.keepalive: expected 5\.\.60, got 0"),
        ("config mqtt 'mqtt'\n\toption keepalive 'soon'\n", r":2: mqtt\.keepalive: expected an integer 5\.\.60, got 'soon'"),
        ("config mqtt 'mqtt'\n\toption kepalive '30'\n", r":2: mqtt\.kepalive: unknown option"),
        ("config meter 'm'\n\toption protocol 'auto'\n", r"meter\[m\]\.port: required"),
        ("config meter 'm'\n\toption port '/dev/x'\n\toption protocol 'dexcom'\n", r":3: meter\[m\]\.protocol: expected one of"),
        ("config mqtt 'mqtt'\n\toption endpoint 'http://x:1'\n", r"mqtt\.endpoint: expected mqtts://HOST:PORT"),
        ("config alerts 'alerts'\n\toption hypo_mgdl '60'\n\toption severe_hypo_mgdl '65'\n", r"severe_hypo_mgdl must not exceed"),
        ("config mqtt 'mqtt'\n\toption ack 'puback'\n\toption protocol 'mqttv311'\n", r"mqtt\.ack 'puback' needs mqtt\.protocol 'mqttv5'"),
        ("config gadget 'g'\n", r":1: unknown section type 'gadget'"),
        # the daemon splits it into argv at start: unparsable, it crashed there with a traceback, again and again
        ("config update 'update'\n\toption install_command \"opkg 'install\"\n", r":2: update\.install_command: "),
    ],
)
def test_errors_name_the_line_and_option(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent")
