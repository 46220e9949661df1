"""Claim-based provisioning: the box enrols itself with a one-time token and its own CSR.

Flow (docs/provisioning.md): key made on the box -> CSR -> connect with the factory
claim certificate (the broker confines it to gluco/v1/prov/) -> subscribe to our
reply topic -> publish the request -> receive certificate chain, device id,
command-verification key and initial config -> write them atomically ->
reconnect with the device certificate and confirm by publishing ``online``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import platform
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent import __version__
from agent.config import Endpoint, MqttSection
from agent.errors import GlucoagentError, LinkTimeout, ProvisioningError, TokenRejected
from agent.fsutil import atomic_write
from agent.identity.credentials import (
    build_csr,
    ensure_state_dir,
    hardware_serial,
    is_provisioned,
    load_identity,
    load_or_create_key,
    save_credentials,
)
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.link.proxy import proxy_from_config
from agent.link.routes import connect_first, device_link_settings, link_routes
from agent.update.keys import RELEASE_KEY_FILE
from agent.wire import topics
from agent.wire.profiles import STATUS
from agent.wire.provisioning import STATUS_OFFLINE, STATUS_ONLINE, check_reply, decode_reply, encode_request

FACTORY_DIR = "factory"
TOKEN_CODES = {"token_unknown", "token_used", "token_expired"}
# The patient this box is enrolled for, as a salted hash: enough to refuse enrolling it for someone
# else before any network, without the patient reference sitting on the box in clear.
BINDING_FILE = "binding.json"


class BoundToOtherPatient(ProvisioningError):
    """The box (its key, its buffered readings) belongs to another patient: deprovision it first."""

    exit_code = 53


class KeyTypeRefused(ProvisioningError):
    """The cloud does not accept this device key type (only Ed25519 and EC P-256)."""

    exit_code = 54


def _patient_digest(salt: bytes, patient: str) -> str:
    return hmac.new(salt, patient.encode(), hashlib.sha256).hexdigest()


def binding_for(patient: str) -> bytes:
    salt = secrets.token_bytes(16)
    return json.dumps({"salt": salt.hex(), "patient_hmac": _patient_digest(salt, patient)}).encode()


def check_local_binding(state_dir: Path, patient: str) -> None:
    """Refuse, before any network, to enrol a box already enrolled for another patient."""
    try:
        meta = json.loads((state_dir / BINDING_FILE).read_text())
        salt, digest = bytes.fromhex(meta["salt"]), str(meta["patient_hmac"])
    except FileNotFoundError:
        return  # enrolled by an older agent: the cloud checks the binding itself
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProvisioningError(f"{state_dir / BINDING_FILE} is unreadable ({exc}); deprovision the box first") from exc
    if not hmac.compare_digest(_patient_digest(salt, patient), digest):
        device = load_identity(state_dir).device_id
        raise BoundToOtherPatient(
            f"this box ({device}) is enrolled for another patient; its readings stay theirs: "
            "run `glucoagent deprovision` first (it refuses while readings are unsent; --force discards them)"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def default(cls, state_dir: Path) -> ClaimFiles:
        f = state_dir / FACTORY_DIR
        return cls(ca=f / "ca.crt", cert=f / "claim.crt", key=f / "claim.key")


Step = Callable[[str], None]


class Progress:
    """Numbered steps, each ending ok or failed: what a technician reads on a phone screen."""

    def __init__(self, total: int, out: Callable[[str], None]) -> None:
        self.total = total
        self.n = 0
        self.out = out

    def step(self, text: str) -> _StepCtx:
        self.n += 1
        return _StepCtx(self, f"[{self.n}/{self.total}] {text}")


class _StepCtx:
    def __init__(self, progress: Progress, label: str) -> None:
        self.p = progress
        self.label = label
        self.detail = ""

    def __enter__(self) -> _StepCtx:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None:
            self.p.out(f"{self.label} ... ok{(' (' + self.detail + ')') if self.detail else ''}")
        else:
            self.p.out(f"{self.label} ... failed")


def provision(
    state_dir: Path,
    endpoint: str,
    token: str,
    patient: str,
    *,
    claim: ClaimFiles | None = None,
    key_type: str = "ed25519",
    protocol: str = "mqttv5",
    timeout_s: float = 20.0,
    out: Callable[[str], None] = print,
    mqtt: MqttSection | None = None,
) -> str:
    """Enrol this box; returns the device id. Raises GlucoagentError subclasses with exit codes.

    ``mqtt``: the box's MQTT options, so enrolment takes the same ways to the broker as the daemon
    (a proxy, WebSockets on 443, the fallback between them); None: MQTT/TLS to ``endpoint`` directly."""
    profile = (mqtt or MqttSection()).cloud()
    ep = Endpoint.parse(endpoint, "--endpoint")
    claim = claim or ClaimFiles.default(state_dir)
    if profile.enrolment == "dps":
        from agent.identity.dps import enrol_by_dps

        exchange: Exchange = enrol_by_dps
    elif profile.enrolment == "aws-fleet":  # AWS IoT Core fleet provisioning (docs/clouds.md)
        from agent.identity.aws_provisioning import AWS_KEY_TYPE, enrol_by_aws_fleet

        exchange, key_type = enrol_by_aws_fleet, AWS_KEY_TYPE
    elif profile.enrolment == "claim":
        exchange = _enrol_by_claim
    else:
        raise ProvisioningError(f"cloud profile {profile.name!r}: enrolment by {profile.enrolment} is not available")
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
        key = load_or_create_key(state_dir, key_type)
        if key_type == "p256" and not isinstance(key, ec.EllipticCurvePrivateKey):  # a key kept from before
            raise KeyTypeRefused(
                f"this box's device key is Ed25519 and cloud profile {profile.name!r} needs P-256: "
                "run `glucoagent deprovision` first (a new key is made at the next enrolment)"
            )
        hw = hardware_serial()
        csr = build_csr(key, hw)
    request_id = secrets.token_hex(12)
    hw_info = {"serial": hw, "machine": platform.machine(), "agent": __version__}
    request = encode_request(request_id, csr, token, patient, hw_info)
    ctx = EnrolContext(state_dir, ep, claim, protocol, timeout_s, mqtt, progress, request_id, request, csr, key)
    reply, endpoint_of_device = exchange(ctx)
    with progress.step("save certificate, fleet CA and command key (atomic, mode 0600)"):
        if not (state_dir / BINDING_FILE).exists():  # before device.json: a complete set always has it
            atomic_write(state_dir / BINDING_FILE, binding_for(patient))
        if isinstance(reply.get("release_key"), bytes):  # pinned for updates (agent/update), before device.json
            atomic_write(state_dir / RELEASE_KEY_FILE, bytes(reply["release_key"]))
        save_credentials(
            state_dir,
            device_id=str(reply["device_id"]),
            endpoint=str(endpoint_of_device),
            cert_chain_pem=bytes(reply["cert"]),
            ca_pem=bytes(reply["ca"]),
            command_key_pem=bytes(reply["command_key"]),
            config=dict(reply.get("config", {})),
        )
    with progress.step("connect with the device certificate and confirm"):
        confirm(state_dir, protocol=protocol, mqtt=mqtt)
    return str(reply["device_id"])


@dataclasses.dataclass(frozen=True, slots=True)
class EnrolContext:
    """What an enrolment exchange gets: the box's request (token, patient, CSR) and how to reach the cloud."""

    state_dir: Path
    endpoint: Endpoint  # --endpoint: our broker, or the cloud's enrolment service (DPS)
    claim: ClaimFiles
    protocol: str
    timeout_s: float
    mqtt: MqttSection | None
    progress: Progress
    request_id: str
    request: bytes  # agent/wire/provisioning.py encode_request
    csr_pem: bytes
    key: Any  # the device's private key (its id derives from the public half)


