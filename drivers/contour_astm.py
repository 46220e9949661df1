"""Bayer/Ascensia Contour family: ASTM E1381 link + E1394 records (reference section B).

Supported features:
    - data transfer: EOT nudge, ENQ -> ACK, then E1394 records H, P, R..., L, EOT; whole frames the
      meter sends before its ENQ (a Contour USB answers the EOT with its header frame first) are
      skipped while waiting for the ENQ;
    - frames: numbers 1..7 then 0 (wrap), ETB or ETX on any frame, mod-256 checksum; a bad frame is
      NAKed and its retransmission accepted, at most ``MAX_RETRIES`` times per frame; a repeated
      frame (same number as the previous one: our ACK was lost) is ACKed and dropped;
    - records across frames (E1381): an intermediate frame ends in ETB without the record's CR,
      at any byte; frame texts are joined and split into records at CR (as python-astm's codec
      does), so one record may span frames and one frame may carry several records;
    - delimiters as the H record declares them (``H`` + field, repeat, component, escape; Bayer
      sends ``|\\^&``); escape sequences are not decoded (Contour meters send none);
    - identity (product code -> model, serial, firmware) and meter clock from the header record;
    - results in both R layouts (9-field Contour USB/Next, 12-field serial CONTOUR), mg/dL and
      mmol/L (the unit in each R record is authoritative), ``>``/``<`` markers with the measuring
      range from header ``V=LLHHH`` (default 10-600 mg/dL), control solution (``C`` marker, or
      ``E`` status on the old layout), meal markers B/A/F; markers are split on ``/`` and on the
      declared repeat delimiter (the old layout repeats abnormal flags, e.g. ``>\\T``); all kept raw
      in ``comment``;
    - remote-command clock replies (``D|YYMMDD|``, ``D|HHMM|``) are decoded by the codec.

Never sent: ``W|`` (write) commands. Expected device path: /dev/ttyUSB0 (FTDI cable), 9600 8N1.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections import deque
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation

from drivers.base import MeterDriver, SerialTransport
from drivers.errors import DriverError, InvalidChecksum, InvalidResponse, MissingChecksum, NoResponse
from drivers.models import Decoded, GlucoseReading, Meal, MeterIdentity, RangeFlag, Unit, mmoll_to_mgdl

log = logging.getLogger(__name__)

PROTOCOL = "contour-astm"

# --- E1381 control characters -----------------------------------------------------------------------
STX = b"\x02"  #: start of frame
ETX = b"\x03"  #: end of the last frame of a message
EOT = b"\x04"  #: end of transmission (also the host's "start" nudge)
ENQ = b"\x05"  #: sender asks to transmit
ACK = b"\x06"  #: frame accepted
NAK = b"\x15"  #: frame rejected, send it again
ETB = b"\x17"  #: end of an intermediate frame
CR = b"\r"
LF = b"\n"
CRLF = CR + LF
FRAME_MODULO = 8
FIRST_FRAME = 1
MAX_RETRIES = 6  # E1381: the sender gives up after six NAKs of one frame
MAX_FRAME_TEXT = 240  # E1381: text characters in one frame (longer records are split, intermediate frames ETB)
MAX_RECORD = 8192  # a Contour record is < 300 characters: a longer join is a broken stream, not a record
NOISE_BEFORE_ENQ = 64  # bytes outside frames tolerated while waiting for the meter's ENQ
MAX_FRAMES_BEFORE_ENQ = 8  # whole frames skipped while waiting for it

# --- E1394 delimiters and content -----------------------------------------------------------------------
FIELD = "|"
REPEAT = "\\"
COMPONENT = "^"
ESCAPE = "&"
DELIMITERS = REPEAT + COMPONENT + ESCAPE
ANALYTE_GLUCOSE = "Glucose"
MARK_HIGH = ">"
MARK_LOW = "<"
MARK_CONTROL = "C"  # Contour Next
STATUS_CONTROL = "E"  # old serial CONTOUR status field
MEAL_MARKS: dict[str, Meal] = {"B": Meal.BEFORE, "A": Meal.AFTER, "F": Meal.FASTING}
MEAL_LETTERS: dict[Meal, str] = {v: k for k, v in MEAL_MARKS.items()}
UNITS: dict[str, Unit] = {"mg/dL": Unit.MGDL, "mmol/L": Unit.MMOLL}
DEFAULT_LIMITS = (10, 600)  # mg/dL, when the header has no V=
LAYOUT_NEXT = 9
LAYOUT_OLD = 12

# --- remote command mode (read only) ----------------------------------------------------------------------
CMD_READ = b"R|"
CMD_DATE = b"D|"
CMD_TIME = b"T|"

MODELS: dict[str, str] = {
    "Bayer7150": "Contour",
    "Bayer7220": "Contour",
    "Bayer7160": "Contour Next EZ",
    "Bayer7390": "Contour USB",
    "Bayer7410": "Contour Next USB",
    "Bayer7350": "Contour Next",
    "Bayer6115": "Breeze 2",
    "Bayer6116": "Breeze 2",
}

_TEXT_RE = re.compile(r"^[\x20-\x7e\r]*$")  # CR separates records inside a frame
_MARK_RE = re.compile(r"^[A-Z0-9<>]{1,3}$")
_MGDL_RE = re.compile(r"^\d{1,4}$")
_MMOLL_RE = re.compile(r"^\d{1,2}(\.\d{1,2})?$")


class ProtocolError(InvalidResponse):
    """The E1381 exchange broke its rules: frame out of sequence, retries exhausted, early EOT."""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    number: int
    text: str  # record text (CR between records), without the CR before ETB/ETX
    final: bool  # ETX (end of message) rather than ETB
    ends_record: bool = True  # False: an intermediate frame; its last record continues in the next frame


@dataclasses.dataclass(frozen=True, slots=True)
class Delimiters:
    """E1394 delimiters, declared by the H record right after its ``H``."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"

    @classmethod
    def declared(cls, header_text: str) -> Delimiters:
        chars = header_text[1:5]
        if header_text[:1] != "H" or len(chars) != 4:
            raise InvalidResponse(f"not a header record: {header_text[:60]!r}")
        if len(set(chars)) != 4 or any(c.isalnum() or not c.isprintable() or c == " " for c in chars):
            raise InvalidResponse(f"unusable delimiters {chars!r} in the header record")
        return cls(*chars)


