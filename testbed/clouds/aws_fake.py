"""A fake AWS IoT Core for the tests: mosquitto with AWS's rules, plus the services AWS runs behind it.

Neither AWS nor anyone else ships an offline emulator of IoT Core's MQTT surface, so this holds the part of
the documented contract the box meets, each rule with its source:

* **Broker** (``AwsBroker``, our mosquitto and auth plugin with AWS's numbers):
  - 128 KB payload, 256-byte topics, at most 7 slashes (a ``$aws/rules/<rule>/`` prefix not counted), 100
    publishes per second per connection: AWS General Reference, "AWS IoT Core endpoints and quotas",
    message broker and protocol limits; the AWS SDKs' own client-side checks say the same
    (aws-iot-device-sdk-js-v2 ``ClientExtendedValidationAndFlowControl.AwsIotCoreDefaults``: 7 slashes, 256
    bytes, 100 TPS). Beyond the rate, the quota page says the excess publishes are throttled (not
    delivered); the connection stays. The plugin refuses such a PUBLISH (MQTT 5: PUBACK 0x87, where AWS's
    reason code may differ: its reason-code table is not specific; MQTT 3.1.1: PUBACK, message dropped).
  - QoS 2 refused: developer guide "MQTT", "AWS IoT differences from MQTT specifications" (QoS 0 and 1 only)
    and "MQTT 5 supported features" (CONNACK Maximum QoS 1): ``max_qos 1``, so an MQTT 5 client is told in
    CONNACK and a QoS 2 PUBLISH ends the connection (DISCONNECT 0x9B), a QoS 2 SUBSCRIBE is granted QoS 1.
  - keepalive: the developer guide's "Keep-alive period" is 30..1200 s; ``max_keepalive 1200`` gives an
    MQTT 5 client a larger one back as Server Keep Alive. AWS raises a keepalive below 30 s to 30; mosquitto
    cannot, so the agent's AWS profile never asks for less (docs/clouds.md).
  - persistent sessions expire after 1 hour by default (developer guide "MQTT persistent sessions"):
    ``persistent_client_expiration 1h``; which is why commands travel as Jobs, not as queued messages.
  - retained messages are supported (developer guide "MQTT retained messages"); mosquitto keeps them. AWS's
    retained-message quotas (per account, per topic and second) are not modelled: a box retains one small
    status message.
  - the claim certificate reaches only the fleet-provisioning topics, as the claim policy in AWS's fleet
    provisioning guide and aws-iot-device-client's ``source/fleetprovisioning/README.md`` confine it; a
    provisioned thing reaches its own ``gluco/v1/dev/<thing>/…`` topics and its own
    ``$aws/things/<thing>/jobs/…`` (the device policy with ``${iot:Connection.Thing.ThingName}``). The
    thing attached to a certificate is modelled by the certificate's CN (our plugin binds client id = CN).
* **SNI** (``SniGate``): "Transport security in AWS IoT Core" and the developer guide's "MQTT" page:
  clients must send the Server Name Indication extension, the endpoint's host name; a TLS ClientHello
  without it (or with another name) is reset before it reaches the broker.
* **Fleet provisioning** (``AwsIotCore``): developer guide "Fleet provisioning MQTT API"; field names as
  aws-iot-device-sdk-python-v2 ``awsiot/iotidentity.py``. CreateCertificateFromCsr signs the CSR (our fleet
  CA stands in for AWS's), RegisterThing calls the template's **pre-provisioning hook** and refuses with
  ``{"statusCode": 403, "errorCode": "AccessDenied", …}`` when it says no. AWS answers only the connection
  that asked; mosquitto cannot, so every claim connection subscribed may see a reply (the box ignores a
  certificate that is not for its key). The same two calls from a thing's own certificate renew it (the
  device policy allows them, docs/clouds.md): "Device provisioning MQTT API" lets any principal whose
  policy allows the topics call them, and RegisterThing with the ownership token attaches the new
  certificate to the thing the template (after our hook) names. The thing attached is modelled by the CN,
  so a CSR naming a thing (CN) gets a certificate with that CN; AWS keeps it PENDING_ACTIVATION until
  RegisterThing, which the fake does not model (see docs/clouds.md, "The fake").
* **Jobs** (``AwsIotCore``): developer guide "Jobs device MQTT API" and ``awsiot/iotjobs.py``; queued
  executions per thing (kept in ``jobs.json``, they outlive the thing's sessions), ``notify-next`` when the
  next pending execution changes (not on subscribe: a device asks ``start-next`` once subscribed, as
  aws-iot-device-client's ``JobsFeature::runJobs`` does), ``start-next``, ``<jobId>/update`` with ``expectedVersion`` and terminal
  states, refusals in RejectedError's shape with its codes.
* **Control plane**: ``create_job`` stands for the CreateJob API (AWS IoT API reference), called in process or
  as the bridge does for `glucoagent-backend command --cloud aws` (``aws-bridge/create-job/<thing>/<job id>``,
  backend/aws.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent.wire import aws
from agent.wire import topics as wire_topics
from agent.wire.provisioning import device_id_for
from backend.aws import CREATE_JOB, pre_provisioning_hook, send_command_as_job
from backend.broker import Broker
from backend.broker_config import ACL_FILE, CONTROL_TOPIC, DEVICE_READ, DEVICE_WRITE, broker_account, install_file
from backend.mqtt_client import tls_client
from backend.pki import BACKEND_CN, CLAIM_CN, FleetPki
from testbed.faultproxy import TcpProxy
from testbed.harness import LocalSystem, device_config

log = logging.getLogger(__name__)

TEMPLATE = aws.DEFAULT_TEMPLATE
HOST = "localhost"  # the endpoint host the agent must name in SNI (the broker's certificate names it)
Hook = Callable[[Mapping[str, Any]], Mapping[str, Any]]


# --- the broker ----------------------------------------------------------------------------------------------
def aws_acl(template: str = TEMPLATE) -> str:
    """The claim policy, the device policy and the services' access, as a mosquitto acl_file."""
    dev = f"{wire_topics.PREFIX}/dev/%u"
    jobs = "$aws/things/%u/jobs"
    provision = aws.provision_topic(template)
    return "\n".join(
        [
            "# generated by testbed/clouds/aws_fake.py: AWS IoT Core's policies as mosquitto ACLs",
            f"user {BACKEND_CN}",  # AWS's own services, and the topic rule that delivers to our backend
            f"topic readwrite {wire_topics.PREFIX}/#",
            "topic readwrite $aws/#",
            f"topic write {CONTROL_TOPIC}",
            "topic readwrite aws-bridge/#",  # our service to the control-plane bridge (backend/aws.py)
            "",
            f"user {CLAIM_CN}",  # the claim policy: fleet provisioning topics only
            f"topic deny {wire_topics.PREFIX}/#",
            "topic deny $aws/things/#",
            f"topic write {aws.CREATE_FROM_CSR}",
            f"topic read {aws.CREATE_FROM_CSR}/+",
            f"topic write {provision}",
            f"topic read {provision}/+",
            "",
            "# the device policy: a thing's own topics (CN = thing name)",
            *(f"pattern write {dev}/{leaf}" for leaf in DEVICE_WRITE),
            *(f"pattern read {dev}/{leaf}" for leaf in DEVICE_READ if leaf != wire_topics.COMMANDS),  # commands: Jobs
            # the device policy's renewal grant: fleet provisioning's two calls on the thing's own connection
            f"pattern write {aws.CREATE_FROM_CSR}",
            f"pattern read {aws.CREATE_FROM_CSR}/+",
            f"pattern write {provision}",
            f"pattern read {provision}/+",
            f"pattern write {jobs}/start-next",
            f"pattern read {jobs}/start-next/+",
            f"pattern read {jobs}/notify-next",
            f"pattern write {jobs}/+/update",
            f"pattern read {jobs}/+/update/+",
            "",
        ]
    )


