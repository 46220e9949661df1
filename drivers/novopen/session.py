"""The manager side of one pen read, over any Type 4 ``transceive`` (PN532, capture, test).

Order of a read, as the captured session shows it (meter-protocols.md §D):

1. Type 4: select NDEF application, CC, NDEF file; read the pen's AARQ.
2. AARE (accepted, unknown config) -> pen config report -> accept config.
3. GET all MDS attributes -> serial, model, software, pen relative clock.
4. Segment info on the PM-store -> the dose segment(s) and their entry layout.
5. Trigger transfer; poll with empty PHD packets until segment data comes; confirm
   every report (the pen then sends the next) until the one flagged "last".
6. The pen asks to release; we answer RLRE.

The manager sends every request with the invoke id of the pen's config report, as
nov-open-reader does against real pens (the capture's replies echo it); a reply
must echo the request's invoke id.

``SessionState`` fills in as the read goes, so a read cut short (pen taken away)
still hands over the identity and every report received before the cut.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable

from drivers.errors import DriverError, InvalidResponse, NoResponse
from drivers.models import PenIdentity
from drivers.novopen import ieee11073 as apdu
from drivers.novopen import pmstore
from drivers.novopen.phd import PhdLink
from drivers.novopen.pn532 import PenRemoved
from drivers.novopen.type4 import Transceive, Type4Tag

__all__ = [
    "CaptureReplay",
    "PenProtocolError",
    "SessionState",
    "parse_capture",
    "run_session",
]

log = logging.getLogger(__name__)

#: Empty polls tolerated while the pen prepares data, and reports per read (capacity 800 / 18 + slack).
MAX_EMPTY_POLLS = 30
MAX_REPORTS = 200
#: Segment label and entry size of the NovoPen dose log.
DOSE_ENTRY_SIZE = pmstore.DOSE_ENTRY_SIZE


class PenProtocolError(InvalidResponse):
    """The pen broke the IEEE 11073 exchange (wrong reply, gap in the log, unsupported layout)."""


@dataclasses.dataclass(slots=True)
class SessionState:
    """What one read has learnt so far (mutable while the read runs)."""

    mds: pmstore.MdsInfo | None = None
    config: pmstore.ConfigReport | None = None
    mds_read_at: dt.datetime | None = None
    reports: list[pmstore.SegmentData] = dataclasses.field(default_factory=list)
    received_at: list[dt.datetime] = dataclasses.field(default_factory=list)
    complete: bool = False
    released: bool = False

    @property
    def identity(self) -> PenIdentity | None:
        if self.mds is None:
            return None
        model = " ".join(p for p in (self.mds.manufacturer, self.mds.model) if p)
        return PenIdentity(
            model=model, serial=self.mds.serial, firmware=self.mds.sw_revision, manufacturer=self.mds.manufacturer
        )


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Manager:
    def __init__(self, link: PhdLink, state: SessionState, now: Callable[[], dt.datetime]) -> None:
        self.link = link
        self.state = state
        self.now = now
        self.invoke_id = 0

    def poll(self, reply: bytes, what: str) -> bytes:
        polls = 0
        while not reply:
            polls += 1
            if polls > MAX_EMPTY_POLLS:
                raise NoResponse(f"pen sent nothing after {MAX_EMPTY_POLLS} polls while waiting for {what}")
            reply = self.link.exchange(b"")
        return reply

    def request(self, request: bytes, what: str) -> apdu.DataApdu:
        data = apdu.decode_data_apdu(self.poll(self.link.exchange(request), what))
        if data.invoke_id != self.invoke_id:
            raise PenProtocolError(f"{what}: reply invoke id {data.invoke_id}, sent {self.invoke_id}")
        return data

    def run(self) -> None:
        aarq = apdu.decode_aarq(self.link.receive_first())
        log.debug("pen association request, system id %s", aarq.info.system_id.hex())
        reply = self.poll(self.link.exchange(apdu.encode_aare(apdu.aare_for(aarq))), "the configuration")
        data = apdu.decode_data_apdu(reply)
        config = pmstore.decode_config_report(pmstore.decode_event_report(data))
        if config.unit_code not in (None, pmstore.MDC_DIM_INTL_UNIT):
            raise PenProtocolError(f"pen reports doses in unit code {config.unit_code}, not international units")
        self.state.config = config
        self.invoke_id = data.invoke_id
        extra = self.link.exchange(pmstore.accept_config(self.invoke_id, config.config_id))
        if extra:
            log.warning("pen answered the config acceptance with %d unexpected bytes", len(extra))
        mds = pmstore.decode_mds(self.request(pmstore.get_mds_attributes(self.invoke_id), "the MDS attributes"))
        self.state.mds, self.state.mds_read_at = mds, self.now()
        log.info(
            "pen %s (%s %s, sw %s), clock %s s",
            mds.serial,
            mds.manufacturer,
            mds.model,
            mds.sw_revision,
            mds.relative_time,
        )
        info = self.request(pmstore.segment_info_request(self.invoke_id), "the segment info")
        segments = pmstore.decode_segment_info(pmstore.decode_action(info, result=True))
        doses = [s for s in segments if s.entry_size() in (None, DOSE_ENTRY_SIZE)]
        if not doses:
            raise PenProtocolError(f"no segment with {DOSE_ENTRY_SIZE}-byte dose entries among {len(segments)}")
        pending = b""
        for segment in doses:
            if segment.usage == 0:
                log.info("segment %d (%s) is empty", segment.instance, segment.label)
                continue
            pending = self.transfer(segment)
        self.state.complete = True
        self.release(pending)

    def transfer(self, segment: pmstore.SegmentInfo) -> bytes:
        """Read one segment; returns the pen's APDU that followed the last confirmation."""
        trigger = self.request(pmstore.trigger_transfer(self.invoke_id, segment.instance), "the transfer trigger")
        instance, code = pmstore.decode_trigger_result(pmstore.decode_action(trigger, result=True))
        if instance != segment.instance or code != pmstore.TSXR_SUCCESSFUL:
            raise PenProtocolError(f"pen refused transfer of segment {segment.instance}: {instance}/{code}")
        reply = self.poll(self.link.exchange(b""), "segment data")
        expected_index = 0
        for _ in range(MAX_REPORTS):
            data = apdu.decode_data_apdu(reply)
            report = pmstore.decode_segment_data(pmstore.decode_event_report(data))
            if report.instance != segment.instance or report.first_index != expected_index:
                raise PenProtocolError(
                    f"segment data {report.instance}@{report.first_index}, expected {segment.instance}@{expected_index}"
                )
            self.state.reports.append(report)
            self.state.received_at.append(self.now())
            expected_index += len(report.entries)
            reply = self.link.exchange(pmstore.confirm_segment_data(data.invoke_id, report))
            if report.last or not report.entries:
                return reply
            reply = self.poll(reply, "segment data")
        raise PenProtocolError(f"more than {MAX_REPORTS} segment reports")

    def release(self, pending: bytes) -> None:
        """Answer the pen's release request, or ask for release ourselves. Failures here lose nothing."""
        try:
            if not pending:
                pending = self.link.exchange(b"")
            if pending and apdu.decode_apdu(pending).choice == apdu.RLRQ:
                self.link.exchange(apdu.release_response())
            else:
                self.link.exchange(apdu.release_request())
            self.state.released = True
        except DriverError as exc:
            log.debug("release after a complete read failed (pen gone?): %s", exc)