STANDARD = Delimiters()


class RecordJoiner:
    """Frame texts in, whole records out (E1381 §6.3: a record may be split over frames)."""

    def __init__(self) -> None:
        self._partial = ""

    @property
    def partial(self) -> bool:
        """A record has begun and not ended."""
        return bool(self._partial)

    def reset(self) -> None:
        self._partial = ""

    def feed(self, frame: Frame) -> list[str]:
        joined = self._partial + frame.text + (CR.decode() if frame.ends_record else "")
        *records, self._partial = joined.split(CR.decode())
        if len(self._partial) > MAX_RECORD:
            self._partial = ""
            raise ProtocolError(f"a record longer than {MAX_RECORD} characters (intermediate frames without an end)")
        return records


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    product: str
    versions: tuple[str, ...]
    serial: str
    config: tuple[tuple[str, str], ...]
    record_count: int | None
    clock: dt.datetime
    password: str = ""
    delimiters: Delimiters = dataclasses.field(default_factory=Delimiters)

    @property
    def model(self) -> str:
        return MODELS.get(self.product, self.product)

    def setting(self, key: str) -> str | None:
        return dict(self.config).get(key)

    @property
    def limits(self) -> tuple[int, int]:
        """Measuring range in mg/dL from ``V=LLHHH``."""
        v = self.setting("V")
        if v is None or not re.fullmatch(r"\d{5}", v):
            return DEFAULT_LIMITS
        return int(v[:2]), int(v[2:])


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    sequence: int
    analyte: str
    value: str
    unit: str
    method: str
    markers: tuple[str, ...]
    control: bool
    when: dt.datetime