def aws_conf(publish_rate: int = aws.MAX_PUBLISH_PER_S) -> tuple[str, ...]:
    """mosquitto.conf lines for AWS's rules; ``publish_rate`` lower than AWS's only to provoke the throttle."""
    return (
        "max_qos 1",
        "max_keepalive 1200",
        "persistent_client_expiration 1h",
        f"plugin_opt_max_payload {aws.MAX_PAYLOAD_BYTES}",
        f"plugin_opt_max_topic_bytes {aws.MAX_TOPIC_BYTES}",
        f"plugin_opt_max_topic_slashes {aws.MAX_TOPIC_SLASHES}",
        f"plugin_opt_max_publish_rate {publish_rate}",
    )


class AwsBroker(Broker):
    """Our mosquitto with AWS IoT Core's limits and policies (see the module docstring)."""

    def __init__(
        self,
        pki: FleetPki,
        run_dir: Path,
        *,
        template: str = TEMPLATE,
        publish_rate: int = aws.MAX_PUBLISH_PER_S,
        extra_conf: Sequence[str] = (),
        **kw: Any,
    ) -> None:
        super().__init__(pki, run_dir, extra_conf=(*aws_conf(publish_rate), *extra_conf), **kw)
        self.template = template

    def _write_files(self) -> None:
        super()._write_files()
        install_file(self.run_dir / ACL_FILE, aws_acl(self.template).encode(), 0o644, broker_account())


