"""Certificate renewal on AWS IoT Core (``mqtt.profile aws``): fleet provisioning's MQTT API, called again.

AWS's "Device provisioning MQTT API" (developer guide, fleet-provision-api) gives a device two calls over
its MQTT connection: CreateCertificateFromCsr (a certificate for a key the device keeps; PENDING_ACTIVATION
until RegisterThing) and RegisterThing on a provisioning template with the returned ownership token. The
box renews by making both calls again on a side connection ``<thing>-renew`` with its current certificate
(the device policy allows ``client/<thing>-*`` and these two topics: docs/clouds.md, IT setup), so its
running link is not touched:

1. a new P-256 key staged in ``renew/`` (0600), its CSR naming the thing (CN);
2. CreateCertificateFromCsr; the certificate returned must be for the staged key;
3. RegisterThing with ``RenewalId`` and ``RenewalProof`` (agent/wire/renewal.py ``sign_recovery``: the CSR
   signed with the thing's current key) in place of the enrolment token; the pre-provisioning hook
   (backend/aws.py) checks the proof and names the same thing, whose template attaches the new
   certificate to it and activates it;
4. a login with the new pair as ``<thing>-renew``, then the crash-safe swap (agent/identity/renewal.py).

A box whose certificate expired offline (``recover``) makes the same calls on a claim connection: the claim
policy allows exactly these two topics. Wire formats: agent/wire/aws.py.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import GlucoagentError
from agent.identity.credentials import CA_FILE, CERT_FILE
from agent.identity.renewal import (
    FACTORY_DIR,
    RenewalError,
    check_certificate,
    commit,
    discard,
    new_request_id,
    stage_key,
    try_login,
)
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.wire import aws, cose
from agent.wire.renewal import sign_recovery

if TYPE_CHECKING:
    from cryptography import x509

AWS_KEY_TYPE = "p256"  # "X.509 client certificates": AWS IoT Core signs RSA and ECDSA keys, not Ed25519


def renew_on_aws(
    state_dir: Path,
    running: LinkSettings,
    device_id: str,
    old_key: cose.PrivateKey,
    template: str,
    *,
    expired: bool = False,
    timeout_s: float = 30.0,
    stop: Callable[[], bool] = lambda: False,
) -> x509.Certificate:
    """A new certificate for this thing from AWS; on success the new pair is swapped in. Raises RenewalError
    (the old files stay as they are, the staged key is dropped). ``expired``: over the claim certificate."""
    if expired:
        factory = state_dir / FACTORY_DIR
        claim = TlsFiles(ca=running.tls.ca, cert=factory / "claim.crt", key=factory / "claim.key")
        if not claim.cert.exists() or not claim.key.exists():
            raise RenewalError("no_claim", f"no factory claim certificate in {factory}: re-enrol with a technician")
        caller = dataclasses.replace(running, client_id=f"claim-{secrets.token_hex(12)}", tls=claim, clean_start=True, will=None)
    else:
        try:
            caller = running.side("renew")
        except GlucoagentError as exc:
            raise RenewalError("one_connection_only", str(exc)) from None
    key, csr = stage_key(state_dir, AWS_KEY_TYPE, common_name=device_id)
    try:
        request_id = new_request_id()
        proof = sign_recovery(request_id, device_id, old_key, csr, time.time())
        chain = _ask_aws(caller, csr, template, request_id, proof, device_id, timeout_s, stop)
        leaf = check_certificate(chain, key, device_id, _fleet_ca(state_dir))
        try_login(state_dir, running, chain)
        commit(state_dir)
    except BaseException:
        discard(state_dir)  # a no-op once COMMIT is written: then the swap completes, now or at the next start
        raise
    return leaf


def _fleet_ca(state_dir: Path) -> bytes | None:
    """The CA that issued the current certificate, where the box holds it (our fleet CA, the fake); None on
    real AWS, whose device certificates are not issued by the endpoint's root in ca.crt: the trial login is
    the check there."""
    from cryptography import x509

    try:
        ca_pem = (state_dir / CA_FILE).read_bytes()
        ca = x509.load_pem_x509_certificate(ca_pem)
        current = x509.load_pem_x509_certificate((state_dir / CERT_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return ca_pem if current.issuer == ca.subject else None


def _ask_aws(
    caller: LinkSettings, csr: bytes, template: str, request_id: str, proof: bytes, device_id: str,
    timeout_s: float, stop: Callable[[], bool],
) -> bytes:  # fmt: skip
    """CreateCertificateFromCsr then RegisterThing on one connection; the new certificate's PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def spki(pem: bytes, is_csr: bool) -> bytes:
        owner = x509.load_pem_x509_csr(pem) if is_csr else x509.load_pem_x509_certificate(pem)
        return owner.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    ours = spki(csr, True)
    provision = aws.provision_topic(template)
    replies: dict[str, bytes] = {}
    arrived = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == aws.accepted(aws.CREATE_FROM_CSR):
            try:  # the fake (and a claim identity shared by several boxes) may show others' replies
                if spki(aws.decode_certificate_created(payload).certificate_pem, False) != ours:
                    return
            except (aws.AwsMessageError, ValueError):
                return
        with arrived:
            replies[topic] = payload

    link = MqttLink(caller, on_message=on_message)

    def ask(topic: str, payload: bytes) -> tuple[bool, bytes]:
        mid = link.publish(topic, payload)
        deadline = time.monotonic() + timeout_s
        while True:
            with arrived:
                for answer, ok in ((aws.accepted(topic), True), (aws.rejected(topic), False)):
                    if answer in replies:
                        link.forget(mid)
                        return ok, replies.pop(answer)
            if time.monotonic() > deadline or stop():
                raise RenewalError("renewal_timeout", f"no answer from AWS IoT fleet provisioning within {timeout_s:g}s")
            if not link.loop(0.1):
                raise RenewalError("renewal_failed", "AWS IoT closed the connection during the renewal")

    def calls() -> bytes:
        codes = link.subscribe([f"{aws.CREATE_FROM_CSR}/+", f"{provision}/+"])
        if any(c >= 0x80 for c in codes):
            raise RenewalError("policy_refused", f"the policy refused the fleet provisioning topics (codes {codes})")
        ok, payload = ask(aws.CREATE_FROM_CSR, aws.encode_create_from_csr(csr))
        if not ok:
            r = aws.decode_service_rejection(payload)
            raise RenewalError("csr_refused", f"CreateCertificateFromCsr refused ({r.status_code} {r.error_code})")
        created = aws.decode_certificate_created(payload)
        params = {aws.RENEWAL_ID_PARAM: request_id, aws.RENEWAL_PROOF_PARAM: base64.b64encode(proof).decode()}
        ok, payload = ask(provision, aws.encode_register_thing(created.ownership_token, params))
        if not ok:
            r = aws.decode_service_rejection(payload)
            raise RenewalError("renewal_refused", f"RegisterThing refused ({r.status_code} {r.error_code}): "
                               f"{r.error_message or 'the provisioning hook did not allow it'}")  # fmt: skip
        if aws.decode_thing_registered(payload).thing_name != device_id:
            raise RenewalError("bad_reply", "RegisterThing named another thing")
        return created.certificate_pem

    try:
        link.connect()
        return calls()
    except RenewalError:
        raise
    except (GlucoagentError, aws.AwsMessageError) as exc:
        raise RenewalError("renewal_failed", f"AWS IoT renewal failed: {exc}") from None
    finally:
        link.disconnect()
