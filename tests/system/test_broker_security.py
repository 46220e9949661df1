"""Broker security with the real mosquitto, real TLS and real paho clients (docs/security.md).

Nothing here sleeps to "let things settle". To prove that a message was *not* delivered,
a test sends a sentinel on a topic the receiver may read, after the forbidden one, and
checks that the sentinel is the first thing to arrive (mosquitto keeps the order of one
publisher's messages, and a forbidden publish is refused before its PUBACK is sent).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.wire import topics
from backend.broker import Broker
from backend.broker_config import render_acl
from backend.mqtt_client import tls_context
from backend.pki import FleetPki, PkiError, generate_key, make_csr
from testbed.client_certs import issue_client_cert
from testbed.rogue_ca import RogueCa

NOT_AUTHORIZED = 0x87
Probe = Any  # conftest.MqttProbe
ProbeFactory = Callable[..., Probe]
CredsFactory = Callable[..., Any]


def _uid(prefix: str = "gd") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def backend_sub(mqtt_probe: ProbeFactory, pki: FleetPki) -> Probe:
    """The backend identity, subscribed to the whole fleet tree (live messages only, not retained ones)."""
    probe = mqtt_probe(pki.backend)
    assert probe.connect()
    assert not probe.subscribe(f"{topics.PREFIX}/#", no_retained=True)[0].is_failure
    return probe


@pytest.fixture
def marker() -> bytes:
    """Unique bytes carried by every forbidden message of one test, so other traffic cannot confuse it."""
    return b"forbidden-" + uuid.uuid4().hex.encode()


def _nothing_before_sentinel(receiver: Probe, sender: Probe, topic: str, marker: bytes) -> None:
    """``sender`` publishes a sentinel on ``topic``; nothing carrying ``marker`` reached ``receiver`` before it."""
    payload = b"sentinel-" + uuid.uuid4().bytes
    assert not sender.publish(topic, payload).is_failure
    leaked = [(m.topic, m.payload) for m in receiver.messages_until(topic, payload) if marker in m.payload]
    assert leaked == []


# --- a device on its own topics -----------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
def test_device_publishes_and_reads_its_own_topics(
    key_type: str, device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend_sub: Probe
) -> None:
    dev_id = _uid()
    t = topics.DeviceTopics(dev_id)
    device = mqtt_probe(device_creds(dev_id, key_type), client_id=dev_id)
    assert device.connect()
    for topic in (t.telemetry, t.status, t.health, t.results):
        assert not device.publish(topic, topic.encode()).is_failure
        assert backend_sub.next_message_on(topic).payload == topic.encode()
    for topic in (t.acks, t.commands):
        assert [c.value for c in device.subscribe(topic)] == [1]
        assert not backend_sub.publish(topic, b"for " + topic.encode()).is_failure
        assert device.next_message_on(topic).payload == b"for " + topic.encode()
    for topic in (t.acks, t.commands):  # the cloud's side of the device tree: read-only for the device
        assert device.publish(topic, b"self-made").value == NOT_AUTHORIZED, topic


def test_ed25519_device_negotiates_tls13_and_tls12(broker: Broker, device_creds: CredsFactory) -> None:
    """The device key is Ed25519 by default: both TLS versions the listener allows must take it."""
    dev_id = _uid()
    creds = device_creds(dev_id)
    cid = dev_id.encode()
    # MQTT 3.1.1 CONNECT, clean session, keepalive 60, client id = the certificate's CN (the broker binds them)
    connect = bytes([0x10, 12 + len(cid)]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = tls_context(creds)
        ctx.minimum_version = ctx.maximum_version = version
        with (
            socket.create_connection((broker.host, broker.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(connect)
            assert tls.recv(4) == b"\x20\x02\x00\x00", version  # CONNACK accepted: the broker took our certificate
            assert tls.version() == version.name.replace("_", ".")


# --- a device on someone else's topics ----------------------------------------------------------
def test_device_cannot_publish_on_another_devices_topics(
    device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend_sub: Probe, marker: bytes
) -> None:
    attacker_id, victim_id = _uid(), _uid()
    attacker = mqtt_probe(device_creds(attacker_id))
    assert attacker.connect()
    victim = topics.DeviceTopics(victim_id)
    for topic in (victim.telemetry, victim.status, victim.health, victim.results, victim.acks, victim.commands):
        rc = attacker.publish(topic, marker)
        assert rc.value == NOT_AUTHORIZED, (topic, rc)  # MQTT 5: mosquitto says so in the PUBACK
    assert attacker.disconnected is None  # refused, not disconnected: the device keeps its link
    _nothing_before_sentinel(backend_sub, attacker, topics.DeviceTopics(attacker_id).telemetry, marker)


def test_device_cannot_publish_on_another_devices_topics_mqtt311(
    device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend_sub: Probe, marker: bytes
) -> None:
    """MQTT 3.1.1 has no reason code in PUBACK: the refusal is silent, the message still never arrives."""
    attacker_id = _uid()
    attacker = mqtt_probe(device_creds(attacker_id), protocol=mqtt.MQTTv311)
    assert attacker.connect()
    attacker.publish(topics.DeviceTopics(_uid()).telemetry, marker)
    _nothing_before_sentinel(backend_sub, attacker, topics.DeviceTopics(attacker_id).telemetry, marker)


def test_device_cannot_read_another_devices_topics(
    device_creds: CredsFactory, mqtt_probe: ProbeFactory, backend_sub: Probe, marker: bytes
) -> None:
    """mosquitto's acl_file grants every SUBSCRIBE and checks ``read`` per message at delivery.

    So the SUBACK is not the proof (it is "granted" on mosquitto 2.0; a stricter broker
    may refuse it); the proof is that no message of the victim reaches the attacker, not even
    a retained one, and not through a wildcard.
    """
    attacker_id, victim_id = _uid(), _uid()
    victim_t, attacker_t = topics.DeviceTopics(victim_id), topics.DeviceTopics(attacker_id)
    victim = mqtt_probe(device_creds(victim_id))
    assert victim.connect()
    assert not victim.publish(victim_t.status, marker + b" online", retain=True).is_failure
    assert not backend_sub.publish(victim_t.commands, marker + b" retained command", retain=True).is_failure

    attacker = mqtt_probe(device_creds(attacker_id))
    assert attacker.connect()
    forbidden = [
        victim_t.acks,
        victim_t.commands,
        victim_t.status,
        victim_t.telemetry,
        f"{topics.PREFIX}/dev/+/commands",
        f"{topics.PREFIX}/dev/{victim_id}/#",
        f"{topics.PREFIX}/#",
        "#",
        attacker_t.telemetry,  # a device may not read even its own uplink topics
    ]
    for topic in forbidden:
        codes = attacker.subscribe(topic)
        assert len(codes) == 1
    assert [c.value for c in attacker.subscribe(attacker_t.acks)] == [1]
    assert not backend_sub.publish(victim_t.acks, marker + b" ack").is_failure
    assert not backend_sub.publish(victim_t.commands, marker + b" command").is_failure
    assert not victim.publish(victim_t.telemetry, marker + b" reading").is_failure
    assert not attacker.publish(attacker_t.telemetry, marker + b" own reading").is_failure
    _nothing_before_sentinel(attacker, backend_sub, attacker_t.acks, marker)
    # Cleanup of the retained messages on the shared broker.
    victim.publish(victim_t.status, b"", retain=True)
    backend_sub.publish(victim_t.commands, b"", retain=True)


# --- the claim identity -------------------------------------------------------------------------
def test_claim_reaches_provisioning_topics(pki: FleetPki, mqtt_probe: ProbeFactory, backend_sub: Probe) -> None:
    request_id = uuid.uuid4().hex
    claim = mqtt_probe(pki.claim)
    assert claim.connect()
    assert [c.value for c in claim.subscribe(topics.provision_response(request_id))] == [1]
    assert not claim.publish(topics.provision_request(request_id), b"csr").is_failure
    assert backend_sub.next_message_on(topics.provision_request(request_id)).payload == b"csr"
    assert not backend_sub.publish(topics.provision_response(request_id), b"cert").is_failure
    assert claim.next_message_on(topics.provision_response(request_id)).payload == b"cert"


def test_claim_reaches_nothing_else(pki: FleetPki, mqtt_probe: ProbeFactory, backend_sub: Probe, marker: bytes) -> None:
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    dev = topics.DeviceTopics(_uid())
    claim = mqtt_probe(pki.claim)
    assert claim.connect()
    forbidden_writes = [
        dev.telemetry,
        dev.status,
        f"{topics.PREFIX}/dev/claim/telemetry",  # the device patterns apply to every user name, 'claim' too
        topics.provision_response(mine),  # it must not answer as the cloud
        f"{topics.PREFIX}/other",
        "elsewhere",
    ]
    for topic in forbidden_writes:
        assert claim.publish(topic, marker).value == NOT_AUTHORIZED, topic
    _nothing_before_sentinel(backend_sub, claim, topics.provision_request(mine), marker)

    for topic in (topics.ALL_PROVISION_REQUESTS, f"{topics.PREFIX}/dev/+/commands", f"{topics.PREFIX}/dev/claim/acks"):
        claim.subscribe(topic)
    assert [c.value for c in claim.subscribe(topics.provision_response(mine))] == [1]
    other_claim = mqtt_probe(pki.claim)  # another box enrolling at the same time
    assert other_claim.connect()
    assert not other_claim.publish(topics.provision_request(other), marker + b" their csr").is_failure
    assert not backend_sub.publish(dev.commands, marker + b" command").is_failure
    assert not backend_sub.publish(f"{topics.PREFIX}/dev/claim/acks", marker + b" ack").is_failure
    _nothing_before_sentinel(claim, backend_sub, topics.provision_response(mine), marker)


def test_acl_file_confines_claim_before_the_device_patterns() -> None:
    acl = render_acl().splitlines()
    claim_rules = [line for line in acl[acl.index("user claim") + 1 :] if line.startswith("topic ")]
    assert claim_rules[0] == f"topic deny {topics.PREFIX}/dev/#"
    assert acl.index("user claim") < min(i for i, line in enumerate(acl) if line.startswith("pattern "))


# --- who may connect at all ---------------------------------------------------------------------
def test_connection_without_client_certificate_is_refused(broker: Broker, mqtt_probe: ProbeFactory) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(broker.ca_path))
    assert mqtt_probe(None, tls=ctx).connect() is False


def test_plaintext_mqtt_is_refused(broker: Broker) -> None:
    with socket.create_connection((broker.host, broker.port), timeout=5) as raw:
        raw.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        try:
            reply = raw.recv(64)
        except ConnectionResetError:  # the TLS stack rejects a non-TLS first record
            reply = b""
    assert not reply.startswith(b"\x20"), reply  # no CONNACK: the port speaks TLS only


@pytest.mark.parametrize("same_name", [True, False], ids=["impersonating-fleet-ca", "unknown-ca"])
def test_certificate_from_another_ca_is_refused(
    same_name: bool, pki: FleetPki, tmp_path: Path, mqtt_probe: ProbeFactory, device_creds: CredsFactory
) -> None:
    rogue = RogueCa(tmp_path / "rogue", pki, same_name=same_name)
    for cn in (_uid(), "backend"):
        assert mqtt_probe(rogue.issue_client_cert(cn)).connect() is False, cn
    assert mqtt_probe(device_creds(_uid())).connect() is True  # control: the same path with a fleet certificate


@pytest.mark.parametrize(
    ("start", "end"),
    [(-10, -1), (1, 10)],
    ids=["expired", "not-yet-valid"],
)
def test_certificate_outside_its_validity_is_refused(
    start: int, end: int, pki: FleetPki, mqtt_probe: ProbeFactory
) -> None:
    now = dt.datetime.now(dt.UTC)
    creds = issue_client_cert(
        pki, _uid(), not_before=now + dt.timedelta(days=start), not_after=now + dt.timedelta(days=end)
    )
    assert mqtt_probe(creds).connect() is False
    fresh = issue_client_cert(pki, _uid())
    assert mqtt_probe(fresh).connect() is True


def test_revoked_certificate_is_refused_after_crl_reload(
    pki: FleetPki, fresh_broker: Callable[..., Broker], mqtt_probe: ProbeFactory, device_creds: CredsFactory
) -> None:
    broker = fresh_broker()
    revoked, kept = device_creds(_uid()), device_creds(_uid())
    assert mqtt_probe(revoked, broker=broker).connect() is True
    pki.revoke(revoked.serial)
    assert revoked.serial in pki.revoked_serials()
    broker.reload_crl()
    assert mqtt_probe(revoked, broker=broker).connect() is False
    assert mqtt_probe(kept, broker=broker).connect() is True


# --- the harness itself -------------------------------------------------------------------------
def test_persistent_session_survives_broker_restart(
    pki: FleetPki, fresh_broker: Callable[..., Broker], mqtt_probe: ProbeFactory, device_creds: CredsFactory
) -> None:
    broker = fresh_broker()
    dev_id = _uid()
    t = topics.DeviceTopics(dev_id)
    creds = device_creds(dev_id)
    device = mqtt_probe(creds, client_id=dev_id, broker=broker)
    assert device.connect(clean_start=False, session_expiry_s=3600)
    assert [c.value for c in device.subscribe(t.commands)] == [1]
    device.close()
    backend = mqtt_probe(pki.backend, broker=broker)
    assert backend.connect()
    assert not backend.publish(t.commands, b"queued while offline").is_failure
    backend.close()

    port = broker.port
    broker.restart()
    assert broker.port == port

    device = mqtt_probe(creds, client_id=dev_id, broker=broker)
    assert device.connect(clean_start=False, session_expiry_s=3600)
    assert device.next_message_on(t.commands).payload == b"queued while offline"


def test_killed_broker_starts_again_on_its_port(
    fresh_broker: Callable[..., Broker], pki: FleetPki, mqtt_probe: ProbeFactory
) -> None:
    broker = fresh_broker()
    port, pid = broker.port, broker.pid
    broker.kill()
    assert not broker.running
    assert mqtt_probe(pki.backend, broker=broker).connect() is False
    broker.start()
    assert (broker.port, broker.running) == (port, True)
    assert broker.pid != pid
    assert mqtt_probe(pki.backend, broker=broker).connect() is True


def test_broker_config_is_tls_only_with_client_certificates(broker: Broker) -> None:
    conf = broker.conf_path.read_text().splitlines()
    assert [line for line in conf if line.startswith("listener ")] == [f"listener {broker.port} 127.0.0.1"]
    for line in (
        "require_certificate true",
        "use_identity_as_username false",  # the auth plugin binds client id and CN, and sets the user name
        "plugin ./glucoagent_auth.so",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        "persistence true",
        "crlfile tls/crl.pem",
    ):
        assert line in conf


# --- the CA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
def test_device_certificate_names_the_device(key_type: str, pki: FleetPki) -> None:
    key = generate_key(key_type)  # type: ignore[arg-type]
    cert = x509.load_pem_x509_certificate(pki.sign_device_csr(make_csr(key, "chosen-by-device"), "gd-0a1b2c"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gd-0a1b2c"
    assert cert.issuer == pki.ca_cert.subject
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_ca_refuses_a_csr_whose_signature_does_not_verify(pki: FleetPki) -> None:
    pem = make_csr(generate_key("ed25519"))
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the Ed25519 signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature"):
        pki.sign_device_csr(forged, "gd-forged1")


@pytest.mark.parametrize("device_id", ["claim", "backend", "GD-UPPER", "gd/../x", "gd-+", "ab"])
def test_ca_refuses_reserved_or_invalid_device_ids(device_id: str, pki: FleetPki) -> None:
    with pytest.raises(PkiError, match="device id"):
        pki.sign_device_csr(make_csr(generate_key("ed25519")), device_id)


def test_ca_refuses_keys_other_than_ed25519_and_p256(pki: FleetPki) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(rsa_key, hashes.SHA256())
    with pytest.raises(PkiError, match="unsupported device key"):
        pki.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM), "gd-rsa001")


def test_pki_directory_reloads_with_private_keys_0600(pki: FleetPki) -> None:
    again = FleetPki.load(pki.directory)
    assert again.ca_cert == pki.ca_cert
    keys = sorted(pki.directory.rglob("*.key"))
    assert {p.name for p in keys} >= {"ca.key", "server.key", "claim.key", "backend.key"}
    assert {oct(p.stat().st_mode & 0o777) for p in keys} == {"0o600"}
    assert not list(pki.directory.rglob(".*.tmp"))
    with pytest.raises(PkiError, match="exists already"):
        FleetPki.create(pki.directory)
