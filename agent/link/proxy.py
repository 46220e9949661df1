"""An HTTP ``CONNECT`` tunnel of our own, so MQTT (TCP or WebSockets) crosses an HTTP proxy.

Why not paho's ``proxy_set``: it needs PySocks (one more dependency on the box, and without it
``proxy_set`` raises while the ``mqtt_proxy`` environment variable is silently ignored), and it gives
a 407 or a 403 back as a bare socket error. This module is a request builder and a response parser
(pure, unit-tested) and one function that opens the TCP socket through the proxy; TLS then runs
end to end inside the tunnel, so the proxy sees neither the client certificate nor the data, and a
proxy that intercepts TLS fails the pinned fleet CA check like any other stranger.

The proxy password is a secret like the device key: it comes from a 0600 file, is held in a field
that ``repr`` leaves out, and is never logged; messages name the proxy by ``user@host:port`` only.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import re
import socket
import stat
from pathlib import Path

from agent.errors import BrokerUnreachable, ConfigError, DnsError, LinkError, LinkTimeout

_PROXY_RE = re.compile(r"^http://(?:(?P<user>[^@:/\s]+)@)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})/?$")
DEFAULT_PASSWORD_FILE = "proxy_password"  # noqa: S105  # a file name in the state directory (0600), not a password
MAX_RESPONSE_HEAD = 16_384  # a CONNECT answer is a status line and a few headers


class ProxyError(LinkError):
    """The proxy answered the CONNECT with something other than 200."""

    exit_code = 47


class ProxyAuthRequired(ProxyError):
    """407 (or 401): the proxy wants credentials (none configured, or wrong ones)."""

    exit_code = 48


@dataclasses.dataclass(frozen=True, slots=True)
class ProxySettings:
    host: str
    port: int
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)  # secret: never in repr, logs or status

    def __str__(self) -> str:
        """How the proxy is named in messages and status: without the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{self.user + '@' if self.user else ''}{host}:{self.port}"


def parse_proxy(text: str, key: str = "mqtt.proxy") -> ProxySettings:
    """``http://[user@]host:port`` (the password is never in this string: see ``read_password``)."""
    m = _PROXY_RE.match(text.strip())
    if not m:
        raise ConfigError(f"{key}: expected http://[USER@]HOST:PORT (password in mqtt.proxy_password_file), got {text!r}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: port must be 1..65535, got {port}")
    return ProxySettings(m["host"].strip("[]"), port, m["user"] or "")


def read_password(path: Path) -> str:
    """The proxy password from a file only its owner may read (like the device key)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"mqtt.proxy_password_file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"mqtt.proxy_password_file: cannot read {path}: {exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"mqtt.proxy_password_file: {path} is readable by others: chmod 600 it")
    return text.rstrip("\r\n")


def connect_request(host: str, port: int, proxy: ProxySettings) -> bytes:
    """The CONNECT request for ``host:port`` (Basic credentials when a user is configured)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.user:
        token = base64.b64encode(f"{proxy.user}:{proxy.password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_connect_response(head: bytes) -> tuple[int, str]:
    """(status, reason) of the proxy's answer head (up to the blank line)."""
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProxyError(f"the proxy did not answer in HTTP: {first[:80]!r}")
    return int(parts[1]), parts[2].strip() if len(parts) > 2 else ""


def check_status(status: int, reason: str, proxy: ProxySettings, target: str) -> None:
    """One place that turns the proxy's answer into a line a technician can act on."""
    if 200 <= status < 300:
        return
    if status in (401, 407):  # 407 is the standard answer; tinyproxy 1.11 says 401 to wrong credentials
        what = "the configured user or password was refused" if proxy.user else "none are configured"
        raise ProxyAuthRequired(
            f"proxy {proxy} asks for credentials ({status} {reason}): {what}; set mqtt.proxy http://USER@HOST:PORT "
            "and the password in mqtt.proxy_password_file"
        )
    raise ProxyError(f"proxy {proxy} refused the tunnel to {target} ({status} {reason}): ask for CONNECT to that port")


def _read_head(sock: socket.socket) -> bytes:
    """Bytes up to and including the blank line, read one at a time so none of the TLS stream is consumed."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise BrokerUnreachable("the proxy closed the connection before answering CONNECT")
        head += chunk
        if len(head) > MAX_RESPONSE_HEAD:
            raise ProxyError("the proxy's answer to CONNECT is too long")
    return bytes(head)


def open_tunnel(proxy: ProxySettings, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket to ``host:port`` through ``proxy``, ready for TLS. Raises a LinkError subclass."""
    target = f"{host}:{port}"
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except socket.gaierror as exc:
        raise DnsError(f"cannot resolve the proxy {proxy.host}: {exc.strerror or exc}") from exc
    except TimeoutError as exc:
        raise LinkTimeout(f"timed out connecting to the proxy {proxy}") from exc
    except OSError as exc:
        why = "refused the connection" if exc.errno == errno.ECONNREFUSED else f"unreachable: {exc.strerror or exc}"
        raise BrokerUnreachable(f"proxy {proxy} {why}") from exc
    try:
        sock.sendall(connect_request(host, port, proxy))
        status, reason = parse_connect_response(_read_head(sock))
        check_status(status, reason, proxy, target)
    except TimeoutError as exc:
        sock.close()
        raise LinkTimeout(f"the proxy {proxy} did not answer CONNECT within {timeout:g}s") from exc
    except OSError as exc:
        sock.close()
        raise BrokerUnreachable(f"the proxy {proxy} dropped the connection during CONNECT: {exc}") from exc
    except LinkError:
        sock.close()
        raise
    return sock


def proxy_from_config(url: str, password_file: str, state_dir: Path) -> ProxySettings | None:
    """The configured proxy with its password (None: connect directly)."""
    if not url:
        return None
    proxy = parse_proxy(url)
    if not proxy.user:
        return proxy
    path = Path(password_file) if password_file else state_dir / DEFAULT_PASSWORD_FILE
    return dataclasses.replace(proxy, password=read_password(path))