# --- SNI -----------------------------------------------------------------------------------------------------
def client_hello_sni(sock: socket.socket, timeout_s: float = 3.0) -> str | None:
    """The server name in the TLS ClientHello waiting on ``sock`` (peeked, not consumed); None without one."""
    sock.settimeout(timeout_s)
    try:
        deadline = time.monotonic() + timeout_s
        data = b""
        while time.monotonic() < deadline:
            data = sock.recv(16_384, socket.MSG_PEEK)
            if len(data) >= 5 and len(data) >= 5 + struct.unpack("!H", data[3:5])[0]:
                break
            if not data:
                return None
            time.sleep(0.01)
        return _parse_sni(data)
    except (OSError, struct.error, IndexError):
        return None
    finally:
        sock.settimeout(None)


def _parse_sni(data: bytes) -> str | None:
    if len(data) < 9 or data[0] != 0x16 or data[5] != 0x01:  # handshake record, ClientHello
        return None
    i = 9 + 2 + 32  # record header, handshake header, client version, random
    i += 1 + data[i]  # session id
    i += 2 + struct.unpack("!H", data[i : i + 2])[0]  # cipher suites
    i += 1 + data[i]  # compression methods
    end = i + 2 + struct.unpack("!H", data[i : i + 2])[0]
    i += 2
    while i + 4 <= end:
        ext_type, ext_len = struct.unpack("!HH", data[i : i + 4])
        if ext_type == 0:  # server_name: list length, name type 0 (host_name), name length, name
            name_len = struct.unpack("!H", data[i + 7 : i + 9])[0]
            return data[i + 9 : i + 9 + name_len].decode("ascii", "replace")
        i += 4 + ext_len
    return None


class SniGate(TcpProxy):
    """The endpoint in front of the broker: a connection whose ClientHello names no host, or another one,
    is reset (AWS requires SNI = the endpoint's host name). Also a fault proxy (cuts, black hole, flapping)."""

    def __init__(self, target_port: int, host: str = HOST, **kw: Any) -> None:
        self.host = host
        self.refused_sni: list[str | None] = []
        super().__init__(target_port, admit=self._admit, **kw)

    def _admit(self, client: socket.socket) -> bool:
        name = client_hello_sni(client)
        if name == self.host:
            return True
        self.refused_sni.append(name)
        log.info("aws fake: TLS connection without SNI %s refused (got %r)", self.host, name)
        return False


