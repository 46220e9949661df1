"""Enrolment on AWS IoT Core: fleet provisioning by claim with the box's own CSR (docs/clouds.md).

The same six steps as our own claim path (agent/identity/provisioning.py), the exchange in AWS's shape
(agent/wire/aws.py): CreateCertificateFromCsr, then RegisterThing on the clinic's provisioning template
with our enrolment token and patient reference as template parameters; the template's pre-provisioning
hook (backend/aws.py) checks the token where AWS checks claims, and names the thing after the device key.
The certificate AWS returns is for our key (checked: a reply for another key is ignored); the command key
and the release key come as the template's ``deviceConfiguration``; the TLS trust anchor stays the one
flashed at the factory (the endpoint's root CA).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.config import Endpoint, MqttSection
from agent.errors import LinkTimeout, ProvisioningError, TokenRejected
from agent.fsutil import atomic_write
from agent.identity.credentials import (
    build_csr,
    ensure_state_dir,
    hardware_serial,
    is_provisioned,
    load_or_create_key,
    save_credentials,
)
from agent.identity.provisioning import (
    BINDING_FILE,
    ClaimFiles,
    KeyTypeRefused,
    Progress,
    _routes,
    binding_for,
    check_local_binding,
    confirm,
)
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.link.routes import connect_first
from agent.update.keys import RELEASE_KEY_FILE
from agent.wire import aws


def _public_der(pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


def provision_aws(
    state_dir: Path,
    endpoint: str,
    token: str,
    patient: str,
    *,
    template: str = aws.DEFAULT_TEMPLATE,
    claim: ClaimFiles | None = None,
    key_type: str = "p256",
    timeout_s: float = 20.0,
    out: Callable[[str], None] = print,
    mqtt: MqttSection | None = None,
) -> str:
    """Enrol this box on AWS IoT Core; returns the thing name (= device id). Raises GlucoagentError subclasses."""
    ep = Endpoint.parse(endpoint, "--endpoint")
    claim = claim or ClaimFiles.default(state_dir)
    progress = Progress(6, out)
    with progress.step(f"state directory {state_dir}") as s:
        ensure_state_dir(state_dir)
        for path in (claim.ca, claim.cert, claim.key):
            if not path.exists():
                raise ProvisioningError(
                    f"factory file missing: {path} (was the box flashed with its claim certificate?)"
                )
        if is_provisioned(state_dir):
            check_local_binding(state_dir, patient)
            s.detail = "already provisioned: credentials kept, enrolment re-confirmed"
    with progress.step(f"device key ({key_type}, created on this box, never leaves it)"):
        if key_type != "p256":  # "X.509 client certificates": AWS IoT Core takes RSA and ECDSA keys, not Ed25519
            raise KeyTypeRefused(f"AWS IoT Core does not accept {key_type} device keys: set agent.key_type p256")
        key = load_or_create_key(state_dir, key_type)
        if not isinstance(key, ec.EllipticCurvePrivateKey):  # a key made for another cloud, kept on the box
            raise KeyTypeRefused(
                "this box's device key is Ed25519, which AWS IoT Core does not accept: "
                "run `glucoagent deprovision` first (a new P-256 key is made at the next enrolment)"
            )
        hw = hardware_serial()
        csr = build_csr(key, hw)
        ours = build_public_der(csr)
    provision = aws.provision_topic(template)
    replies: dict[str, bytes] = {}
    arrived = threading.Condition()

    def on_message(topic: str, payload: bytes) -> None:
        if topic in (aws.accepted(aws.CREATE_FROM_CSR), aws.rejected(aws.CREATE_FROM_CSR)):
            if topic.endswith("/accepted"):
                try:  # several boxes may enrol at once on one claim identity: take only ours
                    if _public_der(aws.decode_certificate_created(payload).certificate_pem) != ours:
                        return
                except (aws.AwsMessageError, ValueError):
                    return
        elif topic not in (aws.accepted(provision), aws.rejected(provision)):
            return
        with arrived:
            replies[topic] = payload
            arrived.notify_all()

    settings = LinkSettings(
        host=ep.host,
        port=ep.port,
        client_id=f"claim-{secrets.token_hex(12)}",
        tls=TlsFiles(ca=claim.ca, cert=claim.cert, key=claim.key),
        protocol="mqttv5",
        clean_start=True,
    )
    with progress.step(f"connect to {ep} with the factory claim certificate") as s:
        link = connect_first(_routes(mqtt, ep, settings, state_dir), lambda way: MqttLink(way, on_message=on_message))
        if link.s.transport != "tcp" or link.s.proxy is not None:
            s.detail = link.s.describe()

    def ask(topic: str, payload: bytes, answers: tuple[str, str]) -> tuple[bool, bytes]:
        mid = link.publish(topic, payload)
        deadline = time.monotonic() + timeout_s
        while True:
            with arrived:
                for answer in answers:
                    if answer in replies:
                        link.forget(mid)
                        return answer == answers[0], replies.pop(answer)
            if time.monotonic() > deadline:
                raise LinkTimeout(f"no answer from AWS IoT fleet provisioning within {timeout_s:g}s")
            if not link.loop(0.1):
                raise ProvisioningError("the broker closed the connection during enrolment")

    try:
        with progress.step("create the certificate from our CSR and register the thing (token, patient)") as s:
            codes = link.subscribe([f"{aws.CREATE_FROM_CSR}/+", f"{provision}/+"])
            if any(c >= 0x80 for c in codes):
                raise ProvisioningError(f"the claim policy refused the fleet provisioning topics (codes {codes})")
            ok, payload = ask(
                aws.CREATE_FROM_CSR,
                aws.encode_create_from_csr(csr),
                (aws.accepted(aws.CREATE_FROM_CSR), aws.rejected(aws.CREATE_FROM_CSR)),
            )
            if not ok:
                raise _refused("CreateCertificateFromCsr", aws.decode_service_rejection(payload))
            created = aws.decode_certificate_created(payload)
            params = {aws.TOKEN_PARAM: token, aws.PATIENT_PARAM: patient, aws.SERIAL_PARAM: hw}
            ok, payload = ask(
                provision,
                aws.encode_register_thing(created.ownership_token, params),
                (aws.accepted(provision), aws.rejected(provision)),
            )
            if not ok:
                raise _refused("RegisterThing", aws.decode_service_rejection(payload))
            registered = aws.decode_thing_registered(payload)
            command_key = registered.device_configuration.get(aws.COMMAND_KEY_CONFIG, "")
            if "PUBLIC KEY" not in command_key:
                raise ProvisioningError(
                    f"the provisioning template's deviceConfiguration has no {aws.COMMAND_KEY_CONFIG}"
                )
            s.detail = f"thing {registered.thing_name}"
    finally:
        link.disconnect()
    with progress.step("save certificate and command key (atomic, mode 0600)"):
        if not (state_dir / BINDING_FILE).exists():
            atomic_write(state_dir / BINDING_FILE, binding_for(patient))
        release_key = registered.device_configuration.get(aws.RELEASE_KEY_CONFIG)
        if release_key:
            atomic_write(state_dir / RELEASE_KEY_FILE, release_key.encode())
        save_credentials(
            state_dir,
            device_id=registered.thing_name,
            endpoint=str(ep),
            cert_chain_pem=created.certificate_pem,
            ca_pem=claim.ca.read_bytes(),  # the endpoint's root CA, flashed at the factory
            command_key_pem=command_key.encode(),
            config={},
        )
    with progress.step("connect with the device certificate and confirm"):
        confirm(state_dir, protocol="mqttv5", mqtt=mqtt)
    return registered.thing_name


def build_public_der(csr_pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(csr_pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _refused(step: str, rejection: aws.ServiceRejection) -> ProvisioningError:
    what = f"{step} refused ({rejection.status_code} {rejection.error_code})"
    if (rejection.status_code, rejection.error_code) == aws.HOOK_REFUSED and step == "RegisterThing":
        return TokenRejected(
            f"enrolment refused by the clinic's provisioning hook ({what}): the token is unknown, used, expired "
            "or issued for another patient; ask the clinic for a new one"
        )
    return ProvisioningError(f"{what}: {rejection.error_message or 'no message'}")