# --- pure codec --------------------------------------------------------------------------------------------
def checksum(body: bytes) -> int:
    """Sum of the bytes from the frame number through ETB/ETX inclusive, mod 256."""
    return sum(body) & 0xFF


def encode_frame(number: int, text: str, *, final: bool, ends_record: bool = True) -> bytes:
    """One frame; ``ends_record=False`` makes an intermediate frame (ETB right after the text, no CR)."""
    if not ends_record and final:
        raise ValueError("the last frame of a message ends its record")
    end = (CR if ends_record else b"") + (ETX if final else ETB)
    body = str(number % FRAME_MODULO).encode("ascii") + text.encode("ascii") + end
    return STX + body + b"%02X" % checksum(body) + CRLF


def split_record(text: str, size: int = MAX_FRAME_TEXT) -> list[str]:
    """A record's text in frame-sized pieces (all but the last go out as intermediate frames)."""
    if size < 1:
        raise ValueError("frame text size must be positive")
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def decode_frame(data: bytes) -> Frame:
    """One frame ``STX FN text CR ETB|ETX C1 C2 CR LF`` (exactly, nothing around it); an intermediate
    frame has no CR before its ETB (``ends_record`` False)."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"bytes expected, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(STX) or not data.endswith(CRLF) or len(data) < 8:
        raise MissingChecksum(f"not a complete frame: {data[:40]!r}")
    terminator = data[-5:-4]
    ends_record = data[-6:-5] == CR
    if terminator not in (ETB, ETX) or (terminator == ETX and not ends_record):
        raise MissingChecksum(f"frame without ETB or CR ETX before its checksum: {data[-8:]!r}")
    wire_text = data[-4:-2]
    if not re.fullmatch(rb"[0-9A-F]{2}", wire_text):
        raise MissingChecksum(f"frame checksum is not two upper-case hex digits: {wire_text!r}")
    body = data[1:-4]
    wire, calculated = int(wire_text, 16), checksum(body)
    if wire != calculated:
        raise InvalidChecksum(wire, calculated, "frame checksum")
    number = body[:1]
    if not number.isdigit() or int(number) >= FRAME_MODULO:
        raise InvalidResponse(f"invalid frame number {number!r}")
    text = body[1 : -2 if ends_record else -1].decode("latin-1")
    if not _TEXT_RE.match(text):
        raise InvalidResponse(f"control or non-ASCII bytes inside frame text: {text[:40]!r}")
    return Frame(int(number), text, terminator == ETX, ends_record)


def parse_time(value: str) -> dt.datetime:
    """``YYYYMMDDHHMM`` or ``YYYYMMDDHHMMSS`` (naive meter-local time)."""
    formats = {12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if len(value) not in formats or not value.isdigit():
        raise InvalidResponse(f"invalid ASTM date/time {value!r}")
    try:
        return dt.datetime.strptime(value, formats[len(value)])
    except ValueError as exc:
        raise InvalidResponse(f"invalid ASTM date/time {value!r}") from exc


def record_type(text: str) -> str:
    return text[:1]


def decode_header(text: str) -> Header:
    d = Delimiters.declared(text)
    fields = text.split(d.field)
    if fields[0] != "H" or len(fields) < 13:
        raise InvalidResponse(f"not a header record: {text[:60]!r}")
    sender = fields[4].split(d.component)
    if len(sender) < 3 or not sender[2]:
        raise InvalidResponse(f"header without a serial number: {fields[4]!r}")
    config: list[tuple[str, str]] = []
    if "=" in fields[5]:
        for item in fields[5].split(d.component):
            key, _, value = item.partition("=")
            config.append((key, value))
    count = int(fields[6]) if len(fields) > 6 and fields[6].isdigit() else None
    return Header(
        product=sender[0],
        versions=tuple(sender[1].split(d.repeat)),
        serial=sender[2],
        config=tuple(config),
        record_count=count,
        clock=parse_time(fields[-1]),
        password=fields[3],
        delimiters=d,
    )


def _marks(field: str, d: Delimiters) -> list[str]:
    """Markers of one field: Bayer separates them with ``/``; E1394 repeats a field with the declared
    repeat delimiter (old layout: ``>\\T``). Both count, or a HIGH flag would read as in range."""
    return [m for m in field.replace(d.repeat, "/").split("/") if m]


def decode_result(text: str, delimiters: Delimiters = STANDARD) -> Result:
    """An R record in either layout (9 fields: Contour USB/Next; 12 fields: serial CONTOUR), with the
    delimiters its transfer's H record declared."""
    d = delimiters
    fields = text.split(d.field)
    if fields[0] != "R" or len(fields) not in (LAYOUT_NEXT, LAYOUT_OLD):
        raise InvalidResponse(f"not a result record of a known layout: {text[:60]!r}")
    if not fields[1].isdigit():
        raise InvalidResponse(f"invalid result sequence number {fields[1]!r}")
    unit, _, method = fields[4].partition(d.component)
    if len(fields) == LAYOUT_NEXT:
        markers = tuple(_marks(fields[6], d))
        control = MARK_CONTROL in markers
    else:
        # ref | abnormal | user mark | status: keep every non-empty mark, raw
        markers = tuple(m for f in fields[5:9] for m in _marks(f, d))
        control = STATUS_CONTROL in _marks(fields[8], d)
    return Result(
        sequence=int(fields[1]),
        analyte=fields[2].split(d.component)[-1],
        value=fields[3],
        unit=unit,
        method=method,
        markers=markers,
        control=control,
        when=parse_time(fields[-1]),
    )


