"""The AWS IoT Core profile's contract (docs/clouds.md "AWS IoT Core"): pure codecs, both sides side by side.

Three services, each in JSON as AWS defines it:

* **Topic limits** (AWS IoT Core quotas, "Message broker and protocol limits"): a topic of at most 256
  UTF-8 bytes and at most 7 forward slashes, not counting the 3 of a Basic Ingest prefix
  ``$aws/rules/<rule>/``; a PUBLISH payload of at most 128 KB; 100 publishes per second per connection.
  Our own topics stay ``gluco/v1/dev/<thing>/<leaf>`` (agent.wire.topics): 4 slashes.
* **Fleet provisioning by claim with a CSR** (developer guide "Fleet provisioning MQTT API";
  aws-iot-device-sdk-python-v2 ``awsiot/iotidentity.py``): ``$aws/certificates/create-from-csr/json``
  ``{certificateSigningRequest}`` -> ``/accepted`` ``{certificateId, certificatePem,
  certificateOwnershipToken}`` or ``/rejected`` ``{statusCode, errorCode, errorMessage}``; then
  ``$aws/provisioning-templates/<template>/provision/json`` ``{certificateOwnershipToken, parameters}`` ->
  ``/accepted`` ``{deviceConfiguration, thingName}`` or ``/rejected`` (same error shape).
* **Jobs** (developer guide "Jobs device MQTT API"; ``awsiot/iotjobs.py``): ``$aws/things/<thing>/jobs/
  notify-next`` ``{execution?, timestamp}`` (no ``execution``: nothing pending), ``start-next``
  ``{clientToken, statusDetails}`` -> ``start-next/accepted`` ``{execution?, clientToken, timestamp}``,
  ``<jobId>/update`` ``{status, expectedVersion, statusDetails, clientToken}`` -> ``<jobId>/update/accepted``
  ``{executionState: {status, versionNumber, statusDetails}, clientToken, timestamp}``; refusals on
  ``…/rejected`` ``{code, message, clientToken, executionState?, timestamp}``.

Our signed command (COSE_Sign1, agent.wire.command) rides in the job document as base64 under
``{"glucoagent": {"v": 1, "command": …}}``: the job is only the transport, the box verifies the
command exactly as on our own broker.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from agent.errors import GlucoagentError
from agent.wire import topics
from agent.wire.profiles import ACK, REQUEST, UNKNOWN, CloudProfile, Inbound

# --- limits (AWS IoT Core endpoints and quotas: message broker and protocol limits) -----------------------
MAX_PAYLOAD_BYTES = 131_072  # "Message size": 128 KB per PUBLISH payload
MAX_TOPIC_BYTES = 256  # "Topic size": UTF-8 bytes of a topic name
MAX_TOPIC_SLASHES = 7  # "Maximum number of slashes in topic and topic filter"
MAX_PUBLISH_PER_S = 100  # "Publish requests per second per connection" (not adjustable)
KEEPALIVE_MIN_S, KEEPALIVE_MAX_S = 30, 1200  # "Keep-alive period": smaller values are raised to 30
MAX_SUBSCRIPTIONS_PER_SUBSCRIBE = 8  # "Maximum subscriptions per subscribe request"
BASIC_INGEST_PREFIX = re.compile(r"^\$aws/rules/[^/]+/")  # its 3 slashes are not counted

# --- names -------------------------------------------------------------------------------------------------
TEMPLATE_RE = re.compile(r"^[0-9A-Za-z_-]{1,36}$")  # CreateProvisioningTemplate templateName
THING_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")  # CreateThing thingName
JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # CreateJob jobId
CREATE_FROM_CSR = "$aws/certificates/create-from-csr/json"
DEFAULT_TEMPLATE = "GlucoagentFleet"  # the provisioning template's name a clinic creates (docs/clouds.md)
# The template's parameters (RegisterThing ``parameters``) and ``deviceConfiguration`` entries: the box sends
# the first three, the pre-provisioning hook overrides the thing name; the configuration carries our keys.
TOKEN_PARAM, PATIENT_PARAM, SERIAL_PARAM, THING_PARAM = "EnrolmentToken", "PatientRef", "SerialNumber", "ThingName"
# A renewal's RegisterThing (agent/identity/aws_renewal.py) carries, in place of the token, the request id and
# the proof signed with the thing's current key (agent/wire/renewal.py ``sign_recovery``, base64): our hook
# checks it and names the same thing, so the new certificate is attached to it.
RENEWAL_ID_PARAM, RENEWAL_PROOF_PARAM = "RenewalId", "RenewalProof"
COMMAND_KEY_CONFIG, RELEASE_KEY_CONFIG = "CommandKey", "ReleaseKey"
HOOK_REFUSED = (403, "AccessDenied")  # RegisterThing refused because the pre-provisioning hook said no
DOCUMENT_KEY = "glucoagent"  # our part of a job document


class AwsMessageError(GlucoagentError):
    """A message of an AWS service that does not have the documented shape."""

    exit_code = 50


def topic_problem(topic: str) -> str | None:
    """Why AWS IoT Core refuses this topic name or filter, or None when it accepts it."""
    size = len(topic.encode())
    if size == 0 or size > MAX_TOPIC_BYTES:
        return f"topic is {size} bytes (AWS IoT Core allows 1..{MAX_TOPIC_BYTES})"
    counted = BASIC_INGEST_PREFIX.sub("", topic, count=1)
    slashes = counted.count("/")
    if slashes > MAX_TOPIC_SLASHES:
        return f"topic has {slashes} slashes (AWS IoT Core allows {MAX_TOPIC_SLASHES})"
    return None


def accepted(topic: str) -> str:
    return f"{topic}/accepted"


def rejected(topic: str) -> str:
    return f"{topic}/rejected"


def provision_topic(template: str) -> str:
    if not TEMPLATE_RE.match(template):
        raise ValueError(f"invalid provisioning template name: {template!r}")
    return f"$aws/provisioning-templates/{template}/provision/json"


def _load(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AwsMessageError(f"{what}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AwsMessageError(f"{what}: not a JSON object")
    return obj


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _str(obj: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not value and not optional):
        raise AwsMessageError(f"{what}: {key} missing or not a string")
    return value


def _int(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AwsMessageError(f"{what}: {key} missing or not an integer")
    return value


# --- fleet provisioning ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class CertificateCreated:
    certificate_id: str
    certificate_pem: bytes
    ownership_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class ThingRegistered:
    thing_name: str
    device_configuration: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceRejection:
    """Fleet provisioning's ErrorResponse (iotidentity.py): an HTTP-like status and AWS's error code."""

    status_code: int
    error_code: str
    error_message: str


def encode_create_from_csr(csr_pem: bytes) -> bytes:
    return _dump({"certificateSigningRequest": csr_pem.decode()})


def decode_create_from_csr(payload: bytes) -> bytes:
    return _str(
        _load(payload, "CreateCertificateFromCsr"), "certificateSigningRequest", "CreateCertificateFromCsr"
    ).encode()


def encode_certificate_created(created: CertificateCreated) -> bytes:
    return _dump(
        {
            "certificateId": created.certificate_id,
            "certificatePem": created.certificate_pem.decode(),
            "certificateOwnershipToken": created.ownership_token,
        }
    )


def decode_certificate_created(payload: bytes) -> CertificateCreated:
    what = "CreateCertificateFromCsr accepted"
    obj = _load(payload, what)
    pem = _str(obj, "certificatePem", what)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise AwsMessageError(f"{what}: certificatePem is not a PEM certificate")
    return CertificateCreated(
        _str(obj, "certificateId", what), pem.encode(), _str(obj, "certificateOwnershipToken", what)
    )


def encode_register_thing(ownership_token: str, parameters: Mapping[str, str]) -> bytes:
    return _dump({"certificateOwnershipToken": ownership_token, "parameters": dict(parameters)})


def decode_register_thing(payload: bytes) -> tuple[str, dict[str, str]]:
    what = "RegisterThing"
    obj = _load(payload, what)
    params = obj.get("parameters", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise AwsMessageError(f"{what}: parameters must map strings to strings")
    return _str(obj, "certificateOwnershipToken", what), params


def encode_thing_registered(registered: ThingRegistered) -> bytes:
    return _dump({"thingName": registered.thing_name, "deviceConfiguration": dict(registered.device_configuration)})


def decode_thing_registered(payload: bytes) -> ThingRegistered:
    what = "RegisterThing accepted"
    obj = _load(payload, what)
    thing = _str(obj, "thingName", what)
    if not THING_RE.match(thing):
        raise AwsMessageError(f"{what}: thingName {thing!r} is not a thing name")
    config = obj.get("deviceConfiguration", {})
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
        raise AwsMessageError(f"{what}: deviceConfiguration must map strings to strings")
    return ThingRegistered(thing, config)


def encode_service_rejection(rejection: ServiceRejection) -> bytes:
    return _dump(
        {
            "statusCode": rejection.status_code,
            "errorCode": rejection.error_code,
            "errorMessage": rejection.error_message,
        }
    )


def decode_service_rejection(payload: bytes) -> ServiceRejection:
    what = "fleet provisioning rejection"
    obj = _load(payload, what)
    return ServiceRejection(
        _int(obj, "statusCode", what), _str(obj, "errorCode", what), _str(obj, "errorMessage", what, optional=True)
    )


# --- jobs --------------------------------------------------------------------------------------------------
QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED"
REJECTED, CANCELED, TIMED_OUT, REMOVED = "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED"
TERMINAL = frozenset({SUCCEEDED, FAILED, REJECTED, CANCELED, TIMED_OUT, REMOVED})
DEVICE_SETTABLE = frozenset({IN_PROGRESS, SUCCEEDED, FAILED, REJECTED})  # UpdateJobExecution status values
# RejectedErrorCode (iotjobs.py)
INVALID_TOPIC, INVALID_JSON, INVALID_REQUEST = "InvalidTopic", "InvalidJson", "InvalidRequest"
INVALID_STATE_TRANSITION, RESOURCE_NOT_FOUND = "InvalidStateTransition", "ResourceNotFound"
VERSION_MISMATCH, TERMINAL_STATE_REACHED = "VersionMismatch", "TerminalStateReached"
INTERNAL_ERROR, REQUEST_THROTTLED = "InternalError", "RequestThrottled"


@dataclasses.dataclass(frozen=True, slots=True)
class JobsTopics:
    """A thing's Jobs topics; the device publishes to start-next and <job>/update, reads the rest."""

    thing: str

    def __post_init__(self) -> None:
        if not THING_RE.match(self.thing):
            raise ValueError(f"invalid thing name: {self.thing!r}")

    @property
    def base(self) -> str:
        return f"$aws/things/{self.thing}/jobs"

    @property
    def notify_next(self) -> str:
        return f"{self.base}/notify-next"

    @property
    def start_next(self) -> str:
        return f"{self.base}/start-next"

    def update(self, job_id: str) -> str:
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"invalid job id: {job_id!r}")
        return f"{self.base}/{job_id}/update"

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """What a device subscribes to (3 filters, one SUBSCRIBE: AWS allows 8 per request)."""
        return (self.notify_next, f"{self.start_next}/+", f"{self.base}/+/update/+")

    def classify(self, topic: str) -> tuple[str, str] | None:
        """(kind, job id) of a Jobs reply to this thing: kind is notify-next, start-next/accepted,
        start-next/rejected, update/accepted or update/rejected; None for any other topic."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        if rest == ["notify-next"]:
            return "notify-next", ""
        if len(rest) == 2 and rest[0] == "start-next" and rest[1] in ("accepted", "rejected"):
            return f"start-next/{rest[1]}", ""
        if len(rest) == 3 and JOB_ID_RE.match(rest[0]) and rest[1] == "update" and rest[2] in ("accepted", "rejected"):
            return f"update/{rest[2]}", rest[0]
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class JobExecution:
    """JobExecutionData (iotjobs.py), the fields the box needs."""

    job_id: str
    status: str
    version_number: int
    execution_number: int
    document: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class JobUpdate:
    """UpdateJobExecutionRequest as the service reads it."""

    status: str
    expected_version: int | None
    status_details: Mapping[str, str]
    client_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class JobsRejection:
    """RejectedError (iotjobs.py)."""

    code: str
    message: str
    client_token: str = ""
    status: str = ""  # executionState.status when the service sent one
    version_number: int | None = None


def _details(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    details = obj.get("statusDetails", {})
    if not isinstance(details, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in details.items()):
        raise AwsMessageError(f"{what}: statusDetails must map strings to strings")
    return details


def execution_to_json(execution: JobExecution, thing: str, now: int) -> dict[str, Any]:
    return {
        "jobId": execution.job_id,
        "thingName": thing,
        "jobDocument": dict(execution.document),
        "status": execution.status,
        "queuedAt": now,
        "lastUpdatedAt": now,
        "versionNumber": execution.version_number,
        "executionNumber": execution.execution_number,
    }


def _execution(obj: Mapping[str, Any], what: str) -> JobExecution | None:
    raw = obj.get("execution")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AwsMessageError(f"{what}: execution is not an object")
    job_id = _str(raw, "jobId", what)
    if not JOB_ID_RE.match(job_id):
        raise AwsMessageError(f"{what}: jobId {job_id!r} is not a job id")
    document = raw.get("jobDocument", {})
    if not isinstance(document, dict):
        raise AwsMessageError(f"{what}: jobDocument is not an object")
    return JobExecution(
        job_id,
        _str(raw, "status", what),
        _int(raw, "versionNumber", what),
        _int(raw, "executionNumber", what),
        document,
    )


def encode_next_changed(execution: JobExecution | None, thing: str, now: int) -> bytes:
    """NextJobExecutionChangedEvent: without ``execution`` when nothing is pending any more."""
    body: dict[str, Any] = {"timestamp": now}
    if execution is not None:
        body["execution"] = execution_to_json(execution, thing, now)
    return _dump(body)


def decode_next_changed(payload: bytes) -> JobExecution | None:
    return _execution(_load(payload, "notify-next"), "notify-next")


def encode_start_next(client_token: str, status_details: Mapping[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {"clientToken": client_token}
    if status_details:
        body["statusDetails"] = dict(status_details)
    return _dump(body)


def decode_start_next(payload: bytes) -> tuple[str, dict[str, str]]:
    obj = _load(payload, "StartNextPendingJobExecution")
    return _str(obj, "clientToken", "StartNextPendingJobExecution", optional=True), _details(
        obj, "StartNextPendingJobExecution"
    )


def encode_start_next_accepted(execution: JobExecution | None, thing: str, client_token: str, now: int) -> bytes:
    body: dict[str, Any] = {"clientToken": client_token, "timestamp": now}
    if execution is not None:
        body["execution"] = execution_to_json(execution, thing, now)
    return _dump(body)


def decode_start_next_accepted(payload: bytes) -> tuple[JobExecution | None, str]:
    what = "start-next accepted"
    obj = _load(payload, what)
    return _execution(obj, what), _str(obj, "clientToken", what, optional=True)


def encode_update(
    status: str, expected_version: int | None, status_details: Mapping[str, str], client_token: str
) -> bytes:
    if status not in DEVICE_SETTABLE:
        raise ValueError(f"a device cannot set a job execution to {status}")
    body: dict[str, Any] = {"status": status, "statusDetails": dict(status_details), "clientToken": client_token}
    if expected_version is not None:
        body["expectedVersion"] = expected_version
    return _dump(body)


def decode_update(payload: bytes) -> JobUpdate:
    what = "UpdateJobExecution"
    obj = _load(payload, what)
    version = obj.get("expectedVersion")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise AwsMessageError(f"{what}: expectedVersion is not an integer")
    return JobUpdate(
        _str(obj, "status", what), version, _details(obj, what), _str(obj, "clientToken", what, optional=True)
    )


def encode_update_accepted(status: str, version: int, details: Mapping[str, str], client_token: str, now: int) -> bytes:
    state = {"status": status, "statusDetails": dict(details), "versionNumber": version}
    return _dump({"executionState": state, "clientToken": client_token, "timestamp": now})


def decode_update_accepted(payload: bytes) -> tuple[str, int, str]:
    """(status, version number, client token) of UpdateJobExecutionResponse."""
    what = "update accepted"
    obj = _load(payload, what)
    state = obj.get("executionState")
    if not isinstance(state, dict):
        raise AwsMessageError(f"{what}: executionState missing")
    return (
        _str(state, "status", what),
        _int(state, "versionNumber", what),
        _str(obj, "clientToken", what, optional=True),
    )


def encode_jobs_rejection(rejection: JobsRejection, now: int) -> bytes:
    body: dict[str, Any] = {"code": rejection.code, "message": rejection.message, "timestamp": now}
    if rejection.client_token:
        body["clientToken"] = rejection.client_token
    if rejection.status:
        body["executionState"] = {"status": rejection.status, "versionNumber": rejection.version_number}
    return _dump(body)


def decode_jobs_rejection(payload: bytes) -> JobsRejection:
    what = "jobs rejection"
    obj = _load(payload, what)
    state = obj.get("executionState")
    status: str = ""
    version: int | None = None
    if isinstance(state, dict):
        raw_status, raw_version = state.get("status"), state.get("versionNumber")
        status = raw_status if isinstance(raw_status, str) else ""
        version = raw_version if isinstance(raw_version, int) else None
    return JobsRejection(_str(obj, "code", what), _str(obj, "message", what, optional=True),
                         _str(obj, "clientToken", what, optional=True), status, version)  # fmt: skip


# --- our command in a job document -------------------------------------------------------------------------
def command_document(command: bytes) -> dict[str, Any]:
    """The job document that carries one signed command (the cloud's CreateJob ``document``)."""
    return {DOCUMENT_KEY: {"v": 1, "command": base64.b64encode(command).decode()}}


def command_of(document: Mapping[str, Any]) -> bytes:
    """The signed command bytes a job document carries; the signature is checked by agent.wire.inbound."""
    ours = document.get(DOCUMENT_KEY)
    if not isinstance(ours, dict) or ours.get("v") != 1 or not isinstance(ours.get("command"), str):
        raise AwsMessageError("job document: no glucoagent command in it")
    try:
        return base64.b64decode(ours["command"], validate=True)
    except (binascii.Error, ValueError):
        raise AwsMessageError("job document: command is not base64") from None


# --- the box's profile (agent/wire/profiles.py) --------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class AwsProfile(CloudProfile):
    """AWS IoT Core: our topics under the thing name (= device id = client id), MQTT 5 (SNI is the TLS
    layer's: the endpoint's host name), commands as Jobs (agent/link/aws_jobs.py), AWS's limits."""

    name: ClassVar[str] = "aws"
    status_messages: ClassVar[bool] = True  # retained messages and the last will are supported
    side_connections: ClassVar[bool] = True  # <thing>-check, -update, -renew: own client ids the policy admits
    enrolment: ClassVar[str] = "aws-fleet"  # agent/identity/aws_provisioning.py
    max_keepalive: ClassVar[int | None] = KEEPALIVE_MAX_S
    max_message: ClassVar[int | None] = MAX_PAYLOAD_BYTES
    # Uploads at most half the connection's quota: results, Jobs requests and the time request share it.
    max_publish_rate: ClassVar[float | None] = MAX_PUBLISH_PER_S / 2
    key_type: ClassVar[str] = "p256"  # AWS IoT signs RSA and ECDSA keys, not Ed25519
    aws_template: str = DEFAULT_TEMPLATE  # mqtt.aws_template: the fleet provisioning template's name

    def __post_init__(self) -> None:
        if not TEMPLATE_RE.match(self.aws_template):
            raise ValueError(f"mqtt.aws_template: {self.aws_template!r} is not a provisioning template name")

    def protocol(self, configured: str) -> str:
        return "mqttv5"

    def keepalive(self, configured: int) -> int:
        """AWS raises a keepalive below 30 s to 30 and caps it at 1200 ("Keep-alive period")."""
        return max(KEEPALIVE_MIN_S, min(configured, KEEPALIVE_MAX_S))

    def subscriptions(self, device_id: str) -> list[str]:
        return [topics.DeviceTopics(device_id).acks, *JobsTopics(device_id).subscriptions]

    def classify(self, device_id: str, topic: str, payload: bytes) -> Inbound:
        if topic == topics.DeviceTopics(device_id).acks:
            return Inbound(ACK, payload)
        if JobsTopics(device_id).classify(topic) is not None:
            return Inbound(REQUEST, payload)  # the Jobs bridge took it before classification (agent/link/aws_jobs.py)
        return Inbound(UNKNOWN, payload, note=f"message on unexpected topic {topic}")
