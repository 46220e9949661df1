"""The technician's `glucoagent check` of the way to the broker: per configured way (agent/link/routes.py)
one line for reaching it (directly or through the proxy), one for the TLS handshake, one for the MQTT
login, each naming the way (``mqtts://…`` or ``wss://…``, ``via proxy http://user@host:port``, never
the password). A way that fails while another one works is a warning, not a failure: the box uses the
other way."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

from agent.errors import GlucoagentError
from agent.link.mqtt import LinkSettings, MqttLink, classify_connect_error, pinned_context
from agent.link.proxy import open_tunnel
from agent.link.routes import falls_back

Report = Callable[[str, bool, str, int], None]


def _reach_and_handshake(settings: LinkSettings, timeout: float) -> str:
    """Open the way and complete a TLS handshake; returns the TLS version. Raises a GlucoagentError."""
    try:
        if settings.proxy is not None:
            sock = open_tunnel(settings.proxy, settings.host, settings.port, timeout)
        else:
            sock = socket.create_connection((settings.host, settings.port), timeout=timeout)
    except OSError as exc:
        raise classify_connect_error(exc, settings.host, settings.port) from exc
    try:
        ctx = pinned_context(settings.tls.ca)  # the pinned trust anchor only
        ctx.load_cert_chain(str(settings.tls.cert), str(settings.tls.key))
        with ctx.wrap_socket(sock, server_hostname=settings.host) as tls:
            return str(tls.version())
    except (OSError, ssl.SSLError) as exc:
        raise classify_connect_error(exc, settings.host, settings.port) from exc
    finally:
        sock.close()


def check_routes(
    routes: tuple[LinkSettings, ...], timeout: float, report: Report, warn: Callable[[str], None], *, login: bool = True
) -> bool:
    """Check each way until one logs in; True when one did. Failures go to ``report`` (with their exit
    code) only when no way works; ways that failed before a working one go to ``warn``. ``login`` False
    (a cloud with one connection per device): the TLS handshake is the last step checked."""
    failed: list[tuple[LinkSettings, str, GlucoagentError]] = []
    for settings in routes:
        way = settings.describe()
        try:
            version = _reach_and_handshake(settings, timeout)
        except GlucoagentError as exc:
            failed.append((settings, "broker", exc))
            if falls_back(exc):
                continue
            break
        report("broker reachable", True, way, 0)
        report("TLS handshake", True, f"{version}, broker certificate signed by the pinned fleet CA", 0)
        if login:
            link = MqttLink(settings)
            try:
                link.connect()
            except GlucoagentError as exc:
                report("MQTT login", False, f"{exc}; tried {way}", exc.exit_code)
                return False
            finally:
                link.disconnect()
            report("MQTT login", True, f"as {settings.client_id.removesuffix('-check')} over {way}", 0)
        else:
            why = "this cloud allows one connection per device; a check login would drop the agent's"
            report("MQTT login", True, f"not tried over {way}: {why} (`glucoagent status` shows its link)", 0)
        for other, _what, error in failed:
            warn(f"{other.describe()} did not work ({error}); the box uses {way}")
        return True
    for other, what, error in failed:
        report(what, False, f"{error}; tried {other.describe()}", error.exit_code)
    return False
