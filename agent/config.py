"""Configuration: one frozen dataclass tree from one ``load_config()``.

Source: a UCI file (``/etc/config/glucoagent`` on the box; any path elsewhere).
Every option has a default, so an empty file is a valid configuration. Errors
name the option and, for files, the line: ``ConfigError("…:12: mqtt.keepalive: expected 5..60, got 0")``.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.wire.profiles import PROFILE_NAMES, CloudProfile, make_profile
from drivers.registry import AUTO, CONFIG_CHOICES, DEFAULT_PEN  # the one list of protocol names

T = TypeVar("T")
N = TypeVar("N", int, float)
_ENDPOINT_RE = re.compile(r"^mqtts://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")
_WS_ENDPOINT_RE = re.compile(
    r"^wss://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})(?P<path>/[A-Za-z0-9._~/$-]*)$"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str = "mqtt.endpoint") -> Endpoint:
        m = _ENDPOINT_RE.match(text.strip())
        if not m:
            raise ConfigError(f"{key}: expected mqtts://HOST:PORT, got {text!r}")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: port must be 1..65535, got {port}")
        return cls(m["host"].strip("[]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtts://{host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class WsEndpoint:
    """MQTT over WebSockets with TLS: ``wss://HOST:PORT/PATH`` (same CA, same client certificate)."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str, key: str = "mqtt.ws_endpoint") -> WsEndpoint:
        m = _WS_ENDPOINT_RE.match(text.strip())
        if not m:
            raise ConfigError(f"{key}: expected wss://HOST:PORT/PATH, got {text!r}")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: port must be 1..65535, got {port}")
        return cls(m["host"].strip("[]"), port, m["path"])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.port}{self.path}"


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSection:
    state_dir: Path = Path("/etc/glucoagent")
    run_dir: str = ""  # RAM (tmpfs) for the status snapshot; empty: <state_dir>/run. The box sets /var/run/glucoagent
    log_level: str = "info"
    log_target: str = "auto"  # auto: syslog when /dev/log exists, else stderr
    key_type: str = "ed25519"
    health_interval_s: int = 300
    port_scan_s: float = 5.0  # pen readers are asked, and ports polled without inotify, this often
    reread_s: int = 900  # re-read a meter still attached after this long
    # System commands run by the cloud's sync_time and reboot commands ({epoch}: integer Unix seconds).
    settime_command: str = "date -u -s @{epoch}"
    reboot_command: str = "reboot"
    renew_before_days: int = 30  # the box asks for a new certificate this long before its certificate expires
    link: str = "always"  # duty: the link comes up for a stored reading or every wake_interval_s, then goes down
    wake_interval_s: float = 3600.0  # duty mode: the longest sleep (the broker keeps commands 7 days, SESSION_EXPIRY_S)


