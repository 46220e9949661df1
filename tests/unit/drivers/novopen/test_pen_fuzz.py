"""Arbitrary bytes at each layer: typed errors only, never a crash or a hang."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.errors import DriverError, InvalidResponse
from drivers.novopen import ieee11073, phd, pmstore, pn532, type4
from drivers.novopen.doses import interpret, to_doses
from drivers.novopen.session import CaptureReplay, SessionState, parse_capture, run_session

FAST = settings(max_examples=300, deadline=None)


def _decode_everything(data: bytes) -> None:
    with contextlib.suppress(InvalidResponse):
        ieee11073.decode_aarq(data)
    try:
        msg = ieee11073.decode_data_apdu(data)
    except InvalidResponse:
        return
    for step in (
        lambda: pmstore.decode_config_report(pmstore.decode_event_report(msg)),
        lambda: pmstore.decode_mds(msg),
        lambda: [s.entry_size() for s in pmstore.decode_segment_info(pmstore.decode_action(msg, result=True))],
        lambda: interpret([pmstore.decode_segment_data(pmstore.decode_event_report(msg))]),
        lambda: pmstore.decode_trigger_result(pmstore.decode_action(msg, result=True)),
        lambda: pmstore.decode_event_result(msg),
    ):
        with contextlib.suppress(InvalidResponse):
            step()


@pytest.fixture(scope="module")
def replies(request: pytest.FixtureRequest) -> list[bytes]:
    vectors = request.getfixturevalue("novopen_vectors")
    return parse_capture((vectors / "nvp_datatest.txt").read_bytes())


@FAST
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_pn532_splitter_never_raises(chunks: list[bytes]) -> None:
    splitter = pn532.FrameSplitter()
    for chunk in chunks:
        for token in splitter.feed(chunk):
            assert isinstance(token, pn532.Ack | pn532.Nack | pn532.ErrorFrame | pn532.Frame | pn532.BadFrame)
    assert len(splitter.pending) <= 7 + pn532.MAX_EXTENDED_LEN + 2


@FAST
@given(st.binary(max_size=300))
def test_pn532_decode_frame_typed(data: bytes) -> None:
    with contextlib.suppress(InvalidResponse):
        pn532.decode_frame(data)


@FAST
@given(st.binary(max_size=300))
def test_pn532_target_parse_typed(data: bytes) -> None:
    with contextlib.suppress(InvalidResponse):
        pn532.parse_in_list_passive_target(data)


@FAST
@given(st.binary(max_size=40))
def test_type4_replies_typed(data: bytes) -> None:
    for decode in (type4.parse_rapdu, type4.parse_cc):
        with contextlib.suppress(type4.Type4Error):
            decode(data)


@FAST
@given(st.binary(max_size=300))
def test_phd_typed(data: bytes) -> None:
    with contextlib.suppress(phd.PhdError):
        phd.decode_phd(data)


@FAST
@given(st.binary(max_size=300))
def test_ieee11073_arbitrary_bytes_typed(data: bytes) -> None:
    _decode_everything(data)


@FAST
@given(st.binary(min_size=10, max_size=300))
def test_ieee11073_prst_shaped_bytes_typed(body: bytes) -> None:
    """Random payloads inside a well-formed PRST envelope reach the object decoders."""
    _decode_everything(ieee11073.encode_data_apdu(ieee11073.DataApdu(0x8001, int.from_bytes(body[:2]), body[2:])))
    _decode_everything(ieee11073.encode_data_apdu(ieee11073.DataApdu(0, 0x0101, body)))
    _decode_everything(ieee11073.encode_data_apdu(ieee11073.DataApdu(0, 0x0203, body)))
    _decode_everything(ieee11073.encode_data_apdu(ieee11073.DataApdu(0, 0x0207, body)))


@FAST
@given(st.integers(0, 0xFFFFFFFF))
def test_float_total(raw: int) -> None:
    value = pmstore.decode_float(raw)
    if not isinstance(value, pmstore.FloatSpecial):
        assert pmstore.decode_float(pmstore.encode_float(value)) == value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_session_over_mutated_capture(replies: list[bytes], data: st.DataObject) -> None:
    """Damage one captured reply (flip, cut or replace): the session ends with a typed error or a read."""
    mutated = list(replies)
    i = data.draw(st.integers(0, len(mutated) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "random"]))
    reply = mutated[i]
    if how == "flip":
        pos = data.draw(st.integers(0, len(reply) - 1))
        mutated[i] = reply[:pos] + bytes((reply[pos] ^ data.draw(st.integers(1, 255)),)) + reply[pos + 1 :]
    elif how == "cut":
        mutated[i] = reply[: data.draw(st.integers(0, len(reply) - 1))]
    else:
        mutated[i] = data.draw(st.binary(max_size=300))
    replay = CaptureReplay(mutated)
    state = SessionState()
    with contextlib.suppress(DriverError):
        run_session(replay, state)
    assert len(replay.commands) <= len(mutated) + 1  # bounded: no loop past the end of the capture
    if state.mds is not None:
        to_doses(state.mds.serial, interpret(state.reports), state.received_at)