# An enrolment exchange: the cloud's checked reply (agent/wire/provisioning.py) and the endpoint the device
# connects to from now on. Each one runs steps 3 and 4 of Progress (connect, send and receive).
Exchange = Callable[[EnrolContext], tuple[dict[str, Any], Endpoint]]


def raise_refusal(reply: Mapping[str, Any]) -> None:
    """A refusing enrolment reply as the error (and exit code) a technician acts on."""
    code, message = str(reply.get("code", "error")), str(reply.get("message", "refused"))
    if code in TOKEN_CODES:
        raise TokenRejected(f"enrolment token refused ({code}): {message}")
    if code == "bound_to_other_patient":
        raise BoundToOtherPatient(f"enrolment refused ({code}): {message}")
    if code == "unsupported_key":
        raise KeyTypeRefused(f"enrolment refused ({code}): {message}")
    raise ProvisioningError(f"enrolment refused ({code}): {message}")


def _enrol_by_claim(ctx: EnrolContext) -> tuple[dict[str, Any], Endpoint]:
    """Our broker's claim path: the request on gluco/v1/prov/<id>/request, the reply on .../response."""
    state_dir, ep, claim, protocol, timeout_s, mqtt, progress = (
        ctx.state_dir, ctx.endpoint, ctx.claim, ctx.protocol, ctx.timeout_s, ctx.mqtt, ctx.progress,
    )  # fmt: skip
    request_id, request = ctx.request_id, ctx.request
    reply: dict[str, Any] = {}
    got_reply = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == topics.provision_response(request_id):
            reply.update(decode_reply(payload))
            got_reply.set()

    settings = LinkSettings(
        host=ep.host,
        port=ep.port,
        client_id=f"claim-{request_id}",
        tls=TlsFiles(ca=claim.ca, cert=claim.cert, key=claim.key),
        protocol=protocol,
        clean_start=True,
    )
    routes = _routes(mqtt, ep, settings, state_dir)
    with progress.step(f"connect to {ep} with the factory claim certificate") as s:
        link = connect_first(routes, lambda way: MqttLink(way, on_message=on_message))
        if link.s.transport != "tcp" or link.s.proxy is not None:
            s.detail = link.s.describe()
    try:
        with progress.step("send enrolment request (token, patient reference, CSR)") as s:
            codes = link.subscribe([topics.provision_response(request_id)])
            if any(c >= 0x80 for c in codes):
                raise ProvisioningError(f"broker refused the provisioning reply topic (codes {codes})")
            mid = link.publish(topics.provision_request(request_id), request)
            deadline = time.monotonic() + timeout_s
            while not got_reply.is_set():
                if time.monotonic() > deadline:
                    raise LinkTimeout(f"no answer from the provisioning service within {timeout_s:g}s")
                if not link.loop(0.1):
                    raise ProvisioningError("the broker closed the connection during enrolment")
            link.forget(mid)
            if not reply.get("ok"):
                raise_refusal(reply)
            check_reply(reply)
            s.detail = f"device id {reply['device_id']}"
    finally:
        link.disconnect()
    return reply, ep


