"""The reference cloud on AWS IoT Core (docs/clouds.md "AWS IoT Core"): what runs on our side of it.

* ``pre_provisioning_hook``: the provisioning template's pre-provisioning hook (a Lambda in a clinic's
  account, developer guide "Pre-provisioning hooks"): its input is AWS's JSON (``certificatePem``,
  ``parameters`` of RegisterThing, …), its output ``{"allowProvisioning", "parameterOverrides"}``. It is our
  claim-path check, the same one ``backend/provisioning.py`` runs on our own broker: the token (single use,
  unexpired, issued for this patient) and the patient binding; on success the device is enrolled in our
  database and the thing is named after the device id derived from the certificate's key.
* ``send_command_as_job``: a signed command becomes an AWS IoT Job for the thing (the CreateJob API, AWS IoT
  API reference: ``jobId``, ``targets``, ``document``); the job id is the command id, so CreateJob refuses a
  second job for one command and the box's journal refuses a second run.

Ingest and acks need nothing of their own: the topic rule (or, in the fake, a ``backend-`` subscription)
delivers ``gluco/v1/dev/<thing>/telemetry`` and the results as our broker does, and the signed acks go to
``gluco/v1/dev/<thing>/acks``, which the device policy lets the thing read.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.wire import aws as wire_aws
from agent.wire import cose, topics
from agent.wire import provisioning as wire_provisioning
from agent.wire import renewal as wire_renewal
from agent.wire.profiles import Publish
from backend.clouds.adapter import CloudAdapter
from backend.commands import device_key_lookup, key_in_good_standing
from backend.db import BackendDb
from backend.provisioning import ProvisioningMixin

log = logging.getLogger(__name__)


def pre_provisioning_hook(db: BackendDb, event: Mapping[str, Any]) -> dict[str, Any]:
    """The hook's answer to one RegisterThing (AWS's input and output shapes)."""
    params = event.get("parameters") or {}
    token, patient = str(params.get(wire_aws.TOKEN_PARAM, "")), str(params.get(wire_aws.PATIENT_PARAM, ""))
    try:
        cert = x509.load_pem_x509_certificate(str(event.get("certificatePem", "")).encode())
    except ValueError:
        log.warning("pre-provisioning hook: no readable certificate in the request")
        return {"allowProvisioning": False}
    public_key = cert.public_key()
    # AWS IoT Core signs RSA and ECDSA keys only ("X.509 client certificates"); ours are P-256 there.
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
        log.warning("pre-provisioning hook: certificate key is not EC P-256")
        return {"allowProvisioning": False}
    if params.get(wire_aws.RENEWAL_PROOF_PARAM):
        return _renewal(db, params, cert)
    device_id = wire_provisioning.device_id_for(public_key)
    kid = cose.key_id(public_key)
    now = time.time()
    with db.tx() as tx:
        refusal = ProvisioningMixin._check_binding(tx, device_id, patient)
        refusal = refusal or ProvisioningMixin._check_token(tx, token, patient, device_id, now)
        if refusal is None:
            BackendDb.enrol_device(
                tx, token=token, device_id=device_id, patient=patient, hw_serial=str(params.get(wire_aws.SERIAL_PARAM, "")),
                kid=kid, cert_pem=cert.public_bytes(Encoding.PEM), now=now,
            )  # fmt: skip
    if refusal is not None:
        log.warning("pre-provisioning hook refused %s: %s (%s)", device_id, *refusal)
        db.bump(f"provision_{refusal[0]}")
        return {"allowProvisioning": False}
    log.info("pre-provisioning hook: %s enrolled", device_id)
    db.bump("provisioned")
    return {"allowProvisioning": True, "parameterOverrides": {wire_aws.THING_PARAM: device_id}}


def _renewal(db: BackendDb, params: Mapping[str, Any], cert: x509.Certificate) -> dict[str, Any]:
    """A thing renewing its certificate (agent/identity/aws_renewal.py): no token, but the new key's CSR signed
    with a key registered for the thing (the re-enrolment proof of agent/wire/renewal.py). The new certificate
    must carry that CSR's key; its key is registered for the same device, the same thing is named."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    try:
        signed = base64.b64decode(str(params.get(wire_aws.RENEWAL_PROOF_PARAM, "")), validate=True)
        device_id = wire_renewal.claimed_device(signed)
        request = wire_renewal.decode_recovery(
            signed, str(params.get(wire_aws.RENEWAL_ID_PARAM, "")), device_key_lookup(db, device_id)
        )
        csr_key = x509.load_pem_x509_csr(request.csr_pem).public_key()
    except (wire_renewal.RecoveryRefused, ValueError, binascii.Error) as exc:
        log.warning("pre-provisioning hook: renewal refused: %s", exc)
        return {"allowProvisioning": False}
    # On AWS the certificates are AWS's: revoking is deactivating them there, not our CRL.
    why = key_in_good_standing(db, device_id, request.kid, frozenset())
    if why is None and csr_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != spki:
        why = "the certificate is not for the key of the signed CSR"
    if why is not None:
        log.warning("pre-provisioning hook: renewal of %s refused: %s", device_id, why)
        db.bump("renewal_refused")
        return {"allowProvisioning": False}
    db.add_key(kid=cose.key_id(cert.public_key()), device_id=device_id,  # type: ignore[arg-type]
               cert_pem=cert.public_bytes(Encoding.PEM), now=time.time())  # fmt: skip
    log.info("pre-provisioning hook: %s renews its certificate", device_id)
    db.bump("renewed")
    return {"allowProvisioning": True, "parameterOverrides": {wire_aws.THING_PARAM: device_id}}


