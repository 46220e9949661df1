"""Enrolment through Azure IoT Hub's Device Provisioning Service (``mqtt.profile azure``, docs/clouds.md).

The same request as our claim path (token, patient reference, CSR of a key made on the box;
agent/wire/provisioning.py), carried as DPS carries a registration: connect to DPS with the factory claim
certificate, client id = registration id = the device id the key yields (the CN the certificate will
carry), publish the registration with our request in its ``payload``, then poll the operation while DPS
answers 202 ``assigning`` (waiting ``retry-after``). DPS hands the payload to the clinic's custom allocation
webhook, which is our backend's provisioning logic: it checks the token and the patient binding and signs the
CSR; its reply comes back in ``registrationState.payload`` with the assigned hub. A refusal comes back as a
failed registration whose ``errorMessage`` starts with our refusal code. Wire formats: agent/wire/azure.py.
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import Endpoint, MqttSection
from agent.errors import GlucoagentError, LinkTimeout, ProvisioningError
from agent.identity.credentials import CA_FILE
from agent.identity.provisioning import FACTORY_DIR, EnrolContext, _routes, raise_refusal
from agent.identity.renewal import (
    RenewalError,
    check_certificate,
    commit,
    discard,
    new_request_id,
    stage_key,
    try_login,
)
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.link.routes import connect_first
from agent.wire import cose
from agent.wire.azure import (
    DPS_DEFAULT_RETRY_S,
    DPS_RESPONSES,
    DpsResponse,
    decode_dps_response,
    dps_register_topic,
    dps_status_topic,
    dps_username,
    encode_dps_register,
    payload_bytes,
)
from agent.wire.provisioning import check_reply, decode_reply, device_id_for
from agent.wire.renewal import encode_recovery_request

log = logging.getLogger(__name__)
_CODE_RE = re.compile(r"^(?P<code>[a-z_]{3,40}): (?P<message>.*)$", re.DOTALL)
MAX_RETRY_S = 60.0  # never wait longer than this between polls, whatever retry-after says


def enrol_by_dps(ctx: EnrolContext) -> tuple[dict[str, Any], Endpoint]:
    mqtt = ctx.mqtt
    if mqtt is None or not mqtt.dps_id_scope:
        raise ProvisioningError("mqtt.dps_id_scope is not set: the DPS instance's ID scope (0ne…) is needed")
    registration_id = device_id_for(ctx.key.public_key())
    csr_der = x509.load_pem_x509_csr(ctx.csr_pem).public_bytes(serialization.Encoding.DER)
    settings = LinkSettings(
        host=ctx.endpoint.host,
        port=ctx.endpoint.port,
        client_id=registration_id,  # [DPS] ClientId = registrationId
        tls=TlsFiles(ca=ctx.claim.ca, cert=ctx.claim.cert, key=ctx.claim.key),
        protocol="mqttv311",  # [DPS] MQTT 3.1.1 only
        clean_start=True,
        username=dps_username(mqtt.dps_id_scope, registration_id),
    )
    responses: queue.SimpleQueue[DpsResponse] = queue.SimpleQueue()

    def on_message(topic: str, payload: bytes) -> None:
        try:
            got = decode_dps_response(topic, payload)
        except ValueError as exc:
            log.warning("dps: %s", exc)
            return
        if got is not None:
            responses.put(got)

    routes = _routes(mqtt, ctx.endpoint, settings, ctx.state_dir)
    with ctx.progress.step(f"connect to DPS {ctx.endpoint} with the factory claim certificate") as s:
        link = connect_first(routes, lambda way: MqttLink(way, on_message=on_message))
        s.detail = f"registration id {registration_id}"
    try:
        with ctx.progress.step("register with DPS (token, patient reference, CSR) and wait for the assignment") as s:
            codes = link.subscribe([DPS_RESPONSES])
            if any(c >= 0x80 for c in codes):
                raise ProvisioningError(f"DPS refused the response subscription (codes {codes})")
            body = encode_dps_register(registration_id, csr_der, ctx.request)
            state = _register(link, responses, body, ctx.timeout_s)
            reply, hub = _assignment(state, registration_id)
            if mqtt.azure_hub and hub != mqtt.azure_hub:
                raise ProvisioningError(f"DPS assigned IoT hub {hub}, but mqtt.azure_hub is {mqtt.azure_hub}: set it to {hub}")
            s.detail = f"device id {reply['device_id']} on {hub}"
    finally:
        link.disconnect()
    return reply, Endpoint(hub, ctx.endpoint.port)  # the hub on the port DPS answered on (8883, or 443)


def _register(link: MqttLink, responses: queue.SimpleQueue[DpsResponse], body: bytes, timeout_s: float) -> dict[str, Any]:
    """Register, then poll the operation until DPS says assigned or failed; the final JSON body."""
    deadline = time.monotonic() + timeout_s
    topic = dps_register_topic(rid := secrets.token_hex(4))
    link.publish(topic, body)
    while True:
        got = _wait(link, responses, rid, deadline)
        if got.status == 429 or got.status >= 500:  # [PYP] retried after retry-after, the request as it was
            _sleep(link, got.retry_after_s, deadline)
            topic = dps_register_topic(rid := secrets.token_hex(4))
            link.publish(topic, body)
            continue
        if got.status >= 300:
            raise ProvisioningError(f"DPS refused the registration ({got.status}): {got.body.get('message', got.body)}")
        status = got.body.get("status")
        if status == "assigning":  # 202: the operation runs; poll it after retry-after ([DPS], [PYP])
            operation = str(got.body.get("operationId", ""))
            if not operation:
                raise ProvisioningError("DPS answered 'assigning' without an operation id")
            _sleep(link, got.retry_after_s, deadline)
            link.publish(dps_status_topic(rid := secrets.token_hex(4), operation), b"")
            continue
        return got.body


def _wait(link: MqttLink, responses: queue.SimpleQueue[DpsResponse], rid: str, deadline: float) -> DpsResponse:
    while True:
        while not responses.empty():
            got = responses.get_nowait()
            if got.rid == rid:
                return got
        if time.monotonic() > deadline:
            raise LinkTimeout("no answer from DPS in time")
        if not link.loop(0.1):
            raise ProvisioningError("DPS closed the connection during registration")


def _sleep(link: MqttLink, retry_after_s: float | None, deadline: float) -> None:
    until = time.monotonic() + min(retry_after_s or DPS_DEFAULT_RETRY_S, MAX_RETRY_S)
    if until > deadline:
        raise LinkTimeout("DPS did not finish the registration in time")
    while time.monotonic() < until:
        if not link.loop(min(0.2, max(0.0, until - time.monotonic()))):
            raise ProvisioningError("DPS closed the connection during registration")


def _assignment(body: dict[str, Any], registration_id: str) -> tuple[dict[str, Any], str]:
    """Our checked reply and the assigned hub from DPS's final answer; a refusal raises its error."""
    state = body.get("registrationState")
    if not isinstance(state, dict):
        raise ProvisioningError(f"DPS answered {body.get('status')!r} without a registration state")
    if body.get("status") != "assigned":
        message = str(state.get("errorMessage", body.get("status")))
        m = _CODE_RE.match(message)
        if m:  # our webhook's refusal: the code a technician acts on
            raise_refusal({"code": m["code"], "message": m["message"]})
        raise ProvisioningError(f"DPS registration {body.get('status')}: {message} (error {state.get('errorCode')})")
    try:
        reply = decode_reply(payload_bytes(state.get("payload")))
    except ValueError as exc:
        raise ProvisioningError(f"DPS assigned the box but returned no enrolment reply: {exc}") from None
    if not reply.get("ok"):
        raise_refusal(reply)
    check_reply(reply)
    if reply["device_id"] != registration_id or state.get("deviceId") != registration_id:
        raise ProvisioningError(
            f"DPS assigned device id {state.get('deviceId')!r} / {reply['device_id']!r}, not {registration_id!r}"
        )
    hub = state.get("assignedHub")
    if not isinstance(hub, str) or not hub:
        raise ProvisioningError("DPS assigned no IoT hub")
    return reply, hub