def record_key(serial: str, when: dt.datetime, value: str, unit: str, control: bool) -> str:
    """Stable across reads (sequence numbers are not: they shift as memory fills)."""
    return f"{serial}:{when:%Y%m%d%H%M%S}:{value}{unit}:{'C' if control else 'P'}"


def make_reading(
    serial: str,
    when: dt.datetime,
    value: str,
    unit: str,
    markers: tuple[str, ...],
    limits: tuple[int, int],
    *,
    control: bool | None = None,
) -> GlucoseReading:
    """The one way a reading of this meter is built (decoder and record generator share it)."""
    native_unit = UNITS.get(unit)
    if native_unit is None:
        raise InvalidResponse(f"unknown unit {unit!r}")
    pattern = _MGDL_RE if native_unit is Unit.MGDL else _MMOLL_RE
    if not pattern.match(value):
        raise InvalidResponse(f"invalid {unit} value {value!r}")
    if MARK_HIGH in markers:
        mgdl, flag = limits[1], RangeFlag.HIGH
    elif MARK_LOW in markers:
        mgdl, flag = limits[0], RangeFlag.LOW
    else:
        try:
            mgdl = int(value) if native_unit is Unit.MGDL else mmoll_to_mgdl(Decimal(value))
        except (ValueError, InvalidOperation) as exc:
            raise InvalidResponse(f"invalid value {value!r}") from exc
        flag = RangeFlag.IN_RANGE
    is_control = MARK_CONTROL in markers if control is None else control
    meal = next((MEAL_MARKS[m] for m in markers if m in MEAL_MARKS), Meal.NONE)
    try:
        return GlucoseReading(
            meter_serial=serial,
            record_key=record_key(serial, when, value, unit, is_control),
            meter_time=when,
            value_mgdl=mgdl,
            native_value=value,
            native_unit=native_unit,
            range_flag=flag,
            control_solution=is_control,
            meal=meal,
            comment="/".join(markers),
        )
    except ValueError as exc:
        raise InvalidResponse(f"implausible result {value} {unit}: {exc}") from exc


def result_reading(result: Result, header: Header) -> GlucoseReading:
    return make_reading(
        header.serial, result.when, result.value, result.unit, result.markers, header.limits, control=result.control
    )


def reading_markers(reading: GlucoseReading) -> tuple[str, ...]:
    """Markers to send for a reading: its raw comment if that is a marker list, else derived."""
    raw = tuple(m for m in reading.comment.split("/") if m)
    if raw and all(_MARK_RE.match(m) for m in raw):
        return raw
    derived = [MEAL_LETTERS.get(reading.meal, "")]
    derived.append({RangeFlag.HIGH: MARK_HIGH, RangeFlag.LOW: MARK_LOW}.get(reading.range_flag, ""))
    derived.append(MARK_CONTROL if reading.control_solution else "")
    return tuple(m for m in derived if m)


