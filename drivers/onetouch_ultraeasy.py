"""LifeScan OneTouch UltraEasy / UltraMini (binary protocol, reference section C).

Supported features:
    - packets ``02 LEN LINK MESSAGE 03 CRC16-LE`` with CRC-16/CCITT-FALSE over STX..ETX;
    - link control: DISC to open and close the session, S/E sequence bits, ACK packets both
      ways, MORE accepted; a request whose reply is lost or damaged is sent again with the same
      S bit (the meter then repeats its reply), at most ``MAX_RETRIES`` times;
    - identity (serial, software version), meter clock, record count and every record, newest
      first; HI (0xFFFF) and LO (0xFFFE) results become HIGH 600 / LOW 20 mg/dL.

Never sent: ``05 1A`` (erase) and ``05 20 01`` (set clock).
Expected device path: /dev/ttyUSB0 (LifeScan TRS cable), 9600 8N1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import struct
from collections.abc import Iterator

from drivers.base import MeterDriver, SerialTransport
from drivers.errors import DriverError, InvalidChecksum, InvalidResponse, MissingChecksum, NoResponse, PortError
from drivers.models import Decoded, GlucoseReading, MeterIdentity, RangeFlag, Unit

log = logging.getLogger(__name__)

PROTOCOL = "onetouch-ultraeasy"
MODEL = "OneTouch UltraEasy"

# --- framing ------------------------------------------------------------------------------------------
STX = 0x02
ETX = 0x03
PACKET_OVERHEAD = 6  # STX, LEN, LINK ... ETX, CRC lo, CRC hi
MAX_PACKET = 64
LINK_MORE = 0x10
LINK_DISC = 0x08
LINK_ACK = 0x04
LINK_E = 0x02  # expected-receive bit
LINK_S = 0x01  # send bit
MAX_RETRIES = 4

# --- messages (all read-only) ------------------------------------------------------------------------------
MSG_PREFIX = b"\x05"
REPLY_OK = b"\x05\x06"
REPLY_COUNT = b"\x05\x0f"
REQ_VERSION = b"\x05\x0d\x02"
REQ_SERIAL = b"\x05\x0b\x02\x00\x00\x00\x00\x84\x6a\xe8\x73\x00"
REQ_CLOCK = b"\x05\x20\x02\x00\x00\x00\x00"
REQ_RECORD = b"\x05\x1f"  # + u16 LE index, 0 = newest
COUNT_INDEX = 501  # "read record 501" answers the record count
READ_ONLY_REQUESTS = (REQ_VERSION, REQ_SERIAL, REQ_CLOCK, REQ_RECORD)

RAW_HIGH = 0xFFFF
RAW_LOW = 0xFFFE
HIGH_LIMIT_MGDL = 600
LOW_LIMIT_MGDL = 20
EPOCH = dt.datetime(1970, 1, 1)  # seconds since then, of local wall-clock time

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<II")


@dataclasses.dataclass(frozen=True, slots=True)
class Packet:
    link: int
    message: bytes

    @property
    def ack(self) -> bool:
        return bool(self.link & LINK_ACK)

    @property
    def disc(self) -> bool:
        return bool(self.link & LINK_DISC)

    @property
    def s(self) -> int:
        return self.link & LINK_S


# --- pure codec ------------------------------------------------------------------------------------------
def crc_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def link_bits(*, s: int = 0, e: int = 0, ack: bool = False, disc: bool = False, more: bool = False) -> int:
    return (
        (LINK_S if s else 0)
        | (LINK_E if e else 0)
        | (LINK_ACK if ack else 0)
        | (LINK_DISC if disc else 0)
        | (LINK_MORE if more else 0)
    )


def encode_packet(message: bytes, link: int) -> bytes:
    if len(message) + PACKET_OVERHEAD > MAX_PACKET:
        raise ValueError(f"message too long: {len(message)} bytes")
    body = bytes([STX, len(message) + PACKET_OVERHEAD, link]) + message + bytes([ETX])
    return body + _U16.pack(crc_ccitt(body))


def decode_packet(data: bytes) -> Packet:
    """Exactly one packet."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"bytes expected, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < PACKET_OVERHEAD or data[0] != STX:
        raise MissingChecksum(f"not a packet: {data[:16].hex()}")
    if data[1] != len(data):
        raise InvalidResponse(f"packet length byte {data[1]} but {len(data)} bytes")
    if data[-3] != ETX:
        raise MissingChecksum(f"packet without ETX before its CRC: {data.hex()}")
    wire, calculated = _U16.unpack(data[-2:])[0], crc_ccitt(data[:-2])
    if wire != calculated:
        raise InvalidChecksum(wire, calculated, "packet CRC")
    if data[2] & 0xE0:
        raise InvalidResponse(f"unknown link-control bits 0x{data[2]:02X}")
    return Packet(data[2], data[3:-3])


