"""The cloud's own MQTT client on paho 2.x: mutual TLS pinned to the fleet CA with the broker's host
name checked (``tls_client``), and ``BackendLink``, the connection the service and the command client use.

Not ``agent.mqtt`` on purpose: the layering lets the cloud import only ``agent.wire`` and the error root,
so the box's link (its backoff, manual acks, packet-size guard) can change without changing the cloud."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from backend.pki import ClientCreds


def tls_context(creds: ClientCreds) -> ssl.SSLContext:
    """Client TLS: TLS 1.2 or newer, only the fleet CA trusted, host name checked, our certificate offered."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(creds.ca))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


def tls_client(
    creds: ClientCreds, client_id: str, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
) -> mqtt.Client:
    """A paho 2.x client set up for the fleet broker's mutual TLS (not connected yet)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
    )
    client.tls_set_context(tls_context(creds))
    return client