# The bridge to AWS's control plane (as backend/clouds/azure.py's to the hub's service API): our service, on its
# broker, publishes CreateJob's arguments; the bridge (in the clinic's account, with its credentials) calls
# CreateJob (jobId = command id, targets = the thing's ARN, document). Not in this repository; the fake plays it.
CREATE_JOB = "aws-bridge/create-job"  # aws-bridge/create-job/<thing>/<job id>, payload: the job document (JSON)


def create_job_topic(thing: str, job_id: str) -> str:
    return f"{CREATE_JOB}/{thing}/{job_id}"


class JobsApi(Protocol):
    """The part of the AWS IoT control plane we call (CreateJob); the fake in testbed/clouds implements it."""

    def create_job(self, thing: str, job_id: str, document: Mapping[str, Any]) -> None: ...


def send_command_as_job(api: JobsApi, device_id: str, cmd_id: str, envelope: bytes) -> None:
    """One signed command as one job for one thing (``targets`` = that thing's ARN on AWS)."""
    if not wire_aws.JOB_ID_RE.match(cmd_id):
        raise ValueError(f"command id {cmd_id!r} is not a job id")
    api.create_job(device_id, cmd_id, wire_aws.command_document(envelope))


class AwsAdapter(CloudAdapter):
    """Our service behind AWS IoT Core: the same topics under the thing name (the topic rule delivers them),
    acks at once (AWS does not throttle messages to a thing below its 100/s), no provisioning requests of
    ours (fleet provisioning and the hook replace them). Commands do not travel as messages here:
    ``send_command_as_job``; a renewal's certificate delivery has no way to the box on AWS (docs/clouds.md)."""

    name: ClassVar[str] = "aws"

    def command(self, device_id: str, cmd_id: str, envelope: bytes, ttl_s: float | None = None) -> Publish:
        """The command as a job: CreateJob's request for the bridge (``create_job_topic``), which holds the
        clinic's AWS credentials; the signed command's own expiry bounds it, not ``ttl_s``."""
        if not wire_aws.JOB_ID_RE.match(cmd_id) or not wire_aws.THING_RE.match(device_id):
            raise ValueError(f"command id {cmd_id!r} or thing {device_id!r} cannot name a job")
        return Publish(create_job_topic(device_id, cmd_id), json.dumps(wire_aws.command_document(envelope)).encode())

    def control_topics(self) -> list[str]:
        return [t for t in super().control_topics() if t != topics.ALL_PROVISION_REQUESTS]