# --- the services --------------------------------------------------------------------------------------------
class AwsIotCore:
    """Fleet provisioning and Jobs behind the fake broker, over one ``backend-`` connection (AWS's own
    services sit behind the broker the same way), and the control plane's CreateJob."""

    def __init__(
        self,
        broker: Broker,
        state_dir: Path,
        hook: Hook,
        device_configuration: Callable[[], Mapping[str, str]],
        template: str = TEMPLATE,
    ) -> None:
        self.broker = broker
        self.pki = broker.pki
        self.state_dir = state_dir
        self.hook = hook
        self.cert_days = 365.0  # lifetime of the certificates it issues (tests shorten it to provoke expiry)
        self.device_configuration = device_configuration
        self.template = template
        self.provision_topic = aws.provision_topic(template)
        self.jobs_path = state_dir / "jobs.json"
        self._lock = threading.RLock()
        self._owned: dict[str, tuple[str, bytes]] = {}  # ownership token -> (certificate id, PEM)
        self._jobs: dict[str, list[dict[str, Any]]] = self._load_jobs()
        self.hook_calls: list[Mapping[str, Any]] = []
        self.drop_updates = 0  # a test's fault: this many UpdateJobExecution requests are lost on the way
        self.client: mqtt.Client | None = None
        self._ready = threading.Event()

    # --- lifecycle
    def start(self) -> AwsIotCore:
        client = tls_client(self.pki.backend, f"backend-aws-{secrets.token_hex(4)}")
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.connect(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        self.client = client
        if not self._ready.wait(15):
            raise RuntimeError("the fake AWS services could not subscribe on the broker")
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def __enter__(self) -> AwsIotCore:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: Any, _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        filters = [
            aws.CREATE_FROM_CSR,
            self.provision_topic,
            "$aws/things/+/jobs/start-next",
            "$aws/things/+/jobs/+/update",
            f"{CREATE_JOB}/+/+",  # the bridge's CreateJob requests (backend/aws.py)
        ]
        client.subscribe([(f, 1) for f in filters])
        self._ready.set()

    def _publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            if msg.topic.startswith(CREATE_JOB + "/"):  # the bridge calls CreateJob (AWS IoT API reference)
                _, _, thing, job_id = msg.topic.rsplit("/", 3)
                self.create_job(thing, job_id, json.loads(payload))
            elif msg.topic == aws.CREATE_FROM_CSR:
                self._create_from_csr(payload)
            elif msg.topic == self.provision_topic:
                self._register_thing(payload)
            else:
                parts = msg.topic.split("/")  # $aws/things/<thing>/jobs/...
                thing = parts[2]
                if parts[4:] == ["start-next"]:
                    self._start_next(thing, msg.topic, payload)
                elif len(parts) == 6 and parts[5] == "update":
                    self._update(thing, parts[4], msg.topic, payload)
        except Exception:  # a fake must not die on a bad request; the test sees the log
            log.exception("aws fake: %s", msg.topic)

    # --- fleet provisioning
    def _reject_provisioning(self, topic: str, status: int, code: str, message: str) -> None:
        self._publish(aws.rejected(topic), aws.encode_service_rejection(aws.ServiceRejection(status, code, message)))

    def _create_from_csr(self, payload: bytes) -> None:
        topic = aws.CREATE_FROM_CSR
        try:
            csr_pem = aws.decode_create_from_csr(payload)
            csr = x509.load_pem_x509_csr(csr_pem)
        except (aws.AwsMessageError, ValueError) as exc:
            # Fleet provisioning MQTT API: a malformed request is a 400 InvalidPayload
            self._reject_provisioning(topic, 400, "InvalidPayload", str(exc))
            return
        if not csr.is_signature_valid:
            self._reject_provisioning(topic, 400, "InvalidPayload", "CSR signature does not verify")
            return
        public_key = csr.public_key()
        # "X.509 client certificates": AWS IoT signs RSA and ECDSA (P-256, P-384, P-521) keys, no Ed25519
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            self._reject_provisioning(topic, 400, "InvalidCertificateSigningRequest", "unsupported key algorithm")
            return
        # The CN models the thing the certificate gets attached to: a renewing thing's CSR names it (CN); an
        # enrolling box's does not, and its thing is named after its key by our hook.
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        named = str(names[0].value) if names else ""
        pem = self.pki.sign_device_csr(
            csr_pem, named if aws.THING_RE.match(named) else device_id_for(public_key), days=self.cert_days
        )
        cert_id = hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._owned[token] = (cert_id, pem)
        self._publish(aws.accepted(topic), aws.encode_certificate_created(aws.CertificateCreated(cert_id, pem, token)))

    def _register_thing(self, payload: bytes) -> None:
        topic = self.provision_topic
        try:
            token, params = aws.decode_register_thing(payload)
        except aws.AwsMessageError as exc:
            self._reject_provisioning(topic, 400, "InvalidPayload", str(exc))
            return
        with self._lock:
            owned = self._owned.get(token)
        if owned is None:
            self._reject_provisioning(
                topic, 400, "InvalidCertificateOwnershipToken", "certificate ownership token is not valid"
            )
            return
        cert_id, pem = owned
        event = {
            "claimCertificateId": "claim",
            "certificateId": cert_id,
            "certificatePem": pem.decode(),
            "templateArn": f"arn:aws:iot:local:000000000000:provisioningtemplate/{self.template}",
            "clientId": "",
            "parameters": dict(params),
        }
        self.hook_calls.append(event)
        answer = self.hook(event)
        # "Pre-provisioning hooks": provisioning proceeds only with "allowProvisioning": true
        if answer.get("allowProvisioning") is not True:
            self._reject_provisioning(
                topic, 403, "AccessDenied", "the pre-provisioning hook did not allow provisioning"
            )
            return
        params = {**params, **dict(answer.get("parameterOverrides") or {})}
        thing = params.get(aws.THING_PARAM, "")
        if not aws.THING_RE.match(thing):
            self._reject_provisioning(topic, 400, "InvalidRequest", "the template names no valid thing")
            return
        with self._lock:
            self._owned.pop(token, None)  # an ownership token is good for one RegisterThing
        registered = aws.ThingRegistered(thing, dict(self.device_configuration()))
        self._publish(aws.accepted(topic), aws.encode_thing_registered(registered))

    # --- jobs
    def _load_jobs(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = json.loads(self.jobs_path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): list(v) for k, v in data.items()}

    def _save_jobs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.jobs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._jobs))
        os.replace(tmp, self.jobs_path)

    @staticmethod
    def _execution(row: Mapping[str, Any]) -> aws.JobExecution:
        return aws.JobExecution(
            row["jobId"], row["status"], row["versionNumber"], row["executionNumber"], row["document"]
        )

    def _next_pending(self, thing: str) -> dict[str, Any] | None:
        rows = self._jobs.get(thing, [])
        for status in (aws.IN_PROGRESS, aws.QUEUED):  # an execution in progress comes before queued ones
            for row in rows:
                if row["status"] == status:
                    return row
        return None

    def _notify_next(self, thing: str) -> None:
        row = self._next_pending(thing)
        execution = self._execution(row) if row else None
        self._publish(aws.JobsTopics(thing).notify_next, aws.encode_next_changed(execution, thing, int(time.time())))

    def create_job(self, thing: str, job_id: str, document: Mapping[str, Any]) -> None:
        """CreateJob for one target thing; a job id that exists already is refused (ResourceAlreadyExists)."""
        if not aws.JOB_ID_RE.match(job_id) or not aws.THING_RE.match(thing):
            raise ValueError("InvalidRequestException: bad job id or thing name")
        with self._lock:
            if any(row["jobId"] == job_id for rows in self._jobs.values() for row in rows):
                raise ValueError(f"ResourceAlreadyExistsException: job {job_id} exists")
            before = self._next_pending(thing)
            rows = self._jobs.setdefault(thing, [])
            rows.append({"jobId": job_id, "status": aws.QUEUED, "versionNumber": 1, "executionNumber": len(rows) + 1,
                         "document": dict(document), "statusDetails": {}})  # fmt: skip
            self._save_jobs()
            if before is None:  # it became the next pending execution
                self._notify_next(thing)

    def execution(self, thing: str, job_id: str) -> dict[str, Any] | None:
        """DescribeJobExecution (control plane): the row as the fake keeps it."""
        with self._lock:
            for row in self._jobs.get(thing, []):
                if row["jobId"] == job_id:
                    return dict(row)
        return None

    def _reject_jobs(self, topic: str, rejection: aws.JobsRejection) -> None:
        self._publish(aws.rejected(topic), aws.encode_jobs_rejection(rejection, int(time.time())))

    def _start_next(self, thing: str, topic: str, payload: bytes) -> None:
        try:
            client_token, details = aws.decode_start_next(payload)
        except aws.AwsMessageError as exc:
            self._reject_jobs(topic, aws.JobsRejection(aws.INVALID_JSON, str(exc)))
            return
        with self._lock:
            row = self._next_pending(thing)
            if row is not None and row["status"] == aws.QUEUED:
                row.update(status=aws.IN_PROGRESS, versionNumber=row["versionNumber"] + 1, statusDetails=details)
                self._save_jobs()
            execution = self._execution(row) if row else None
        self._publish(
            aws.accepted(topic), aws.encode_start_next_accepted(execution, thing, client_token, int(time.time()))
        )

    def _update(self, thing: str, job_id: str, topic: str, payload: bytes) -> None:
        if self.drop_updates > 0:
            self.drop_updates -= 1
            log.info("aws fake: update of %s dropped (test fault)", job_id)
            return
        try:
            update = aws.decode_update(payload)
        except aws.AwsMessageError as exc:
            self._reject_jobs(topic, aws.JobsRejection(aws.INVALID_JSON, str(exc)))
            return
        token = update.client_token
        with self._lock:
            row = next((r for r in self._jobs.get(thing, []) if r["jobId"] == job_id), None)
            if row is None:
                self._reject_jobs(topic, aws.JobsRejection(aws.RESOURCE_NOT_FOUND, f"job {job_id} not found", token))
                return
            state = (row["status"], row["versionNumber"])
            if update.status not in aws.DEVICE_SETTABLE:
                self._reject_jobs(
                    topic, aws.JobsRejection(aws.INVALID_REQUEST, f"status {update.status}", token, *state)
                )
                return
            if update.expected_version is not None and update.expected_version != row["versionNumber"]:
                self._reject_jobs(
                    topic, aws.JobsRejection(aws.VERSION_MISMATCH, "expected version mismatch", token, *state)
                )
                return
            if row["status"] in aws.TERMINAL:
                self._reject_jobs(
                    topic,
                    aws.JobsRejection(aws.INVALID_STATE_TRANSITION, f"job execution is {row['status']}", token, *state),
                )
                return
            row.update(
                status=update.status, versionNumber=row["versionNumber"] + 1, statusDetails=dict(update.status_details)
            )
            self._save_jobs()
            answer = aws.encode_update_accepted(
                row["status"], row["versionNumber"], row["statusDetails"], token, int(time.time())
            )
            terminal = row["status"] in aws.TERMINAL
        self._publish(aws.accepted(topic), answer)
        if terminal:  # the next pending execution changed
            self._notify_next(thing)


