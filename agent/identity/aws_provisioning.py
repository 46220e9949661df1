"""Enrolment on AWS IoT Core: fleet provisioning by claim with the box's own CSR (docs/clouds.md).

Steps 3 and 4 of provisioning (agent/identity/provisioning.py runs the others, the same for every cloud),
in AWS's shape (agent/wire/aws.py): CreateCertificateFromCsr, then RegisterThing on the clinic's
provisioning template with our enrolment token and patient reference as template parameters; the
template's pre-provisioning hook (backend/aws.py) checks the token where AWS checks claims and names the
thing after the device key. The certificate AWS returns must be for our key (a reply for another key is
ignored); the command key and the release key come as the template's ``deviceConfiguration``; the TLS
trust anchor stays the one flashed at the factory (the endpoint's root CA).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.config import Endpoint, MqttSection
from agent.errors import LinkTimeout, ProvisioningError, TokenRejected
from agent.identity.provisioning import EnrolContext, _routes
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.link.routes import connect_first
from agent.wire import aws
from agent.wire.provisioning import EnrolRequest, decode_request, device_id_for

AWS_KEY_TYPE = "p256"  # "X.509 client certificates": AWS IoT Core takes RSA and ECDSA keys, not Ed25519


def _public_der(pem: bytes, csr: bool = False) -> bytes:
    owner = x509.load_pem_x509_csr(pem) if csr else x509.load_pem_x509_certificate(pem)
    return owner.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _refused(step: str, rejection: aws.ServiceRejection) -> ProvisioningError:
    what = f"{step} refused ({rejection.status_code} {rejection.error_code})"
    if (rejection.status_code, rejection.error_code) == aws.HOOK_REFUSED and step == "RegisterThing":
        return TokenRejected(
            f"enrolment refused by the clinic's provisioning hook ({what}): the token is unknown, used, expired "
            "or issued for another patient; ask the clinic for a new one"
        )
    return ProvisioningError(f"{what}: {rejection.error_message or 'no message'}")


def enrol_by_aws_fleet(ctx: EnrolContext) -> tuple[dict[str, Any], Endpoint]:
    """The exchange (agent/identity/provisioning.py ``Exchange``): our reply's fields from AWS's answers."""
    request = decode_request(ctx.request, ctx.request_id)
    assert isinstance(request, EnrolRequest)
    profile = (ctx.mqtt or MqttSection(profile="aws")).cloud()
    template = profile.aws_template if isinstance(profile, aws.AwsProfile) else aws.DEFAULT_TEMPLATE
    provision = aws.provision_topic(template)
    ours = _public_der(ctx.csr_pem, csr=True)
    replies: dict[str, bytes] = {}
    arrived = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == aws.accepted(aws.CREATE_FROM_CSR):
            try:  # several boxes may enrol at once on one claim identity: take only ours
                if _public_der(aws.decode_certificate_created(payload).certificate_pem) != ours:
                    return
            except (aws.AwsMessageError, ValueError):
                return
        elif topic not in (aws.rejected(aws.CREATE_FROM_CSR), aws.accepted(provision), aws.rejected(provision)):
            return
        with arrived:
            replies[topic] = payload

    ep = ctx.endpoint
    settings = LinkSettings(
        host=ep.host,
        port=ep.port,
        client_id=f"claim-{secrets.token_hex(12)}",
        tls=TlsFiles(ca=ctx.claim.ca, cert=ctx.claim.cert, key=ctx.claim.key),
        protocol="mqttv5",
        clean_start=True,
    )
    with ctx.progress.step(f"connect to {ep} with the factory claim certificate") as s:
        link = connect_first(
            _routes(ctx.mqtt, ep, settings, ctx.state_dir), lambda way: MqttLink(way, on_message=on_message)
        )
        if link.s.transport != "tcp" or link.s.proxy is not None:
            s.detail = link.s.describe()

    def ask(topic: str, payload: bytes) -> tuple[bool, bytes]:
        mid = link.publish(topic, payload)
        deadline = time.monotonic() + ctx.timeout_s
        while True:
            with arrived:
                for answer, ok in ((aws.accepted(topic), True), (aws.rejected(topic), False)):
                    if answer in replies:
                        link.forget(mid)
                        return ok, replies.pop(answer)
            if time.monotonic() > deadline:
                raise LinkTimeout(f"no answer from AWS IoT fleet provisioning within {ctx.timeout_s:g}s")
            if not link.loop(0.1):
                raise ProvisioningError("the broker closed the connection during enrolment")

    try:
        with ctx.progress.step("create the certificate from our CSR and register the thing (token, patient)") as s:
            codes = link.subscribe([f"{aws.CREATE_FROM_CSR}/+", f"{provision}/+"])
            if any(c >= 0x80 for c in codes):
                raise ProvisioningError(f"the claim policy refused the fleet provisioning topics (codes {codes})")
            ok, payload = ask(aws.CREATE_FROM_CSR, aws.encode_create_from_csr(ctx.csr_pem))
            if not ok:
                raise _refused("CreateCertificateFromCsr", aws.decode_service_rejection(payload))
            created = aws.decode_certificate_created(payload)
            params = {aws.TOKEN_PARAM: request.token, aws.PATIENT_PARAM: request.patient,
                      aws.SERIAL_PARAM: str(request.hw.get("serial", ""))}  # fmt: skip
            ok, payload = ask(provision, aws.encode_register_thing(created.ownership_token, params))
            if not ok:
                raise _refused("RegisterThing", aws.decode_service_rejection(payload))
            registered = aws.decode_thing_registered(payload)
            ours_id = device_id_for(ctx.key.public_key())
            if registered.thing_name != ours_id:  # it becomes the client id and topics; the cloud knows our key's id
                raise ProvisioningError(
                    f"AWS registered thing {registered.thing_name!r}, not this box's device id {ours_id!r}: the "
                    "provisioning template's pre-provisioning hook must name the thing (docs/clouds.md)"
                )
            command_key = registered.device_configuration.get(aws.COMMAND_KEY_CONFIG, "")
            if "PUBLIC KEY" not in command_key:
                raise ProvisioningError(
                    f"the provisioning template's deviceConfiguration has no {aws.COMMAND_KEY_CONFIG}"
                )
            s.detail = f"device id {registered.thing_name}"
    finally:
        link.disconnect()
    reply: dict[str, Any] = {
        "device_id": registered.thing_name,
        "cert": created.certificate_pem,
        "ca": ctx.claim.ca.read_bytes(),  # the endpoint's root CA, flashed at the factory
        "command_key": command_key.encode(),
        "config": {},
    }
    release_key = registered.device_configuration.get(aws.RELEASE_KEY_CONFIG)
    if release_key:
        reply["release_key"] = release_key.encode()
    return reply, ep
