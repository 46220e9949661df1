"""LifeScan OneTouch Ultra 2 (ASCII protocol, reference section A).

Supported features:
    - identity: serial number (``DM@``, 8 or 9 characters accepted), software version (``DM?``);
    - meter clock (``DMF``);
    - every stored record (``DMP``): mg/dL value, ``HIGH`` (> 600 mg/dL), control solution
      (``C``/``K``), suspect records (``?``), meal and comment codes; legacy OneTouch Ultra
      lines without meal/comment fields are decoded too;
    - the single-byte ``00`` reply ("meter switched on / not in the cable") -> ``MeterNotReady``.

Never sent: ``DMZ`` (erase) and ``DMT`` (set clock).

Expected device path: /dev/ttyUSB0 (PL2303, FTDI or CH340 cable), 9600 8N1, no flow control.
The meter answers only when switched OFF with the cable plugged in.

Every reply line is ``payload SP XXXX CR LF`` where XXXX is the 16-bit sum of the payload
bytes in upper-case hex. The codec below is pure (bytes in, values out); only ``Device``
touches the port.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Iterator

from drivers.base import MeterDriver, SerialTransport
from drivers.errors import (
    DriverError,
    InvalidChecksum,
    InvalidResponse,
    MeterNotReady,
    MissingChecksum,
    NoResponse,
)
from drivers.models import Decoded, GlucoseReading, Meal, MeterIdentity, RangeFlag, Unit

log = logging.getLogger(__name__)

PROTOCOL = "onetouch-ultra2"
MODEL = "OneTouch Ultra 2"

# --- wire constants -------------------------------------------------------------------------------
#: Host command prefix (XON) sent before each command.
DC1 = b"\x11"
CR = b"\r"
LF = b"\n"
CRLF = CR + LF
#: Reply of a meter that is switched on or not seated in the cable.
NOT_READY = b"\x00"

CMD_VERSION = b"DM?"
CMD_SERIAL = b"DM@"
CMD_CLOCK = b"DMF"
CMD_DUMP = b"DMP"
#: Read-only commands this driver may send (the simulator answers these).
READ_ONLY_COMMANDS = (CMD_VERSION, CMD_SERIAL, CMD_CLOCK, CMD_DUMP)

HIGH_LIMIT_MGDL = 600
HIGH_TEXT = "HIGH"
CONTROL_MARKS = ("C", "K")  # K when the meter language is SVENS or DEUTS
SUSPECT_MARK = "?"
MAX_RECORDS = 500
DUMP_START_TIMEOUT = 10.0  # Tidepool waits up to 18 s for the DMP reply; the line timeout applies after
COMMAND_RETRIES = 2  # short read-only commands are asked again on a damaged reply (never DMP)

MEAL_CODES: dict[str, Meal] = {"N": Meal.NONE, "B": Meal.BEFORE, "A": Meal.AFTER}
MEAL_LETTERS: dict[Meal, str] = {v: k for k, v in MEAL_CODES.items()}
COMMENT_CODES: dict[str, str] = {
    "00": "",
    "01": "Not Enough Food",
    "02": "Too Much Food",
    "03": "Mild Exercise",
    "04": "Hard Exercise",
    "05": "Medication",
    "06": "Stress",
    "07": "Illness",
    "08": "Feel Hypo",
    "09": "Menses",
    "10": "Vacation",
    "11": "Other",
}
COMMENT_NUMBERS: dict[str, str] = {v: k for k, v in COMMENT_CODES.items()}
DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")

_LINE_RE = re.compile(rb"^([\x20-\x7e]+) ([0-9A-F]{4})\r\n?$")
_SERIAL_RE = re.compile(r'^@ "([A-Z0-9]{8,9})"$')
_VERSION_RE = re.compile(r"^\?(\S.*)$")
_TIME = r'"([A-Z]{3})","(\d\d/\d\d/\d\d)","(\d\d:\d\d:\d\d)   "'
_CLOCK_RE = re.compile(rf"^[FT] {_TIME}$")
_HEADER_RE = re.compile(r'^P (\d{3}),"([A-Z0-9]{8,9})","(MG/DL |MMOL/L)"$')
_RECORD_RE = re.compile(rf'^P {_TIME},"([ CK])( \d{{3}}|{HIGH_TEXT})([ ?])"(?:,"([NBA])","(0\d|1[01])")?, 00$')


@dataclasses.dataclass(frozen=True, slots=True)
class DumpHeader:
    count: int
    serial: str
    unit: str  # display unit only: records are always mg/dL


# --- pure codec -------------------------------------------------------------------------------------
def checksum(payload: bytes) -> int:
    """16-bit sum of the payload bytes (everything before the space that precedes the checksum)."""
    return sum(payload) & 0xFFFF


def encode_command(command: bytes) -> bytes:
    """``DC1 CR command CR`` as the meter expects it."""
    return DC1 + CR + command + CR


def encode_line(payload: bytes) -> bytes:
    """A reply line as the meter sends it (used by the simulator and tests)."""
    return payload + b" %04X" % checksum(payload) + CRLF


def strip_checksum(line: bytes) -> str:
    """Verify one reply line (terminated by CR, optionally LF) and return its payload text."""
    if not isinstance(line, bytes | bytearray):
        raise TypeError(f"bytes expected, got {type(line).__name__}")
    match = _LINE_RE.match(bytes(line))
    if match is None:
        if line.strip(b"\x00\r\n") == b"" and NOT_READY in line:
            raise MeterNotReady("meter replied 00: switch the meter off and leave it in the cable")
        raise MissingChecksum(f"line without a valid checksum field: {bytes(line)[:80]!r}")
    payload, wire = match.group(1), int(match.group(2), 16)
    calculated = checksum(payload)
    if wire != calculated:
        raise InvalidChecksum(wire, calculated, "line checksum")
    return payload.decode("ascii")


def parse_time(date: str, time: str) -> dt.datetime:
    """``MM/DD/YY`` + ``HH:MM:SS`` (year 2000 + YY), naive meter-local time."""
    try:
        return dt.datetime.strptime(f"{date} {time}", "%m/%d/%y %H:%M:%S").replace(year=2000 + int(date[6:8]))
    except ValueError as exc:
        raise InvalidResponse(f"invalid date/time {date!r} {time!r}") from exc


def format_time(when: dt.datetime) -> str:
    """The quoted ``"DOW","MM/DD/YY","HH:MM:SS   "`` triple."""
    return f'"{DAYS[when.weekday()]}","{when:%m/%d/%y}","{when:%H:%M:%S}   "'


def decode_serial(payload: str) -> str:
    match = _SERIAL_RE.match(payload)
    if match is None:
        raise InvalidResponse(f"not a serial number reply: {payload!r}")
    return match.group(1)


def decode_version(payload: str) -> str:
    match = _VERSION_RE.match(payload)
    if match is None:
        raise InvalidResponse(f"not a version reply: {payload!r}")
    return match.group(1)


def decode_clock(payload: str) -> dt.datetime:
    """A ``DMF`` (or ``DMT``) reply: ``F "SAT","03/21/15","16:45:24   "``."""
    match = _CLOCK_RE.match(payload)
    if match is None:
        raise InvalidResponse(f"not a clock reply: {payload!r}")
    return parse_time(match.group(2), match.group(3))


def decode_header(payload: str) -> DumpHeader:
    match = _HEADER_RE.match(payload)
    if match is None:
        raise InvalidResponse(f"not a DMP header: {payload!r}")
    return DumpHeader(int(match.group(1)), match.group(2), match.group(3))


def record_key(serial: str, when: dt.datetime, control: bool, native_value: str) -> str:
    """Stable across reads: time, value and control mark (meal/comment may be edited later)."""
    return f"{serial}:{when:%Y%m%dT%H%M%S}:{'C' if control else 'P'}:{native_value}"


def make_reading(
    serial: str,
    when: dt.datetime,
    native_value: str,
    *,
    control: bool = False,
    suspect: bool = False,
    meal: Meal = Meal.NONE,
    comment: str = "",
) -> GlucoseReading:
    """The one way a reading of this meter is built (decoder and record generator share it)."""
    if native_value == HIGH_TEXT:
        value, flag = HIGH_LIMIT_MGDL, RangeFlag.HIGH
    else:
        value, flag = int(native_value), RangeFlag.IN_RANGE
    return GlucoseReading(
        meter_serial=serial,
        record_key=record_key(serial, when, control, native_value),
        meter_time=when,
        value_mgdl=value,
        native_value=native_value,
        native_unit=Unit.MGDL,
        range_flag=flag,
        control_solution=control,
        meal=meal,
        comment=comment,
        suspect=suspect,
    )


def decode_record(payload: str, serial: str) -> GlucoseReading:
    """One ``DMP`` record line (checksum already verified)."""
    match = _RECORD_RE.match(payload)
    if match is None:
        raise InvalidResponse(f"not a DMP record: {payload!r}")
    _dow, date, time, control, value, suspect, meal, comment = match.groups()
    when = parse_time(date, time)
    return make_reading(
        serial,
        when,
        value.strip(),
        control=control in CONTROL_MARKS,
        suspect=suspect == SUSPECT_MARK,
        meal=MEAL_CODES[meal] if meal else Meal.NONE,
        comment=COMMENT_CODES[comment] if comment else "",
    )


def encode_record(reading: GlucoseReading) -> bytes:
    """The checksummed ``DMP`` line for a reading (simulator side)."""
    if reading.range_flag is RangeFlag.HIGH:
        value = HIGH_TEXT
    elif reading.range_flag is RangeFlag.LOW:
        raise ValueError("the Ultra 2 has no LO result")
    else:
        value = f" {reading.value_mgdl:03d}"
    if reading.comment not in COMMENT_NUMBERS:
        raise ValueError(f"unknown Ultra 2 comment {reading.comment!r}; known: {sorted(COMMENT_NUMBERS)}")
    if reading.meal not in MEAL_LETTERS:
        raise ValueError(f"the Ultra 2 has no meal marker {reading.meal}")
    payload = (
        f"P {format_time(reading.meter_time)},"
        f'"{"C" if reading.control_solution else " "}{value}{"?" if reading.suspect else " "}",'
        f'"{MEAL_LETTERS[reading.meal]}","{COMMENT_NUMBERS[reading.comment]}", 00'
    )
    return encode_line(payload.encode("ascii"))


def encode_header(count: int, serial: str, unit: str = "MG/DL ") -> bytes:
    return encode_line(f'P {count:03d},"{serial}","{unit}"'.encode("ascii"))


def decode_capture(data: bytes) -> Decoded:
    """Decode a raw capture of meter -> host bytes (any mix of replies); never raises on bad lines."""
    serial: str | None = None
    readings: list[GlucoseReading] = []
    rejected: list[str] = []
    for number, raw in enumerate(data.split(LF), start=1):
        if not raw.strip(b"\x00\r"):
            continue
        try:
            text = strip_checksum(raw + LF)
            if text.startswith('P "'):
                readings.append(decode_record(text, serial or "unknown"))
            elif text.startswith("P "):
                serial = decode_header(text).serial
            elif text.startswith("@"):
                serial = decode_serial(text)
        except DriverError as exc:
            rejected.append(f"line {number}: {type(exc).__name__}: {exc}")
    return Decoded(tuple(readings), tuple(rejected), serial)


# --- device ---------------------------------------------------------------------------------------
class Device(SerialTransport, MeterDriver):
    PROTOCOL = PROTOCOL
    TIMEOUT = 2.0  # longest silence between two lines of a reply

    def _command(self, command: bytes, retries: int = 0, wait: float | None = None) -> str:
        """Send a command and verify its one-line reply; short read-only commands may be retried.

        ``wait``: longer timeout for the first reply line (the meter may pause before a dump).
        """
        for attempt in range(retries + 1):
            self.flush_input()
            self.write(encode_command(command))
            line = self._readline_within(wait)
            try:
                if not line:
                    raise NoResponse(f"no reply to {command.decode()} on {self.url}")
                return strip_checksum(line)
            except MeterNotReady:
                raise
            except DriverError as exc:
                if attempt == retries:
                    raise
                log.debug("%s: %s; asking again", command.decode(), exc)
        raise NoResponse(f"no reply to {command.decode()}")  # not reached: the loop returns or raises

    def _readline_within(self, wait: float | None) -> bytes:
        if wait is None or wait <= (self.port.timeout or 0):
            return self.readline()
        with self.read_timeout(wait):
            return self.readline()

    def identify(self) -> MeterIdentity:
        serial = decode_serial(self._command(CMD_SERIAL, COMMAND_RETRIES))
        if len(serial) != 9 or not serial.endswith("Y"):
            log.info("serial %s is not of the documented 9-character ...Y form; accepted", serial)
        version = decode_version(self._command(CMD_VERSION, COMMAND_RETRIES))
        return MeterIdentity(PROTOCOL, MODEL, serial, version)

    def read_clock(self) -> dt.datetime:
        return decode_clock(self._command(CMD_CLOCK, COMMAND_RETRIES))

    def read_records(self) -> Iterator[GlucoseReading]:
        """Yield every verified record, newest first; a bad line is skipped and reported at the end."""
        header = decode_header(self._command(CMD_DUMP, wait=DUMP_START_TIMEOUT))
        rejected: list[str] = []
        for index in range(header.count):
            line = self.readline()
            if not line:
                raise NoResponse(f"dump stopped after line {index} of {header.count}")
            try:
                yield decode_record(strip_checksum(line), header.serial)
            except InvalidResponse as exc:
                log.warning("record line %d rejected: %s", index + 1, exc)
                rejected.append(f"line {index + 1}: {exc}")
        if rejected:
            raise InvalidResponse(f"{len(rejected)} of {header.count} record lines rejected ({rejected[0]})")


def probe_port(port: SerialTransport) -> bool:
    """True when an Ultra 2 answers the read-only version query (or says it is switched on)."""
    port.flush_input()
    port.write(encode_command(CMD_VERSION))
    line = port.readline()
    try:
        decode_version(strip_checksum(line))
    except MeterNotReady:
        return True
    except DriverError:
        return False
    return True