def _routes(mqtt: MqttSection | None, ep: Endpoint, base: LinkSettings, state_dir: Path) -> tuple[LinkSettings, ...]:
    if mqtt is None:
        return (base,)
    proxy = proxy_from_config(mqtt.proxy, mqtt.proxy_password_file, state_dir)
    return link_routes(mqtt, ep, base, proxy)


def confirm(
    state_dir: Path, *, protocol: str = "mqttv5", timeout_s: float = 10.0, mqtt: MqttSection | None = None
) -> None:
    """Log in as the device and publish ``online``: proves the new credentials work end to end. Where the
    cloud profile has no status messages, the accepted login is the proof."""
    ident = load_identity(state_dir)
    ep = Endpoint.parse(ident.endpoint)
    profile = (mqtt or MqttSection()).cloud()
    server_ca = (mqtt or MqttSection()).server_ca_path(state_dir)
    base = device_link_settings(profile, ident, ep, protocol=protocol, server_ca=server_ca)
    link = connect_first(_routes(mqtt, ep, base, state_dir), MqttLink)
    try:
        if not profile.status_messages:
            return
        online = profile.outgoing(ident.device_id, STATUS, STATUS_ONLINE)
        mid = link.publish(online.topic, online.payload, retain=online.retain)
        deadline = time.monotonic() + timeout_s
        while (ok := link.acked(mid)) is None:
            if time.monotonic() > deadline or not link.loop(0.05):
                raise LinkTimeout("the broker did not acknowledge the confirmation")
        if not ok:
            raise GlucoagentError("the broker refused the device's status message (ACL?)")
        link.publish(online.topic, STATUS_OFFLINE, retain=online.retain)  # until the daemon runs and says online
        link.loop(0.2)
    finally:
        link.disconnect()