# --- renewal: registering again ------------------------------------------------------------------------
def renew_by_dps(
    state_dir: Path,
    mqtt: MqttSection,
    hub: Endpoint,
    running: LinkSettings,
    device_id: str,
    old_key: cose.PrivateKey,
    key_type: str,
    *,
    timeout_s: float = 60.0,
) -> x509.Certificate:
    """A new certificate by registering with DPS again (the box's own link must be held down: one connection).

    The same registration as enrolment, with registration id = this device's id and, in ``payload``, a
    recovery request in place of the token (agent/wire/renewal.py: signed with the current device key over
    the new key's CSR), which our allocation webhook checks as re-enrolment. The new key is staged in
    ``renew/``; the certificate DPS returns is checked, tried by logging in to the hub as this device (its
    link is down), and only then swapped in (renewal.commit). Raises RenewalError; the old pair stays.
    [CSR] assumed as in enrol_by_dps: the factory claim certificate is the onboarding credential here too.
    """
    factory = state_dir / FACTORY_DIR
    claim = TlsFiles(ca=factory / "ca.crt", cert=factory / "claim.crt", key=factory / "claim.key")
    if not all(p.exists() for p in (claim.ca, claim.cert, claim.key)):
        raise RenewalError("no_claim", f"no factory claim certificate in {factory}: DPS cannot be reached")
    if not mqtt.dps_id_scope:
        raise RenewalError("no_dps_scope", "mqtt.dps_id_scope is not set: DPS cannot be reached")
    key, csr_pem = stage_key(state_dir, key_type)
    try:
        request_id = new_request_id()
        request = encode_recovery_request(request_id, device_id, old_key, csr_pem, time.time())
        csr_der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
        body = encode_dps_register(device_id, csr_der, request)
        settings = LinkSettings(
            host=mqtt.dps_host, port=hub.port, client_id=device_id,  # [DPS] ClientId = registrationId
            tls=claim, protocol="mqttv311", clean_start=True, username=dps_username(mqtt.dps_id_scope, device_id),
        )  # fmt: skip
        state = _register_once(state_dir, mqtt, settings, body, timeout_s)
        chain = _renewed_chain(state, device_id)
        leaf = check_certificate(chain, key, device_id, (state_dir / CA_FILE).read_bytes())
        try_login(state_dir, running, chain, alone=True)
        commit(state_dir)
    except BaseException:
        discard(state_dir)  # a no-op once COMMIT is written: the swap then completes, now or at the next start
        raise
    return leaf


