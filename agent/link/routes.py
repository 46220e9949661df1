"""Which ways to the broker a box tries, in which order: MQTT/TLS (8883), MQTT over WebSockets/TLS (443),
either through an HTTP proxy.

Falling back from 8883 to 443 is safe because only the framing differs: the same TLS context (the
pinned fleet CA and nothing else, hostname checked, TLS 1.2+), the same client certificate, the same
broker identity check, the same client-id binding and ACLs on the broker. A network that intercepts
443 with its own CA fails the pinned-CA check exactly as on 8883, so fallback never lowers what the
box accepts. It happens only on "cannot reach" failures (refused, unreachable, timed out, a proxy
refusing the port): a TLS or login refusal is the same on either path and is reported, not routed
around. Against flapping: the way that last worked is tried first next time (sticky), so a box on a
443-only network does not pay a connect timeout on 8883 at every reconnect, and a live connection is
never abandoned for the other way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from agent.config import Endpoint, MqttSection, WsEndpoint
from agent.errors import BrokerUnreachable, GlucoagentError, LinkTimeout
from agent.identity.credentials import DeviceIdentity
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles, Will
from agent.link.proxy import ProxyAuthRequired, ProxyError, ProxySettings
from agent.wire.profiles import CloudProfile


def link_routes(
    mqtt: MqttSection, endpoint: Endpoint, base: LinkSettings, proxy: ProxySettings | None
) -> tuple[LinkSettings, ...]:
    """``base`` (host, port, identity, timers) turned into each configured way, in the order to try them."""
    tcp = dataclasses.replace(base, host=endpoint.host, port=endpoint.port, transport="tcp", proxy=proxy)
    if not mqtt.ws_endpoint or mqtt.transport == "tcp":
        return (tcp,)
    ws_ep = WsEndpoint.parse(mqtt.ws_endpoint)
    ws = dataclasses.replace(
        base, host=ws_ep.host, port=ws_ep.port, transport="websockets", ws_path=ws_ep.path, proxy=proxy
    )
    return (ws,) if mqtt.transport == "websockets" else (tcp, ws)


def falls_back(exc: GlucoagentError) -> bool:
    """True when the next way is worth trying after ``exc``: the broker was not reached at all."""
    if isinstance(exc, ProxyAuthRequired):
        return False  # the same credentials would be refused for the other port too
    return isinstance(exc, BrokerUnreachable | LinkTimeout | ProxyError)


def sticky_order(routes: tuple[LinkSettings, ...], last_good: int) -> list[int]:
    """Indexes of ``routes`` to try: the one that last worked first, then the others in their order."""
    return [last_good, *(i for i in range(len(routes)) if i != last_good)]


def connect_first(routes: tuple[LinkSettings, ...], make_link: Callable[[LinkSettings], MqttLink]) -> MqttLink:
    """A connected link over the first way that works, in ``routes``' order, falling back as the uplink
    does (only when the broker was not reached). For one-shot links: provisioning and its confirmation."""
    for i, settings in enumerate(routes):
        link = make_link(settings)
        try:
            link.connect()
        except GlucoagentError as exc:
            if i + 1 < len(routes) and falls_back(exc):
                continue
            raise
        return link
    raise BrokerUnreachable("no way to the broker is configured")


def device_link_settings(
    profile: CloudProfile,
    identity: DeviceIdentity,
    endpoint: Endpoint,
    *,
    protocol: str,
    keepalive: int = 30,
    connect_timeout_s: float = 15.0,
    server_ca: Path | None = None,
) -> LinkSettings:
    """The device's own MQTT login as ``profile`` wants it: client id, user name, protocol, keepalive cap,
    the will where the profile has one. One place for the uplink and provisioning's confirmation.
    ``server_ca``: the broker's trust anchor (``mqtt.server_ca``); None: the fleet CA of the identity."""
    will = profile.will(identity.device_id)
    return LinkSettings(
        host=endpoint.host,
        port=endpoint.port,
        client_id=profile.client_id(identity.device_id),
        tls=TlsFiles(ca=server_ca or identity.ca_path, cert=identity.cert_path, key=identity.key_path),
        protocol=profile.protocol(protocol),
        keepalive=profile.keepalive(keepalive),
        connect_timeout_s=connect_timeout_s,
        will=None if will is None else Will(will.topic, will.payload, retain=will.retain),
        username=profile.username(identity.device_id),
        side_connections=profile.side_connections,
    )
