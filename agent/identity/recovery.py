"""Re-enrolment over the claim path of a box whose certificate expired while it was offline
(agent/identity/renewal.py describes the exchange; the same checks and crash-safe swap)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import GlucoagentError
from agent.identity.credentials import CA_FILE
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
from agent.wire import cose, topics
from agent.wire.provisioning import decode_reply
from agent.wire.renewal import encode_recovery_request

if TYPE_CHECKING:
    from cryptography import x509


def recover(
    state_dir: Path,
    running: LinkSettings,
    device_id: str,
    old_key: cose.PrivateKey,
    key_type: str,
    *,
    timeout_s: float = 30.0,
    stop: Callable[[], bool] = lambda: False,
) -> x509.Certificate:
    """Re-enrol over the claim path with proof of the old key; on success the new pair is swapped in.

    Raises RenewalError (the old files stay as they are, the staged key is dropped).
    """
    factory = state_dir / FACTORY_DIR
    claim = TlsFiles(ca=running.tls.ca, cert=factory / "claim.crt", key=factory / "claim.key")
    if not claim.cert.exists() or not claim.key.exists():
        raise RenewalError("no_claim", f"no factory claim certificate in {factory}: re-enrol with a technician")
    key, csr = stage_key(state_dir, key_type)
    request_id = new_request_id()
    settings = dataclasses.replace(running, client_id=f"claim-{request_id}", tls=claim, clean_start=True, will=None)
    try:
        request = encode_recovery_request(request_id, device_id, old_key, csr, time.time())
        reply = _ask_over_claim(settings, request_id, request, timeout_s, stop)
        chain = _accepted_chain(reply, device_id)
        leaf = check_certificate(chain, key, device_id, (state_dir / CA_FILE).read_bytes())
        try_login(state_dir, running, chain)
        commit(state_dir)
    except BaseException:
        discard(state_dir)  # a no-op once COMMIT is written: then the swap completes, now or at the next start
        raise
    return leaf


def _ask_over_claim(
    settings: LinkSettings, request_id: str, request: bytes, timeout_s: float, stop: Callable[[], bool]
) -> dict[str, object]:
    """Publish ``request`` on the provisioning topics as the claim identity and wait for the reply."""
    reply: dict[str, object] = {}
    got = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        if topic != topics.provision_response(request_id):
            return
        reply.update(decode_reply(payload))
        got.set()

    link = MqttLink(settings, on_message=on_message)
    try:
        link.connect()
        codes = link.subscribe([topics.provision_response(request_id)])
        if any(c >= 0x80 for c in codes):
            return {"ok": False, "code": "claim_refused", "message": f"broker refused the reply topic (codes {codes})"}
        link.publish(topics.provision_request(request_id), request)
        deadline = time.monotonic() + timeout_s
        while not got.is_set():
            if time.monotonic() > deadline or stop():
                return {"ok": False, "code": "recovery_timeout", "message": f"no answer within {timeout_s:g}s"}
            if not link.loop(0.1):
                return {"ok": False, "code": "claim_closed", "message": "the broker closed the claim connection"}
    except GlucoagentError as exc:
        return {"ok": False, "code": "recovery_failed", "message": f"claim connection failed: {exc}"}
    finally:
        link.disconnect()
    return reply


def _accepted_chain(reply: Mapping[str, object], device_id: str) -> bytes:
    if not reply.get("ok"):
        raise RenewalError(str(reply.get("code", "refused")), f"re-enrolment refused: {reply.get('message', '')}")
    chain = reply.get("cert")
    if reply.get("device_id") != device_id or not isinstance(chain, bytes):
        raise RenewalError("bad_reply", "the re-enrolment reply names another device or has no certificate")
    return chain