def _register_once(state_dir: Path, mqtt: MqttSection, settings: LinkSettings, body: bytes, timeout_s: float) -> dict[str, Any]:
    responses: queue.SimpleQueue[DpsResponse] = queue.SimpleQueue()

    def on_message(topic: str, payload: bytes) -> None:
        try:
            got = decode_dps_response(topic, payload)
        except ValueError as exc:
            log.warning("dps: %s", exc)
            return
        if got is not None:
            responses.put(got)

    ep = Endpoint(settings.host, settings.port)
    try:
        link = connect_first(_routes(mqtt, ep, settings, state_dir), lambda way: MqttLink(way, on_message=on_message))
    except GlucoagentError as exc:
        raise RenewalError("dps_unreachable", f"cannot connect to DPS {ep}: {exc}") from None
    try:
        codes = link.subscribe([DPS_RESPONSES])
        if not any(c >= 0x80 for c in codes):
            return _register(link, responses, body, timeout_s)
    except GlucoagentError as exc:
        raise RenewalError("dps_failed", f"registration with DPS failed: {exc}") from None
    finally:
        link.disconnect()
    raise RenewalError("dps_refused", f"DPS refused the response subscription (codes {codes})")


def _renewed_chain(body: dict[str, Any], device_id: str) -> bytes:
    """The certificate chain from DPS's final answer to a renewal; a refusal raises RenewalError with our code."""
    state = body.get("registrationState")
    if not isinstance(state, dict):
        raise RenewalError("dps_failed", f"DPS answered {body.get('status')!r} without a registration state")
    if body.get("status") != "assigned":
        message = str(state.get("errorMessage", body.get("status")))
        m = _CODE_RE.match(message)
        code, text = (m["code"], m["message"]) if m else ("dps_failed", message)
        raise RenewalError(code, f"DPS registration {body.get('status')}: {text}")
    try:
        reply = decode_reply(payload_bytes(state.get("payload")))
    except ValueError as exc:
        raise RenewalError("bad_reply", f"DPS assigned the box but returned no reply: {exc}") from None
    if not reply.get("ok"):
        raise RenewalError(str(reply.get("code", "refused")), f"renewal refused: {reply.get('message', '')}")
    chain = reply.get("cert")
    if reply.get("device_id") != device_id or state.get("deviceId") != device_id or not isinstance(chain, bytes):
        raise RenewalError("bad_reply", "the DPS reply names another device or has no certificate")
    return chain
