"""The claim-path enrolment request and reply: exact bytes, round trip, garbage refused cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_golden import CERT, CSR, DEV, ENROL_REPLY, ENROL_REQUEST, HW, RECOVERY, REQ_ID

from agent.errors import ProvisioningError
from agent.wire import provisioning as p

REPLY = {
    "ok": True,
    "device_id": DEV,
    "cert": CERT,
    "ca": CERT,
    "command_key": b"-----BEGIN PUBLIC KEY-----\n",
    "config": {"agent.poll_s": "60"},
}


def test_request_and_reply_are_byte_exact() -> None:
    assert p.encode_request(REQ_ID, CSR, "tok-123", "patient-7", HW) == ENROL_REQUEST
    assert p.encode_reply(REPLY) == ENROL_REPLY


def test_round_trip() -> None:
    assert p.decode_request(ENROL_REQUEST, REQ_ID) == p.EnrolRequest(REQ_ID, CSR, "tok-123", "patient-7", HW)
    reply = p.decode_reply(ENROL_REPLY)
    assert reply == REPLY
    p.check_reply(reply)
    recover = p.decode_request(RECOVERY, REQ_ID)
    assert isinstance(recover, p.RecoverRequest) and isinstance(recover.signed, bytes)


@pytest.mark.parametrize(
    "payload",
    [b"\xff", cbor2.dumps([1]), ENROL_REQUEST, cbor2.dumps({"req": REQ_ID, "token": "t", "patient": "", "csr": CSR})],
)
def test_bad_requests(payload: bytes) -> None:
    with pytest.raises(p.RequestRefused) as err:
        p.decode_request(payload, REQ_ID if payload != ENROL_REQUEST else "r-other-request-id")
    assert err.value.code == "bad_request"


@pytest.mark.parametrize(
    "reply",
    [
        {**REPLY, "device_id": "Not/A/Device"},
        {**REPLY, "cert": "text"},
        {**REPLY, "ca": b"no pem"},
        {**REPLY, "config": [1]},
        {k: v for k, v in REPLY.items() if k != "command_key"},
    ],
)
def test_incomplete_replies_are_refused_before_anything_is_written(reply: dict[str, object]) -> None:
    with pytest.raises(ProvisioningError):
        p.check_reply(p.decode_reply(p.encode_reply(reply)))


def test_unreadable_reply_reads_as_a_refusal() -> None:
    assert p.decode_reply(b"\xff")["code"] == "bad_reply"
    assert p.decode_reply(cbor2.dumps([1, 2]))["ok"] is False


_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=6)
_body = st.dictionaries(
    st.sampled_from(
        ["v", "req", "csr", "token", "patient", "hw", "recover", "ok", "device_id", "cert", "ca", "config"]
    ),
    _leaf | st.just(REQ_ID) | st.just(DEV) | st.dictionaries(st.text(max_size=3), _leaf),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | _leaf.map(cbor2.dumps) | _body.map(cbor2.dumps))
def test_random_input_is_refused_cleanly(payload: bytes) -> None:
    with contextlib.suppress(p.RequestRefused):
        p.decode_request(payload, REQ_ID)
    reply = p.decode_reply(payload)
    assert isinstance(reply, dict)
    with contextlib.suppress(ProvisioningError):
        p.check_reply(reply)