def encode_result(sequence: int, reading: GlucoseReading) -> str:
    """A 9-field (Contour Next) R record for a reading (simulator side)."""
    when = reading.meter_time.strftime("%Y%m%d%H%M")
    markers = "/".join(reading_markers(reading))
    return f"R|{sequence}|^^^{ANALYTE_GLUCOSE}|{reading.native_value}|{reading.native_unit}^P||{markers}||{when}"


def decode_command_reply(data: bytes) -> str:
    """A remote-command reply ``D|value|`` CR LF ACK (leading ACK allowed) -> ``value``."""
    match = re.fullmatch(rb"\x06?D\|(\d+)\|\r\n\x06", data)
    if match is None:
        raise InvalidResponse(f"not a command reply: {data!r}")
    return match.group(1).decode("ascii")


def decode_clock_replies(date_reply: bytes, time_reply: bytes) -> dt.datetime:
    """Replies to ``R| D|`` (YYMMDD) and ``R| T|`` (HHMM) -> meter clock."""
    date, time = decode_command_reply(date_reply), decode_command_reply(time_reply)
    if len(date) != 6 or len(time) != 4:
        raise InvalidResponse(f"invalid clock replies {date!r} {time!r}")
    return parse_time("20" + date + time)


def decode_capture(data: bytes) -> Decoded:
    """Decode a raw capture of meter -> host bytes: frames anywhere in it, repeats dropped by number,
    records joined across intermediate frames."""
    readings: list[GlucoseReading] = []
    rejected: list[str] = []
    header: Header | None = None
    last_number: int | None = None
    joiner = RecordJoiner()
    for index, match in enumerate(re.finditer(rb"\x02[^\x02]*?\r\n", data), start=1):
        try:
            frame = decode_frame(match.group(0))
        except DriverError as exc:
            if joiner.partial:
                joiner.reset()  # a piece of the record is missing: the rest of it cannot be trusted
            rejected.append(f"frame {index}: {type(exc).__name__}: {exc}")
            continue
        if frame.number == last_number:
            continue  # retransmission of a frame we already have
        last_number = frame.number
        try:
            records = joiner.feed(frame)
        except DriverError as exc:
            rejected.append(f"frame {index}: {type(exc).__name__}: {exc}")
            continue
        for text in records:
            try:
                kind = record_type(text)
                if kind == "H":
                    header = decode_header(text)
                elif kind == "R":
                    result = decode_result(text, header.delimiters if header else STANDARD)
                    if result.analyte == ANALYTE_GLUCOSE:
                        if header is None:
                            raise ProtocolError("result record before any header record")
                        readings.append(result_reading(result, header))
            except DriverError as exc:
                rejected.append(f"frame {index}: {type(exc).__name__}: {exc}")
    return Decoded(tuple(readings), tuple(rejected), header.serial if header else None)