# --- the whole system on AWS ----------------------------------------------------------------------------------


class AwsSystem(LocalSystem):
    """``LocalSystem`` on the fake AWS IoT Core: the broker with AWS's rules behind the SNI gate, the fleet
    provisioning and Jobs services, and our backend behind them (its ``backend-`` subscriptions stand for
    the topic rule that delivers telemetry to it; its pre-provisioning hook checks our enrolment tokens)."""

    def __init__(self, run: Path, *, publish_rate: int = aws.MAX_PUBLISH_PER_S, **kw: Any) -> None:
        super().__init__(run, **kw)
        self.broker = AwsBroker(self.home.pki, self.home.broker_dir, publish_rate=publish_rate)
        self.home.crl_reloader = self.broker.reload_crl
        keys = self.home.keys()

        def configuration() -> dict[str, str]:
            config = {aws.COMMAND_KEY_CONFIG: keys.command_pub_pem.decode()}
            if keys.release_pub_pem is not None:
                config[aws.RELEASE_KEY_CONFIG] = keys.release_pub_pem.decode()
            return config

        self.aws = AwsIotCore(
            self.broker, run / "aws", lambda event: pre_provisioning_hook(self.db, event), configuration
        )
        self.gate: SniGate | None = None

    def start_backend(self) -> None:
        """Our service as the topic rule's target: a ``backend-`` subscription on the broker, AWS's adapter."""
        self.service = self.home.service("localhost", self.broker.port, self.db, cloud="aws")
        self.service.on_record = lambda dev, rec: self.on_record(dev, rec) if self.on_record else None
        self._thread = threading.Thread(target=self.service.run, name="backend", daemon=True)
        self._thread.start()
        if not self.service.ready.wait(20):
            raise RuntimeError("backend could not connect to the broker")

    def config(self, path: Path, ports: list[tuple[str, str]], **options: dict[str, str]) -> Path:
        """A box's UCI config on this cloud (``mqtt.profile aws``)."""
        mqtt = {"profile": "aws", **options.pop("mqtt", {})}
        return device_config(path, ports, mqtt=mqtt, **options)

    def provision(
        self, state: Path, patient: str = "patient-1", token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The technician's one command on a fresh box, under the aws profile."""
        token = token or self.token(patient)
        config = self.config(state / "provision.conf", [])
        return self.glucoagent(
            state, "provision", "--endpoint", self.endpoint, f"--token={token}", f"--patient={patient}", config=config
        )

    def start(self) -> None:
        self.broker.start()
        self.gate = SniGate(self.broker.port)
        self.gate.start()
        self.aws.start()
        self.start_backend()

    def stop(self) -> None:
        super().stop()  # agents, backend, broker
        self.aws.stop()
        if self.gate is not None:
            self.gate.close()

    @property
    def endpoint(self) -> str:
        """What a box is given: the endpoint host behind the SNI gate."""
        assert self.gate is not None
        return f"mqtts://{HOST}:{self.gate.port}"

    def send_command_job(self, device_id: str, cmd_id: str, envelope: bytes) -> None:
        send_command_as_job(self.aws, device_id, cmd_id, envelope)