def encode_request_record(index: int) -> bytes:
    return REQ_RECORD + _U16.pack(index)


def decode_ok(message: bytes, length: int | None = None) -> bytes:
    """The data of a ``05 06`` success reply (checked against an exact data length if given)."""
    if not message.startswith(REPLY_OK):
        raise InvalidResponse(f"meter refused or unknown reply: {message.hex()}")
    data = message[len(REPLY_OK) :]
    if length is not None and len(data) != length:
        raise InvalidResponse(f"reply data of {len(data)} bytes, expected {length}: {message.hex()}")
    return data


def decode_serial(message: bytes) -> str:
    text = decode_ok(message).rstrip(b"\x00")
    if not text or not text.isalnum() or not text.isascii():
        raise InvalidResponse(f"not a serial number: {message.hex()}")
    return text.decode("ascii")


def decode_version(message: bytes) -> str:
    data = decode_ok(message)
    if not data or data[0] != len(data) - 1 or not data[1:].isascii():
        raise InvalidResponse(f"not a version reply: {message.hex()}")
    return data[1:].decode("ascii").strip()


def decode_time(raw: int) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=raw)


def encode_time(when: dt.datetime) -> int:
    return int((when - EPOCH).total_seconds())


def decode_clock(message: bytes) -> dt.datetime:
    return decode_time(_U32.unpack(decode_ok(message, 4))[0])


def decode_count(message: bytes) -> int:
    if not message.startswith(REPLY_COUNT) or len(message) != len(REPLY_COUNT) + 2:
        raise InvalidResponse(f"not a record-count reply: {message.hex()}")
    return int(_U16.unpack(message[2:])[0])


def record_key(serial: str, when: dt.datetime, native_value: str) -> str:
    return f"{serial}:{when:%Y%m%dT%H%M%S}:{native_value}"


def make_reading(serial: str, when: dt.datetime, raw_value: int) -> GlucoseReading:
    """The one way a reading of this meter is built (decoder and record generator share it)."""
    if raw_value == RAW_HIGH:
        native, value, flag = "HI", HIGH_LIMIT_MGDL, RangeFlag.HIGH
    elif raw_value == RAW_LOW:
        native, value, flag = "LO", LOW_LIMIT_MGDL, RangeFlag.LOW
    else:
        native, value, flag = str(raw_value), raw_value, RangeFlag.IN_RANGE
    try:
        return GlucoseReading(
            meter_serial=serial,
            record_key=record_key(serial, when, native),
            meter_time=when,
            value_mgdl=value,
            native_value=native,
            native_unit=Unit.MGDL,
            range_flag=flag,
        )
    except ValueError as exc:
        raise InvalidResponse(f"implausible record value {raw_value}: {exc}") from exc


def decode_record(message: bytes, serial: str) -> GlucoseReading:
    raw_time, raw_value = _RECORD.unpack(decode_ok(message, _RECORD.size))
    return make_reading(serial, decode_time(raw_time), raw_value)


def encode_record(reading: GlucoseReading) -> bytes:
    """The reply message for a reading (simulator side)."""
    raw = {RangeFlag.HIGH: RAW_HIGH, RangeFlag.LOW: RAW_LOW}.get(reading.range_flag, reading.value_mgdl)
    return REPLY_OK + _RECORD.pack(encode_time(reading.meter_time), raw)


def split_packets(data: bytes) -> Iterator[bytes | str]:
    """Cut a byte stream into candidate packets (bytes) and skipped garbage (str notes)."""
    at = 0
    while at < len(data):
        start = data.find(bytes([STX]), at)
        if start < 0:
            return
        if start + 1 >= len(data):
            yield f"truncated packet at byte {start}"
            return
        length = data[start + 1]
        if length < PACKET_OVERHEAD or length > MAX_PACKET:
            at = start + 1
            continue
        candidate = data[start : start + length]
        try:
            decode_packet(candidate)
        except DriverError as exc:
            yield f"bytes {start}..{start + length}: {type(exc).__name__}: {exc}"
            at = start + 1
            continue
        yield candidate
        at = start + length


