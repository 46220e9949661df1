"""PHD transport: IEEE 11073-20601 APDUs carried in NDEF "PHD" records on a Type 4 tag.

Record: ``D1 03 <payload len> 'P' 'H' 'D' <0x80 | seq & 0x0F> <APDU>`` (short record,
well-known type, payload = sequence byte + APDU) [NVP ``data/PhdPacket.kt``, XD
``ll/PHDll.java``]. The host starts at sequence 1 and then answers every pen
packet with (pen seq + 1); the pen answers the host with (host seq + 1).

``encode_phd``/``decode_phd`` are pure. ``PhdLink`` runs the exchange over a
``Type4Tag``: write the host packet, read the pen's packet, write the empty
record ``D0 00 00`` to acknowledge the read.
"""

from __future__ import annotations

import dataclasses
import logging

from drivers.errors import InvalidResponse
from drivers.novopen.type4 import Type4Tag

__all__ = [
    "EMPTY_RECORD",
    "PHD_TYPE",
    "PhdError",
    "PhdLink",
    "PhdPacket",
    "decode_phd",
    "encode_phd",
]

log = logging.getLogger(__name__)

#: NDEF record header flags.
NDEF_MB = 0x80  # message begin
NDEF_ME = 0x40  # message end
NDEF_CF = 0x20  # chunk flag
NDEF_SR = 0x10  # short record: one-byte payload length
NDEF_IL = 0x08  # ID length present
NDEF_TNF_MASK = 0x07
TNF_EMPTY = 0x00
TNF_WELL_KNOWN = 0x01
#: Header of the records we write: MB | ME | SR | well-known.
PHD_HEADER = NDEF_MB | NDEF_ME | NDEF_SR | TNF_WELL_KNOWN
#: Record type.
PHD_TYPE = b"PHD"
#: Sequence byte: fixed high bit, 4-bit sequence number.
SEQ_FLAG = 0x80
SEQ_MASK = 0x0F
SEQ_MODULO = 0x10
#: The empty NDEF record (MB | ME | TNF empty, no type, no payload) written to acknowledge a read.
EMPTY_RECORD = bytes((NDEF_MB | NDEF_ME | NDEF_SR | TNF_EMPTY, 0x00, 0x00))
#: Largest APDU in a short record (payload length byte includes the sequence byte).
MAX_SHORT_APDU = 0xFF - 1


class PhdError(InvalidResponse):
    """An NDEF message that is not a well-formed PHD record, or a sequence break."""


@dataclasses.dataclass(frozen=True, slots=True)
class PhdPacket:
    seq: int  # 0..15
    apdu: bytes  # may be empty: the pen has nothing to say yet
    seq_byte: int = SEQ_FLAG  # the raw sequence byte (the pen's first packet carries 0x00)

    def __post_init__(self) -> None:
        if not 0 <= self.seq < SEQ_MODULO:
            raise ValueError(f"PHD sequence out of range: {self.seq}")


def encode_phd(seq: int, apdu: bytes) -> bytes:
    """Short NDEF record for ``apdu``; e.g. seq 7, ``0E0F1011121314`` -> ``D10308504844870E0F1011121314``."""
    if len(apdu) > MAX_SHORT_APDU:
        raise ValueError(f"APDU of {len(apdu)} bytes does not fit a short PHD record")
    return bytes((PHD_HEADER, len(PHD_TYPE), len(apdu) + 1)) + PHD_TYPE + bytes((SEQ_FLAG | (seq & SEQ_MASK),)) + apdu


def decode_phd(message: bytes) -> PhdPacket:
    """The PHD record in an NDEF message (short or long form, optional ID)."""
    if len(message) < 3:
        raise PhdError(f"NDEF message of {len(message)} bytes")
    header, type_len = message[0], message[1]
    if header & NDEF_TNF_MASK != TNF_WELL_KNOWN or header & NDEF_CF:
        raise PhdError(f"NDEF record header 0x{header:02X} is not a well-known unchunked record")
    pos = 2
    if header & NDEF_SR:
        payload_len = message[pos]
        pos += 1
    else:
        if len(message) < pos + 4:
            raise PhdError("NDEF long record truncated in its payload length")
        payload_len = int.from_bytes(message[pos : pos + 4], "big")
        pos += 4
    id_len = 0
    if header & NDEF_IL:
        if len(message) <= pos:
            raise PhdError("NDEF record truncated in its ID length")
        id_len = message[pos]
        pos += 1
    record_type = message[pos : pos + type_len]
    pos += type_len + id_len
    if record_type != PHD_TYPE:
        raise PhdError(f"NDEF record type {record_type!r}, expected {PHD_TYPE!r}")
    payload = message[pos : pos + payload_len]
    if payload_len < 1 or len(payload) != payload_len:
        raise PhdError(f"PHD payload length {payload_len}, {len(payload)} bytes present")
    if len(message) != pos + payload_len:
        raise PhdError(f"{len(message) - pos - payload_len} bytes after the PHD record")
    seq_byte = payload[0]
    return PhdPacket(seq_byte & SEQ_MASK, bytes(payload[1:]), seq_byte)


class PhdLink:
    """PHD packets over a Type 4 tag, with the sequence rule checked on every pen packet."""

    def __init__(self, tag: Type4Tag) -> None:
        self.tag = tag
        self.next_seq = 1  # host starts at 1 [NVP PhdManager]

    def receive_first(self) -> bytes:
        """The packet the pen left in its NDEF file before we spoke (its association request)."""
        packet = self._read()
        self.next_seq = (packet.seq + 1) % SEQ_MODULO
        return packet.apdu

    def exchange(self, apdu: bytes) -> bytes:
        """Send ``apdu`` (empty = poll) and return the pen's APDU (empty when it has nothing yet)."""
        sent = self.next_seq
        self.tag.write_ndef(encode_phd(sent, apdu))
        packet = self._read()
        expected = (sent + 1) % SEQ_MODULO
        if packet.seq != expected:
            raise PhdError(f"pen answered sequence {packet.seq}, expected {expected}")
        self.next_seq = (packet.seq + 1) % SEQ_MODULO
        return packet.apdu

    def _read(self) -> PhdPacket:
        packet = decode_phd(self.tag.read_ndef())
        self.tag.write_ndef(EMPTY_RECORD)
        log.debug("pen packet seq %d, %d APDU bytes", packet.seq, len(packet.apdu))
        return packet
