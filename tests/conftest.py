"""Shared fixtures: a generated fleet PKI, a real mosquitto with mutual TLS, device credentials.

- ``pki``: session-wide ``FleetPki`` in a temp dir (fleet CA, server, claim, backend).
- ``broker``: one mosquitto for the whole session. Do not revoke, restart or kill it:
  take ``fresh_broker()`` for that.
- ``fresh_broker(**kwargs)``: a new mosquitto (own run dir and persistence) per call,
  stopped at the end of the test.
- ``device_creds(device_id, key_type="ed25519")``: device key + CSR signed by the CA,
  as ``ClientCreds``.
- ``mqtt_probe(creds, ...)``: a synchronous paho client (connect / subscribe / publish /
  wait for messages, each with a timeout) closed at the end of the test.
  Its default client id is one the broker accepts for ``creds`` (``client_id_for``: the
  device id, ``claim-…``, ``backend-…``): the broker binds client ids to certificates.
- ``vectors_dir``: conformance vectors (env GLUCOAGENT_VECTORS, else ../shared/vectors).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from support.probe import MqttProbe

from backend.broker import Broker
from backend.pki import ClientCreds, FleetPki, KeyType, generate_key, make_csr

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 5.0


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    path = Path(os.environ.get("GLUCOAGENT_VECTORS") or REPO.parent / "shared" / "vectors")
    if not path.is_dir():
        pytest.skip("conformance vectors absent")
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return FleetPki.create(tmp_path_factory.mktemp("pki") / "fleet")


@pytest.fixture(scope="session")
def broker(pki: FleetPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(pki, tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def fresh_broker(pki: FleetPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def make(**kwargs: Any) -> Broker:
        b = Broker(kwargs.pop("pki", pki), tmp_path_factory.mktemp("fresh-broker"), **kwargs)
        started.append(b)
        b.start()
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def device_creds(pki: FleetPki) -> Callable[..., ClientCreds]:
    def make(device_id: str, key_type: KeyType = "ed25519", days: int = 365) -> ClientCreds:
        key = generate_key(key_type)
        cert_pem = pki.sign_device_csr(make_csr(key), device_id, days)
        return pki.write_device_creds(device_id, key, cert_pem)

    return make






@pytest.fixture
def mqtt_probe(broker: Broker) -> Iterator[Callable[..., MqttProbe]]:
    """``mqtt_probe(creds, client_id="", protocol=MQTTv5, broker=None, tls=None)``: not yet connected."""
    probes: list[MqttProbe] = []

    def make(
        creds: ClientCreds | None,
        client_id: str = "",
        protocol: int = mqtt.MQTTv5,
        broker: Broker = broker,
        tls: ssl.SSLContext | None = None,
    ) -> MqttProbe:
        p = MqttProbe(creds, broker.host, broker.port, client_id, protocol, tls)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()