@dataclasses.dataclass(frozen=True, slots=True)
class MqttSection:
    endpoint: str = ""  # empty: the one recorded at provisioning
    protocol: str = "mqttv5"
    keepalive: int = 30
    inflight: int = 4  # unacknowledged upload batches in flight
    batch_records: int = 50
    max_payload: int = 131_072  # AWS IoT Core's limit
    backoff_min_s: float = 1.0
    backoff_cap_s: float = 300.0
    stable_s: float = 60.0  # link up this long resets the backoff
    ack: str = "backend"  # backend (end-to-end) | puback
    ack_timeout_s: float = 30.0
    connect_timeout_s: float = 15.0
    # auto: mqtts first, then ws_endpoint (when set) if the broker cannot be reached; tcp | websockets: only that one
    transport: str = "auto"
    ws_endpoint: str = ""  # wss://HOST:443/mqtt: the same broker over WebSockets with TLS
    proxy: str = ""  # http://[USER@]HOST:PORT: HTTP CONNECT proxy (empty: direct)
    proxy_password_file: str = ""  # empty: <state_dir>/proxy_password (0600); read only when proxy names a user
    # The cloud the box talks to (agent/wire/profiles.py, docs/clouds.md): glucoagent | azure | aws
    profile: str = "glucoagent"
    azure_hub: str = ""  # azure: the IoT hub's host name (the MQTT user name starts with it)
    dps_host: str = "global.azure-devices-provisioning.net"  # azure: the Device Provisioning Service endpoint
    dps_id_scope: str = ""  # azure: the DPS instance's ID scope (0ne…)
    aws_template: str = "GlucoagentFleet"  # aws: the fleet provisioning template's name (docs/clouds.md)
    # The trust anchor the broker's certificate must chain to (PEM; a relative path is under state_dir). Empty:
    # the fleet CA delivered at enrolment (ca.crt). Behind Azure or AWS: the cloud's public root (docs/clouds.md).
    server_ca: str = ""

    def server_ca_path(self, state_dir: Path) -> Path | None:
        """``server_ca`` as a path (None: the fleet CA in the identity). Never fetched at run time."""
        return state_dir / self.server_ca if self.server_ca else None

    def cloud(self) -> CloudProfile:
        """The cloud profile these options select (validated by build_config, so this does not raise there)."""
        return make_profile(self.profile, {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True, slots=True)
class BufferSection:
    path: str = ""  # empty: <state_dir>/buffer.db
    max_records: int = 200_000
    retention_s: int = 7 * 86_400  # delivered records kept for `resend`


@dataclasses.dataclass(frozen=True, slots=True)
class AlertsSection:
    hypo_mgdl: int = 70
    severe_hypo_mgdl: int = 54
    hyper_mgdl: int = 250


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateSection:
    """Self-update (docs/updates.md). The package manager and its database are the box's, never the cloud's to set."""

    package: str = "glucoagent"
    install_command: str = ""  # empty: the box's own (apk on 25.12+, else opkg; agent/update/install.py)
    status_file: str = ""  # empty: /lib/apk/db/installed when it exists, else /usr/lib/opkg/status
    gate_s: int = 300  # the new version must get an end-to-end ack within this, else the watchdog rolls back
    reserve_bytes: int = 1024 * 1024  # kept free in the state directory beyond the package
    chunk_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class DevicePort:
    name: str
    port: str
    protocol: str = "auto"


@dataclasses.dataclass(frozen=True, slots=True)
class BleRadio:
    """``config ble 'NAME'``: a BLE controller (HCI over a UART); a box may have more than one. The devices
    it reads are the ones ``glucoagent pair`` bonded through it, listed in ``<state_dir>/ble-devices.json``
    beside the 0600 key store (docs/ble.md)."""

    name: str
    port: str
    scan_s: float = 30.0  # pause between rounds over the bonded devices
    connect_s: float = 10.0  # how long a round waits for one device to advertise


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    agent: AgentSection = AgentSection()
    mqtt: MqttSection = MqttSection()
    buffer: BufferSection = BufferSection()
    alerts: AlertsSection = AlertsSection()
    update: UpdateSection = UpdateSection()
    ports: tuple[DevicePort, ...] = ()
    insulin: Mapping[str, str] = dataclasses.field(default_factory=dict)  # pen serial -> insulin
    ble: tuple[BleRadio, ...] = ()  # none: the agent never imports the BLE stack
    source: str = "<defaults>"

    @property
    def run_path(self) -> Path:
        return Path(self.agent.run_dir) if self.agent.run_dir else self.agent.state_dir / "run"

    @property
    def buffer_path(self) -> Path:
        return Path(self.buffer.path) if self.buffer.path else self.agent.state_dir / "buffer.db"


def _in_range(kind: Callable[[str], N], noun: str, lo: N, hi: N) -> Callable[[str], N]:
    def conv(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"expected {noun} {lo}..{hi}, got {text!r}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise ValueError(f"expected {lo}..{hi}, got {value}")
        return value

    return conv


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    return _in_range(int, "an integer", lo, hi)


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    return _in_range(float, "a number", lo, hi)


def _choice(*options: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return conv


def _system_command(*placeholders: str) -> Callable[[str], str]:
    """A command line (split like a shell would, never run through one) using each placeholder."""

    def conv(text: str) -> str:
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"not a valid command line: {exc}") from None
        if not argv:
            raise ValueError("expected a command, got nothing")
        for name in placeholders:
            if "{" + name + "}" not in text:
                raise ValueError(f"expected the placeholder {{{name}}} in {text!r}")
        return text

    return conv


def _endpoint(text: str) -> str:
    if text:
        Endpoint.parse(text)
    return text


def _ws_endpoint(text: str) -> str:
    if text:
        try:
            WsEndpoint.parse(text, key="")
        except ConfigError as exc:  # as a ValueError, so the message gets the file, line and option
            raise ValueError(str(exc).removeprefix(": ")) from None
    return text


def _argv(text: str) -> str:
    """A command line split as the update installer splits it (shlex), so a bad one is refused here."""
    shlex.split(text)  # ValueError (e.g. "No closing quotation") names the file, line and option
    return text


def _proxy(text: str) -> str:
    if text:
        from agent.link.proxy import parse_proxy  # its grammar lives beside the tunnel

        try:
            parse_proxy(text, key="")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix(": ")) from None
    return text


# Per section: option -> converter. Unknown options are errors (a typo must not pass silently).
SCHEMA: dict[str, dict[str, Callable[[str], Any]]] = {
    "agent": {
        "state_dir": Path,
        "run_dir": str,
        "log_level": _choice("debug", "info", "warning", "error"),
        "log_target": _choice("auto", "syslog", "stderr"),
        "key_type": _choice("ed25519", "p256"),
        "health_interval_s": _int_range(10, 86_400),
        "port_scan_s": _float_range(0.2, 3600),
        "reread_s": _int_range(10, 86_400),
        "settime_command": _system_command("epoch"),
        "reboot_command": _system_command(),
        "renew_before_days": _int_range(1, 180),
        "link": _choice("always", "duty"),
        "wake_interval_s": _float_range(1, 86_400),  # far below the session expiry (7 days)
    },
    "mqtt": {
        "endpoint": _endpoint,
        "protocol": _choice("mqttv5", "mqttv311"),
        "keepalive": _int_range(5, 60),
        "inflight": _int_range(1, 64),
        "batch_records": _int_range(1, 500),
        "max_payload": _int_range(4096, 268_435_455),
        "backoff_min_s": _float_range(0.05, 60),
        "backoff_cap_s": _float_range(1, 3600),
        "stable_s": _float_range(0, 3600),
        "ack": _choice("backend", "puback"),
        "ack_timeout_s": _float_range(1, 3600),
        "connect_timeout_s": _float_range(1, 300),
        "transport": _choice("auto", "tcp", "websockets"),
        "ws_endpoint": _ws_endpoint,
        "proxy": _proxy,
        "proxy_password_file": str,
        "profile": _choice(*PROFILE_NAMES),
        "azure_hub": str,
        "dps_host": str,
        "dps_id_scope": str,
        "aws_template": str,
        "server_ca": str,
    },
    "buffer": {
        "path": str,
        "max_records": _int_range(10, 10_000_000),
        "retention_s": _int_range(0, 365 * 86_400),
    },
    "alerts": {
        "hypo_mgdl": _int_range(20, 200),
        "severe_hypo_mgdl": _int_range(20, 200),
        "hyper_mgdl": _int_range(100, 600),
    },
    "update": {
        "package": str,
        "install_command": _argv,
        "status_file": str,
        "gate_s": _int_range(30, 86_400),
        "reserve_bytes": _int_range(0, 1 << 30),
        "chunk_timeout_s": _float_range(0.5, 600),
    },
}
# Not settable by the cloud: where the state lives, and the system commands (that would be remote code execution).
SETTABLE_KEYS = frozenset(f"{s}.{o}" for s, opts in SCHEMA.items() for o in opts) - {
    "agent.state_dir",
    "agent.run_dir",
    "buffer.path",
    "agent.settime_command",
    "agent.reboot_command",
    # Where the box connects through is the technician's: a cloud that could redirect it could also cut it off.
    "mqtt.proxy",
    "mqtt.proxy_password_file",
    "update.package",
    "update.install_command",
    "update.status_file",
}


def _section(cls: type[T], name: str, options: Mapping[str, str], where: Callable[[str], str]) -> T:
    schema = SCHEMA[name]
    values: dict[str, Any] = {}
    for option, text in options.items():
        conv = schema.get(option)
        if conv is None:
            raise ConfigError(f"{where(option)}{name}.{option}: unknown option")
        try:
            values[option] = conv(text)
        except ValueError as exc:
            raise ConfigError(f"{where(option)}{name}.{option}: {exc}") from None
    return cls(**values)


def build_config(sections: list[Any], source: str) -> Config:
    """Config from parsed UCI sections (agent.uci.UciSection)."""
    parts: dict[str, Any] = {}
    ports: list[DevicePort] = []
    insulin: dict[str, str] = {}
    ble: list[BleRadio] = []
    classes = {"agent": AgentSection, "mqtt": MqttSection, "buffer": BufferSection, "alerts": AlertsSection, "update": UpdateSection}
    for sec in sections:

        def where(option: str, sec: Any = sec) -> str:
            line = sec.option_lines.get(option, sec.line)
            return f"{source}:{line}: "

        if sec.type in classes:
            if sec.type in parts:
                raise ConfigError(f"{source}:{sec.line}: section '{sec.type}' given twice")
            parts[sec.type] = _section(classes[sec.type], sec.type, sec.options, where)
        elif sec.type in ("meter", "pen"):
            name = sec.name or f"{sec.type}{len(ports) + 1}"
            port = sec.options.get("port", "")
            if not port:
                raise ConfigError(f"{where('port')}{sec.type}[{name}].port: required")
            default = AUTO if sec.type == "meter" else DEFAULT_PEN
            protocol = sec.options.get("protocol", default)
            if protocol not in CONFIG_CHOICES:
                raise ConfigError(
                    f"{where('protocol')}{sec.type}[{name}].protocol: expected one of "
                    f"{', '.join(CONFIG_CHOICES)}, got {protocol!r}"
                )
            extra = set(sec.options) - {"port", "protocol"}
            if extra:
                raise ConfigError(f"{where(sorted(extra)[0])}{sec.type}[{name}].{sorted(extra)[0]}: unknown option")
            ports.append(DevicePort(name=name, port=port, protocol=protocol))
        elif sec.type == "ble":
            ble.append(_ble_radio(sec, where))  # uci merges sections of the same name: names are unique here
        elif sec.type == "insulin":
            serial, kind = sec.options.get("pen_serial", ""), sec.options.get("insulin", "")
            if not serial or not kind:
                raise ConfigError(f"{source}:{sec.line}: insulin section needs pen_serial and insulin")
            insulin[serial] = kind
        else:
            raise ConfigError(f"{source}:{sec.line}: unknown section type '{sec.type}'")
    cfg = Config(**parts, ports=tuple(ports), insulin=insulin, ble=tuple(ble), source=source)
    if cfg.alerts.severe_hypo_mgdl > cfg.alerts.hypo_mgdl:
        raise ConfigError(f"{source}: alerts.severe_hypo_mgdl must not exceed alerts.hypo_mgdl")
    if cfg.mqtt.backoff_min_s > cfg.mqtt.backoff_cap_s:
        raise ConfigError(f"{source}: mqtt.backoff_min_s must not exceed mqtt.backoff_cap_s")
    if cfg.mqtt.ack == "puback" and cfg.mqtt.protocol != "mqttv5":
        # MQTT 3.1.1 PUBACKs a publish the broker's ACL dropped: taking it as delivery would lose data.
        raise ConfigError(f"{source}: mqtt.ack 'puback' needs mqtt.protocol 'mqttv5'")
    if cfg.mqtt.transport == "websockets" and not cfg.mqtt.ws_endpoint:
        raise ConfigError(f"{source}: mqtt.transport 'websockets' needs mqtt.ws_endpoint wss://HOST:PORT/PATH")
    try:
        cfg.mqtt.cloud()
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


_BLE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "port": str,
    "scan_s": _float_range(1, 86_400),
    "connect_s": _float_range(1, 300),
}


def _ble_radio(sec: Any, where: Callable[[str], str]) -> BleRadio:
    name = sec.name or "ble"
    values: dict[str, Any] = {}
    for option, text in sec.options.items():
        conv = _BLE_OPTIONS.get(option)
        if conv is None or not isinstance(text, str):
            raise ConfigError(f"{where(option)}ble[{name}].{option}: unknown option")
        try:
            values[option] = conv(text)
        except ValueError as exc:
            raise ConfigError(f"{where(option)}ble[{name}].{option}: {exc}") from None
    if not values.get("port"):
        raise ConfigError(f"{where('port')}ble[{name}].port: required")
    return BleRadio(name=name, **values)


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    from agent.uci import parse_uci  # the UCI grammar lives in its own module

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from None
    return build_config(parse_uci(text, source=str(path)), str(path))


def with_state_dir(cfg: Config, state_dir: Path) -> Config:
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, state_dir=state_dir))