def decode_capture(data: bytes) -> Decoded:
    """Decode meter -> host bytes without the requests: replies are recognised by shape.

    A 10-byte ``05 06`` reply is a record unless its 8 data bytes are all letters/digits
    (then it is the serial number). A repeated reply (same S bit and bytes) is dropped.
    """
    serial: str | None = None
    readings: list[GlucoseReading] = []
    rejected: list[str] = []
    previous: Packet | None = None
    for item in split_packets(data):
        if isinstance(item, str):
            rejected.append(item)
            continue
        packet = decode_packet(item)
        if packet.ack or packet.disc or not packet.message:
            continue
        if packet == previous:
            continue
        previous = packet
        message = packet.message
        try:
            body = decode_ok(message) if message.startswith(REPLY_OK) else b""
            if len(body) == _RECORD.size and not body.isalnum():
                readings.append(decode_record(message, serial or "unknown"))
            elif body.rstrip(b"\x00").isalnum() and len(body) >= 6:
                serial = decode_serial(message)
        except DriverError as exc:
            rejected.append(f"packet {message.hex()}: {type(exc).__name__}: {exc}")
    return Decoded(tuple(readings), tuple(rejected), serial)


# --- device -----------------------------------------------------------------------------------------------
class Device(SerialTransport, MeterDriver):
    PROTOCOL = PROTOCOL
    TIMEOUT = 0.5

    def __init__(self, url: str, *, timeout: float | None = None) -> None:
        super().__init__(url, timeout=timeout)
        self._s = 0  # our send bit
        self._e = 0  # the meter's send bit we expect next
        self._connected = False
        self._serial = ""

    def _read_packet(self) -> Packet:
        for _ in range(MAX_PACKET * 4):
            first = self.read(1)
            if not first:
                raise NoResponse(f"no reply from an UltraEasy on {self.url}")
            if first[0] == STX:
                break
        else:
            raise InvalidResponse("no packet start in the received bytes")
        length = self.read(1)
        if not length:
            raise NoResponse("packet cut off after STX")
        if not PACKET_OVERHEAD <= length[0] <= MAX_PACKET:
            raise InvalidResponse(f"implausible packet length {length[0]}")
        rest = self.read(length[0] - 2)
        return decode_packet(first + length + rest)

    def _disconnect_packet(self) -> Packet:
        self.flush_input()
        self.write(encode_packet(b"", link_bits(disc=True)))
        reply = self._read_packet()
        if not reply.disc:
            raise InvalidResponse(f"expected a disconnect acknowledgement, got link 0x{reply.link:02X}")
        self._s = self._e = 0
        return reply

    def _connect(self) -> None:
        """DISC opens a fresh session and resets the sequence bits (retried like any request)."""
        for attempt in range(MAX_RETRIES + 1):
            if self._connected:
                return
            try:
                self._disconnect_packet()
            except PortError:
                raise
            except DriverError:
                if attempt == MAX_RETRIES:
                    raise
                continue
            self._connected = True

    def request(self, message: bytes) -> bytes:
        """Send one request; returns the reply message. Retries lost or damaged exchanges."""
        self._connect()
        last: DriverError | None = None
        for attempt in range(MAX_RETRIES + 1):
            if attempt:
                log.debug("retrying %s (attempt %d): %s", message[:2].hex(), attempt + 1, last)
                self.flush_input()
            self.write(encode_packet(message, link_bits(s=self._s, e=self._e)))
            try:
                reply = self._read_packet()
                if reply.ack and not reply.message:
                    reply = self._read_packet()  # the link-level ACK comes first, then the reply
                if reply.ack or reply.disc:
                    raise InvalidResponse(f"unexpected link control 0x{reply.link:02X}")
                if reply.s != self._e:
                    raise InvalidResponse(f"reply with send bit {reply.s}, expected {self._e}")
            except PortError:
                raise
            except DriverError as exc:
                last = exc
                continue
            self._e ^= 1
            self._s ^= 1
            self.write(encode_packet(b"", link_bits(s=self._s, e=self._e, ack=True)))
            return reply.message
        if last is None:
            raise NoResponse(f"no reply to {message[:2].hex()}")
        raise last

    def identify(self) -> MeterIdentity:
        self._serial = decode_serial(self.request(REQ_SERIAL))
        version = decode_version(self.request(REQ_VERSION))
        return MeterIdentity(PROTOCOL, MODEL, self._serial, version)

    def read_clock(self) -> dt.datetime:
        return decode_clock(self.request(REQ_CLOCK))

    def read_records(self) -> Iterator[GlucoseReading]:
        serial = self._serial or decode_serial(self.request(REQ_SERIAL))
        count = decode_count(self.request(encode_request_record(COUNT_INDEX)))
        for index in range(count):
            yield decode_record(self.request(encode_request_record(index)), serial)

    def close(self) -> None:
        if self._connected:
            with contextlib.suppress(DriverError):
                self.write(encode_packet(b"", link_bits(disc=True)))
        super().close()


def probe_port(port: SerialTransport) -> bool:
    """True when a meter answers a DISC packet (opens/resets the link; changes nothing)."""
    port.flush_input()
    port.write(encode_packet(b"", link_bits(disc=True)))
    data = port.read(PACKET_OVERHEAD)
    try:
        return decode_packet(data).disc
    except DriverError:
        return False