# --- device ------------------------------------------------------------------------------------------------
class Device(SerialTransport, MeterDriver):
    PROTOCOL = PROTOCOL
    TIMEOUT = 2.0

    def __init__(self, url: str, *, timeout: float | None = None) -> None:
        super().__init__(url, timeout=timeout)
        self._header: Header | None = None
        self._fresh = False  # a transfer is open and its records not read yet
        self._expected = FIRST_FRAME
        self._last: int | None = None
        self._joiner = RecordJoiner()
        self._records: deque[str] = deque()

    def _start_transfer(self) -> Header:
        self.flush_input()
        self.write(EOT)  # nudge: the meter answers [EOT] [frames] ENQ
        if not await_enq(self):
            raise NoResponse(f"no ENQ from a Contour meter on {self.url}")
        self.write(ACK)
        self._expected, self._last = FIRST_FRAME, None
        self._joiner.reset()
        self._records.clear()
        text = self._next_record()
        if text is None or record_type(text) != "H":
            raise ProtocolError(f"transfer did not start with a header record: {text!r}")
        self._header = decode_header(text)
        self._fresh = True
        return self._header

    def _next_record(self) -> str | None:
        """The next whole record of the transfer (joined across intermediate frames), or None at EOT."""
        while not self._records:
            frame = self._next_frame()
            if frame is None:
                if self._joiner.partial:
                    raise ProtocolError("transfer ended (EOT) inside a record split over frames")
                return None
            self._records.extend(self._joiner.feed(frame))
        return self._records.popleft()

    def _next_frame(self) -> Frame | None:
        """The next new frame (ACKed), or None at EOT. NAKs bad frames."""
        retries = 0
        while True:
            byte = self.read(1)
            if byte == EOT:
                return None
            if byte != STX:
                if byte:
                    continue  # noise between frames, stray ENQ
                problem: str = "timeout waiting for a frame"
            else:
                raw = STX + self.readline()
                try:
                    frame = decode_frame(raw)
                except InvalidResponse as exc:
                    problem = str(exc)
                else:
                    if frame.number == self._last:
                        log.debug("frame %d repeated; dropped", frame.number)
                        self.write(ACK)
                        continue
                    if frame.number != self._expected:
                        raise ProtocolError(f"frame {frame.number} out of sequence, expected {self._expected}")
                    self.write(ACK)
                    self._last, self._expected = frame.number, (frame.number + 1) % FRAME_MODULO
                    return frame
            retries += 1
            if retries > MAX_RETRIES:
                raise ProtocolError(f"frame {self._expected} failed {retries} times: {problem}")
            log.debug("NAK frame %d: %s", self._expected, problem)
            self.write(NAK)

    def _ensure_header(self) -> Header:
        return self._header if self._header is not None else self._start_transfer()

    def identify(self) -> MeterIdentity:
        h = self._ensure_header()
        return MeterIdentity(PROTOCOL, h.model, h.serial, REPEAT.join(h.versions))

    def read_clock(self) -> dt.datetime:
        """The clock in the header of the transfer (minute or second resolution)."""
        return self._ensure_header().clock

    def read_records(self) -> Iterator[GlucoseReading]:
        header = self._header if self._fresh and self._header else self._start_transfer()
        self._fresh = False
        results = 0
        while True:
            text = self._next_record()
            if text is None:
                raise ProtocolError(f"transfer ended (EOT) before the terminator record, after {results} results")
            kind = record_type(text)
            if kind == "R":
                result = decode_result(text, header.delimiters)
                if result.analyte != ANALYTE_GLUCOSE:
                    continue
                results += 1
                yield result_reading(result, header)
            elif kind == "L":
                break
            elif kind == "H":
                raise ProtocolError("a second header record inside one transfer")
        if self._records or self._next_record() is not None:
            log.warning("records after the terminator record")
        if header.record_count is not None and header.record_count != results:
            log.info("header announced %d results, %d glucose results received", header.record_count, results)


def await_enq(port: SerialTransport) -> bool:
    """After our EOT nudge: True once the meter's ENQ arrives, False on silence or only noise.

    Whole frames before the ENQ are skipped: a Contour USB answers the EOT with its header frame
    (~190 bytes) and then ENQ (glucometerutils' and glucodump's Contour USB captures); it sends
    the header again as frame 1 once we ACK. Bytes outside frames count against a small budget."""
    noise = frames = 0
    while noise < NOISE_BEFORE_ENQ:
        byte = port.read(1)
        if not byte:
            return False
        if byte == ENQ:
            return True
        if byte == STX and frames < MAX_FRAMES_BEFORE_ENQ:
            frames += 1
            if not port.readline().endswith(LF):  # the rest of the frame, through its CR LF
                return False
            continue
        noise += 1
    return False


def probe_port(port: SerialTransport) -> bool:
    """True when a meter answers our EOT nudge with ENQ (we do not ACK it, so no transfer starts)."""
    port.flush_input()
    port.write(EOT)
    return await_enq(port)
