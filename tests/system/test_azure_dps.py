"""Provisioning under mqtt.profile azure: one `glucoagent provision` on a fresh box, through the fake DPS
(registration, 202 + operation polling, our token checked by the custom allocation webhook = our backend's
provisioning logic), then the box logs in to the hub with the certificate the CSR yielded."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import device_config

PATIENT = "patient-dps-5"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureSystem]:
    # hub "localhost": the host name DPS assigns is where the box then connects (the broker's certificate names it)
    with AzureSystem(tmp_path_factory.mktemp("dps"), hub="localhost") as s:
        yield s


def test_fresh_box_provisions_through_dps_with_one_command(hub: AzureSystem) -> None:
    state = hub.device_dir("dps-box")
    out = hub.provision_by_dps(state, PATIENT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any("connect to DPS" in line and line.endswith(")") and "registration id gd-" in line for line in lines)
    assert any("register with DPS" in line and "ok (device id gd-" in line and "on localhost" in line for line in lines)
    device_id = lines[-1].split()[-1]
    cert = x509.load_pem_x509_certificate((state / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id  # registration id = CN
    meta = json.loads((state / "device.json").read_text())
    assert meta["endpoint"] == f"mqtts://localhost:{hub.broker.port}"
    assert hub.db.patient_of(device_id) == PATIENT  # the webhook ran our provisioning logic
    assert "New client connected" in hub.broker.log_text() and f"as {device_id} " in hub.broker.log_text()
    assert hub.responder.closed == []


def test_a_refused_token_fails_the_registration_with_our_code(hub: AzureSystem) -> None:
    state = hub.device_dir("dps-bad-token")
    out = hub.provision_by_dps(state, PATIENT, token="NOTAREALTOKEN123")
    assert out.returncode == 51, out.stdout + out.stderr
    assert out.stderr.strip().startswith("glucoagent: error: enrolment token refused (token_unknown)")
    assert not (state / "device.json").exists()


def test_dps_refuses_a_login_with_another_id_scope(hub: AzureSystem) -> None:
    state = hub.device_dir("dps-bad-scope")
    config = device_config(state / "glucoagent.uci", [], mqtt=hub.mqtt_options(dps_id_scope="0ne00OTHER"))
    out = hub.provision_by_dps(state, PATIENT, config=config)
    assert out.returncode != 0
    assert "refused the login" in out.stderr, out.stderr
    assert "user name names another ID scope" in hub.broker.log_text()


@pytest.mark.parametrize("client_id", ["backend-dps-takeover", "claim-dps-x"])
def test_the_claim_certificate_never_logs_in_to_dps_as_the_backend(hub: AzureSystem, client_id: str) -> None:
    # DPS's ClientId is the registration id (a device id); the backend's and the claim's own prefixes are not
    # registration ids: a claim login as "backend-…" would take over the backend's connection and its session
    claim = hub.home.pki.claim
    codes: list[int] = []
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    ctx = ssl.create_default_context(cafile=str(claim.ca))
    ctx.load_cert_chain(str(claim.cert), str(claim.key))
    c.tls_set_context(ctx)
    c.username_pw_set(f"{hub.dps_scope}/registrations/{client_id}/api-version=2019-03-31")
    c.on_connect = lambda _c, _u, _f, rc, _p: (codes.append(int(getattr(rc, "value", rc))), done.set())
    c.on_disconnect = lambda *_a: done.set()
    c.connect(hub.broker.host, hub.broker.port, keepalive=30)
    c.loop_start()
    try:
        assert done.wait(10)
    finally:
        c.disconnect()
        c.loop_stop()
    if client_id.startswith("claim-"):
        assert codes == [0]  # the claim's own login is unchanged
    else:
        assert codes != [0], "the claim certificate logged in with the backend's client id prefix"