def run_session(transceive: Transceive, state: SessionState, now: Callable[[], dt.datetime] = _utc_now) -> SessionState:
    """Run one read over ``transceive``; ``state`` keeps what arrived even when this raises."""
    tag = Type4Tag(transceive)
    tag.open()
    _Manager(PhdLink(tag), state, now).run()
    return state


# --- captured sessions -------------------------------------------------------------------------------
_CAPTURE_LINE = re.compile(rb"^0x([0-9A-Fa-f]{8})((?: [0-9A-Fa-f]{2})+)")


def parse_capture(data: bytes) -> list[bytes]:
    """Reply APDUs of a capture in the nov-open-reader hex-dump format (``nvp_datatest.txt``).

    Blocks are separated by blank lines; each line is ``0xOFFSET`` + up to 16 hex bytes +
    an ASCII column. Offsets must run on without a gap.
    """
    replies: list[bytes] = []
    block = bytearray()
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            if block:
                replies.append(bytes(block))
                block = bytearray()
            continue
        match = _CAPTURE_LINE.match(line[: 10 + 3 * 16])
        if match is None:
            raise InvalidResponse(f"capture line {number}: not a hex dump line")
        offset = int(match.group(1), 16)
        if offset != len(block):
            raise InvalidResponse(f"capture line {number}: offset 0x{offset:X}, expected 0x{len(block):X}")
        block += bytes.fromhex(match.group(2).decode("ascii"))
    if block:
        replies.append(bytes(block))
    return replies


class CaptureReplay:
    """A ``transceive`` that answers each command with the next captured reply."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.commands: list[bytes] = []

    def __call__(self, capdu: bytes) -> bytes:
        self.commands.append(capdu)
        if len(self.commands) > len(self.replies):
            raise PenRemoved("capture ended: the pen left the field")
        return self.replies[len(self.commands) - 1]
