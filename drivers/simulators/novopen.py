"""A PN532 NFC reader with a NovoPen in its field, served on a pseudo-terminal.

Two sources:

* ``PenLog`` (generated): a pen agent that speaks IEEE 11073-20601 over PHD/NDEF on
  an emulated Type 4 tag and serves the given doses, 18 per report, newest first;
* ``Capture`` (replay): every InDataExchange is answered with the next reply APDU of
  a captured session (``nvp_datatest.txt``), byte for byte; after the last one the
  pen has left the field.

Faults (``PenFaults``): the pen taken away at a given exchange (it comes back after
``away_polls`` empty target polls, its session reset), a reply frame sent with a bad
data checksum (the reader resends it on NACK), a slow tag (delay before every
InDataExchange reply).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from decimal import Decimal
from pathlib import Path

from drivers.errors import InvalidResponse
from drivers.novopen import ieee11073 as apdu
from drivers.novopen import phd, pmstore, pn532, type4
from drivers.novopen.session import parse_capture
from drivers.simulators.pty_link import PtyLink

__all__ = ["Capture", "PenFaults", "PenLog", "SimStats", "load_doses", "random_log", "serve"]

log = logging.getLogger(__name__)

#: What the emulated PN532 reports for GetFirmwareVersion: IC 0x32, version 1.6, all protocols.
FIRMWARE_VERSION = bytes((0x32, 0x01, 0x06, 0x07))
#: Target the pen presents: ATQA 00 04, SAK 0x20 (ISO-DEP), 7-byte UID, a short ATS.
PEN_TARGET = pn532.Target(1, b"\x00\x04", 0x20, bytes.fromhex("04a1b2c3d4e5f6"), bytes.fromhex("0578807002"))
#: The pen's CC as captured.
PEN_CC = type4.CapabilityContainer(0x20, 0x010C, 0x010C, type4.NDEF_FILE_ID, 0x010C, 0x00, 0x00)
SW_OK = b"\x90\x00"
SW_FILE_NOT_FOUND = b"\x6a\x82"
SW_WRONG_P1P2 = b"\x6b\x00"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"
STATUS_OK = bytes((pn532.STATUS_OK,))
STATUS_GONE = bytes((pn532.Pn532Status.TIMEOUT,))
ENTRIES_PER_REPORT = 18
DOSE_SEGMENT = 0x0010
CONFIG_ID = 0x400A
SYSTEM_ID = bytes.fromhex("00146500401244d7")
NORMAL_FLAGS = pmstore.FLAGS_NORMAL_DOSE
#: How long InListPassiveTarget takes to report an empty field (MxRtyPassiveActivation tries).
EMPTY_POLL_S = 0.02


@dataclasses.dataclass(frozen=True, slots=True)
class PenLog:
    """A generated pen: identity, clock at start, dose entries newest first."""

    serial: str = "SIM001"
    entries: tuple[pmstore.DoseEntry, ...] = ()
    clock_s: int = 6_206_432
    manufacturer: str = "Novo Nordisk A/S"
    model: str = "NovoPen"
    sw_revision: str = "01.08.01"


@dataclasses.dataclass(frozen=True, slots=True)
class Capture:
    replies: tuple[bytes, ...]

    @classmethod
    def from_file(cls, path: str | Path) -> Capture:
        return cls(tuple(parse_capture(Path(path).read_bytes())))


@dataclasses.dataclass(frozen=True, slots=True)
class PenFaults:
    remove_at: int | None = None  # pen leaves the field at this InDataExchange (1-based)
    away_polls: int = 1  # empty InListPassiveTarget answers before it is back
    corrupt_at: frozenset[int] = frozenset()  # reply frames (1-based count) sent with a bad DCS once
    slow_s: float = 0.0  # delay before every InDataExchange reply

    def __post_init__(self) -> None:
        if self.remove_at is not None and self.remove_at < 1:
            raise ValueError(f"faults.remove_at: expected >= 1, got {self.remove_at}")
        if self.slow_s < 0 or self.away_polls < 0:
            raise ValueError("faults.slow_s and faults.away_polls must be >= 0")


NO_FAULTS = PenFaults()


@dataclasses.dataclass(slots=True)
class SimStats:
    """Live counters, for tests and the CLI."""

    exchanges: int = 0
    frames_sent: int = 0
    nacks: int = 0
    corrupted: int = 0
    removals: int = 0
    sessions: int = 0
    replies_left: int | None = None


def random_log(rng: random.Random, count: int, clock_s: int = 5_000_000) -> tuple[pmstore.DoseEntry, ...]:
    """``count`` plausible doses (0.5..60 U in tenths, unique times), newest first."""
    times = sorted(rng.sample(range(max(0, clock_s - 90 * 86400), clock_s), count), reverse=True)
    return tuple(
        pmstore.DoseEntry(t, pmstore.encode_float(Decimal(rng.randint(5, 600)).scaleb(-1)), NORMAL_FLAGS) for t in times
    )


def load_doses(path: str | Path) -> PenLog:
    """A dose file: ``{"serial": .., "clock_s": .., "doses": [{"relative_time_s": .., "units": "2.0"}]}``.

    ``units_raw_hex`` / ``flags_hex`` may replace ``units`` / default flags (e.g. a NaN entry).
    """
    doc = json.loads(Path(path).read_text())
    entries = []
    for item in doc.get("doses", []):
        raw = item.get("units_raw_hex")
        units = int(raw, 16) if raw else pmstore.encode_float(Decimal(str(item["units"])))
        flags = int(item.get("flags_hex", f"{NORMAL_FLAGS:08X}"), 16)
        entries.append(pmstore.DoseEntry(int(item["relative_time_s"]), units, flags))
    entries.sort(key=lambda e: e.relative_time, reverse=True)
    return PenLog(
        serial=doc.get("serial", "SIM001"), entries=tuple(entries), clock_s=int(doc.get("clock_s", 6_206_432))
    )


# --- the pen: IEEE 11073 agent -------------------------------------------------------------------------
class PenAgent:
    """Answers the manager's APDUs with the pen's; ``outbox`` holds what the pen says next."""

    def __init__(self, pen: PenLog, started: float) -> None:
        self.pen = pen
        self.started = started
        self.outbox: list[bytes] = [self._aarq()]
        self.reports: list[pmstore.SegmentData] = []
        self.report_invoke = 0x8000

    def clock(self) -> int:
        return self.pen.clock_s + int(time.monotonic() - self.started)

    def _aarq(self) -> bytes:
        info = apdu.PhdAssociationInformation(
            apdu.PROTOCOL_VERSION1, apdu.ENCODING_MDER, apdu.NOMENCLATURE_VERSION1, 0,
            apdu.SYS_TYPE_AGENT, SYSTEM_ID, CONFIG_ID, 0x0001, 1, 0,
        )  # fmt: skip
        return apdu.encode_aarq(apdu.AssociationRequest(apdu.ASSOC_VERSION1, apdu.DATA_PROTO_ID_20601, info))

    def _config(self) -> bytes:
        usage = len(self.pen.entries)
        store = pmstore.ConfigObject(
            pmstore.MDC_MOC_VMO_PMSTORE,
            pmstore.PM_STORE_HANDLE,
            (
                pmstore.Attribute(pmstore.ATTR_METRIC_STORE_CAPAC_CNT, (800).to_bytes(4, "big")),
                pmstore.Attribute(pmstore.ATTR_NUM_SEG, (1).to_bytes(2, "big")),
                pmstore.Attribute(pmstore.ATTR_METRIC_STORE_USAGE_CNT, usage.to_bytes(4, "big")),
            ),
        )
        dose = pmstore.ConfigObject(
            pmstore.MDC_MOC_VMO_METRIC_NU,
            0x0002,
            (pmstore.Attribute(pmstore.ATTR_UNIT_CODE, pmstore.MDC_DIM_INTL_UNIT.to_bytes(2, "big")),),
        )
        info = pmstore.encode_config_report(pmstore.ConfigReport(CONFIG_ID, (store, dose)))
        report = pmstore.EventReport(pmstore.MDS_HANDLE, 0, pmstore.MDC_NOTI_CONFIG, info)
        return pmstore.encode_event_report(0, report)

    def _segment_info(self) -> bytes:
        attrs = (
            pmstore.Attribute(pmstore.ATTR_ID_INSTNO, DOSE_SEGMENT.to_bytes(2, "big")),
            pmstore.Attribute(pmstore.ATTR_PM_SEG_MAP, pmstore.dose_segment_map()),
            pmstore.Attribute(pmstore.ATTR_PM_SEG_LABEL_STRING, apdu.octets(b"Dose Log")),
            pmstore.Attribute(pmstore.ATTR_SEG_USAGE_CNT, len(self.pen.entries).to_bytes(4, "big")),
        )
        return pmstore.encode_segment_info((pmstore.SegmentInfo(DOSE_SEGMENT, attrs),))

    def _queue_reports(self) -> None:
        entries = self.pen.entries
        chunks = [entries[i : i + ENTRIES_PER_REPORT] for i in range(0, len(entries), ENTRIES_PER_REPORT)]
        for n, chunk in enumerate(chunks):
            status = (pmstore.SEVTSTA_FIRST_ENTRY if n == 0 else 0) | (
                pmstore.SEVTSTA_LAST_ENTRY if n == len(chunks) - 1 else 0
            )
            self.reports.append(pmstore.SegmentData(0, DOSE_SEGMENT, n * ENTRIES_PER_REPORT, status, chunk))

    def _next_report(self) -> bytes:
        report = dataclasses.replace(self.reports.pop(0), report_time=self.clock())
        self.report_invoke += 1
        return pmstore.encode_segment_data(self.report_invoke, report)

    def receive(self, request: bytes) -> None:
        if not request:
            return
        msg = apdu.decode_apdu(request)
        if msg.choice == apdu.AARE:
            self.outbox.append(self._config())
            return
        if msg.choice == apdu.RLRQ:
            self.outbox.append(apdu.release_response())
            return
        if msg.choice != apdu.PRST:
            return
        data = apdu.decode_data_apdu(msg)
        if data.choice == apdu.DataChoice.RORS_CONFIRMED_EVENT_REPORT:
            result = pmstore.decode_event_result(data)
            if result.event_type == pmstore.MDC_NOTI_SEGMENT_DATA:
                self.outbox.append(self._next_report() if self.reports else apdu.release_request())
            return
        if data.choice == apdu.DataChoice.ROIV_GET:
            mds = pmstore.MdsInfo(
                SYSTEM_ID, self.clock(), self.pen.serial, "D22420920700000 D22420920700000 ", "",
                self.pen.sw_revision, self.pen.manufacturer, self.pen.model, CONFIG_ID,
            )  # fmt: skip
            self.outbox.append(pmstore.encode_mds(data.invoke_id, mds))
            return
        if data.choice == apdu.DataChoice.ROIV_CONFIRMED_ACTION:
            action = pmstore.decode_action(data, result=False)
            if action.action_type == pmstore.MDC_ACT_SEG_GET_INFO:
                reply = pmstore.Action(pmstore.PM_STORE_HANDLE, action.action_type, self._segment_info())
            else:
                self._queue_reports()
                body = DOSE_SEGMENT.to_bytes(2, "big") + pmstore.TSXR_SUCCESSFUL.to_bytes(2, "big")
                reply = pmstore.Action(pmstore.PM_STORE_HANDLE, action.action_type, body)
                self.outbox.append(pmstore.encode_action(data.invoke_id, reply, result=True))
                self.outbox.append(b"")  # like the real pen: one empty answer before the first report
                self.outbox.append(self._next_report() if self.reports else apdu.release_request())
                return
            self.outbox.append(pmstore.encode_action(data.invoke_id, reply, result=True))

    def next_message(self) -> bytes:
        return self.outbox.pop(0) if self.outbox else b""


# --- the pen: Type 4 tag carrying PHD -------------------------------------------------------------------
class PenTag:
    """ISO 7816-4 file system of the pen: CC file and an NDEF file the PHD exchange lives in."""

    def __init__(self, pen: PenLog, started: float) -> None:
        self.agent = PenAgent(pen, started)
        self.selected: int | None = None
        self.app_selected = False
        self.seq = 0
        self.ndef = self._ndef(phd.encode_phd(0, self.agent.next_message()))

    @staticmethod
    def _ndef(message: bytes) -> bytes:
        return len(message).to_bytes(2, "big") + message

    def handle(self, capdu: bytes) -> bytes:
        if len(capdu) < 4:
            return SW_INS_NOT_SUPPORTED
        ins, p1, body = capdu[1], capdu[2], capdu[4:]
        if ins == type4.INS_SELECT:
            if p1 == type4.P1_BY_NAME:
                self.app_selected = body[1 : 1 + capdu[4]] == type4.NDEF_AID
                return SW_OK if self.app_selected else SW_FILE_NOT_FOUND
            fid = int.from_bytes(body[1:3], "big")
            if not self.app_selected or fid not in (type4.CC_FILE_ID, type4.NDEF_FILE_ID):
                return SW_FILE_NOT_FOUND
            self.selected = fid
            return SW_OK
        if ins == type4.INS_READ_BINARY and len(capdu) == 5:
            offset, length = int.from_bytes(capdu[2:4], "big"), capdu[4]
            data = type4.encode_cc(PEN_CC) if self.selected == type4.CC_FILE_ID else self.ndef
            if self.selected is None or offset + length > len(data):
                return SW_WRONG_P1P2
            return data[offset : offset + length] + SW_OK
        if ins == type4.INS_UPDATE_BINARY and self.selected == type4.NDEF_FILE_ID:
            return self._update(body[1 : 1 + capdu[4]])
        return SW_INS_NOT_SUPPORTED

    def _update(self, content: bytes) -> bytes:
        message = content[type4.NLEN_SIZE :]
        if message == phd.EMPTY_RECORD:
            return SW_OK  # the manager acknowledges our last packet
        try:
            packet = phd.decode_phd(message)
            self.agent.receive(packet.apdu)
        except InvalidResponse as exc:
            log.warning("pen: bad packet from the manager: %s", exc)
            return SW_WRONG_P1P2
        self.ndef = self._ndef(phd.encode_phd((packet.seq + 1) % 16, self.agent.next_message()))
        return SW_OK


# --- the reader ----------------------------------------------------------------------------------------
class Reader:
    """The emulated PN532: frames in, ACK + reply frames out, faults applied."""

    def __init__(self, link: PtyLink, source: PenLog | Capture, faults: PenFaults, stats: SimStats) -> None:
        self.link = link
        self.source = source
        self.faults = faults
        self.stats = stats
        self.splitter = pn532.FrameSplitter()
        self.last_reply = b""
        self.tag: PenTag | None = None
        self.replies = list(source.replies) if isinstance(source, Capture) else []
        self.away = 0  # empty polls still to answer while the pen is out of the field
        self.gone_for_good = False
        self.started = time.monotonic()
        stats.replies_left = len(self.replies) if isinstance(source, Capture) else None

    def present(self) -> bool:
        if isinstance(self.source, Capture):
            return not self.gone_for_good and bool(self.replies)
        return self.away == 0

    def feed(self, data: bytes) -> None:
        for token in self.splitter.feed(data):
            if isinstance(token, pn532.Nack):
                self.stats.nacks += 1
                self.link.write(self.last_reply)
            elif isinstance(token, pn532.Frame) and token.tfi == pn532.TFI_HOST:
                self.link.write(pn532.ACK_FRAME)
                self.reply(pn532.reply_to(token, self.answer(token)))

    def reply(self, frame: pn532.Frame) -> None:
        wire = pn532.encode_frame(frame)
        self.last_reply = wire
        self.stats.frames_sent += 1
        if self.stats.frames_sent in self.faults.corrupt_at:
            self.stats.corrupted += 1
            wire = wire[:-2] + bytes(((wire[-2] + 1) & 0xFF,)) + wire[-1:]
        self.link.write(wire)

    def answer(self, frame: pn532.Frame) -> bytes:
        cmd = frame.command
        if cmd == pn532.CMD_GET_FIRMWARE_VERSION:
            return FIRMWARE_VERSION
        if cmd in (pn532.CMD_SAM_CONFIGURATION, pn532.CMD_RF_CONFIGURATION):
            return b""
        if cmd == pn532.CMD_IN_RELEASE:
            return STATUS_OK
        if cmd == pn532.CMD_IN_LIST_PASSIVE_TARGET:
            if not self.present():
                self.away = max(0, self.away - 1)
                time.sleep(EMPTY_POLL_S)
                return b"\x00"
            if isinstance(self.source, PenLog):  # every activation starts a fresh pen session
                self.tag = PenTag(self.source, self.started)
                self.stats.sessions += 1
            return pn532.encode_target(PEN_TARGET)
        if cmd == pn532.CMD_IN_DATA_EXCHANGE:
            return self.exchange(frame.params[1:])
        return b""

    def exchange(self, capdu: bytes) -> bytes:
        self.stats.exchanges += 1
        if self.faults.slow_s:
            time.sleep(self.faults.slow_s)
        if self.faults.remove_at == self.stats.exchanges:
            self.stats.removals += 1
            self.away = self.faults.away_polls
            self.tag = None
            if isinstance(self.source, Capture):
                self.gone_for_good = True
        if isinstance(self.source, Capture):
            if not self.present():
                return STATUS_GONE
            self.stats.replies_left = len(self.replies) - 1
            return STATUS_OK + self.replies.pop(0)
        if self.away or self.tag is None:
            return STATUS_GONE
        return STATUS_OK + self.tag.handle(capdu)


def serve(
    link: PtyLink | str | Path,
    source: PenLog | Capture,
    faults: PenFaults = NO_FAULTS,
    stop_event: threading.Event | None = None,
    stats: SimStats | None = None,
) -> SimStats:
    """Serve the reader on ``link`` (a ``PtyLink`` or a symlink path to create) until ``stop_event`` is set."""
    stats = SimStats() if stats is None else stats
    stop = stop_event or threading.Event()
    own = not isinstance(link, PtyLink)
    pty = PtyLink(link) if not isinstance(link, PtyLink) else link
    reader = Reader(pty, source, faults, stats)
    try:
        while not stop.is_set():
            data = pty.read(timeout=0.05)
            if data:
                reader.feed(data)
    finally:
        if own:
            pty.close()
    return stats
