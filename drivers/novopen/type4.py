"""NFC Forum Type 4 Tag access: ISO/IEC 7816-4 command APDUs and their replies.

The codec half is pure (``select_application``, ``read_binary``, ``parse_rapdu``,
``parse_cc`` …). ``Type4Tag`` strings them together over any ``transceive``
callable (the PN532 InDataExchange, a capture replay, a test function), so this
module never touches a port. Command bytes as NovoPen readers send them
[NVP ``PayloadFunctions.kt``, ``T4Update.kt``; meter-protocols.md §D.1].
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from drivers.errors import InvalidResponse

__all__ = [
    "CC_FILE_ID",
    "NDEF_AID",
    "NDEF_FILE_ID",
    "READ_CHUNK_MAX",
    "CapabilityContainer",
    "Transceive",
    "Type4Error",
    "Type4Tag",
    "parse_cc",
    "parse_rapdu",
    "read_binary",
    "select_application",
    "select_file",
    "update_binary",
]

log = logging.getLogger(__name__)

Transceive = Callable[[bytes], bytes]

#: Class byte of every command (no secure messaging, basic channel).
CLA = 0x00
#: Instructions.
INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_UPDATE_BINARY = 0xD6
#: SELECT P1/P2: by DF name (AID) / by file identifier, first or only occurrence.
P1_BY_NAME = 0x04
P1_BY_FILE_ID = 0x00
P2_FIRST_ONLY = 0x0C
P2_NONE = 0x00
#: Le byte "up to 256 bytes" sent after SELECT by name (NFC Forum T4T v2.0).
LE_ANY = 0x00
#: NDEF tag application, version 2.
NDEF_AID = bytes.fromhex("D2760000850101")
#: Capability container and default NDEF file identifiers.
CC_FILE_ID = 0xE103
NDEF_FILE_ID = 0xE104
#: Status words.
SW_OK = 0x9000
SW_LEN = 2
#: CC: length of the CC file as read, and the NDEF File Control TLV tag.
CC_READ_LEN = 0x0F
NDEF_FILE_CONTROL_TLV = 0x04
NDEF_FILE_CONTROL_LEN = 0x06
#: Largest READ BINARY length with a one-byte Le, as NovoPen readers use it.
READ_CHUNK_MAX = 0xFF
#: NLEN field: two bytes in front of the NDEF message.
NLEN_SIZE = 2
#: READ BINARY offset is 15 bits.
MAX_OFFSET = 0x7FFF


class Type4Error(InvalidResponse):
    """A command APDU was answered with a status word other than 90 00 (or was malformed)."""

    def __init__(self, message: str, sw: int | None = None) -> None:
        self.sw = sw
        super().__init__(message)


# --- command APDUs (pure) ---------------------------------------------------------------------------
def select_application(aid: bytes = NDEF_AID) -> bytes:
    return bytes((CLA, INS_SELECT, P1_BY_NAME, P2_NONE, len(aid))) + aid + bytes((LE_ANY,))


def select_file(file_id: int) -> bytes:
    return bytes((CLA, INS_SELECT, P1_BY_FILE_ID, P2_FIRST_ONLY, 2)) + file_id.to_bytes(2, "big")


def read_binary(offset: int, length: int) -> bytes:
    if not 0 <= offset <= MAX_OFFSET or not 1 <= length <= READ_CHUNK_MAX:
        raise ValueError(f"READ BINARY offset {offset} length {length} out of range")
    return bytes((CLA, INS_READ_BINARY)) + offset.to_bytes(2, "big") + bytes((length,))


def update_binary(offset: int, data: bytes) -> bytes:
    if not 0 <= offset <= MAX_OFFSET or not 1 <= len(data) <= 0xFF:
        raise ValueError(f"UPDATE BINARY offset {offset} length {len(data)} out of range")
    return bytes((CLA, INS_UPDATE_BINARY)) + offset.to_bytes(2, "big") + bytes((len(data),)) + data


def write_ndef(message: bytes) -> bytes:
    """One UPDATE BINARY at offset 0 carrying NLEN and the message (NVP ``T4Update``)."""
    return update_binary(0, len(message).to_bytes(NLEN_SIZE, "big") + message)


# --- reply APDUs (pure) -----------------------------------------------------------------------------
def parse_rapdu(rapdu: bytes) -> bytes:
    """Data of a reply APDU whose status word is 90 00."""
    if len(rapdu) < SW_LEN:
        raise Type4Error(f"reply APDU of {len(rapdu)} bytes has no status word")
    sw = int.from_bytes(rapdu[-SW_LEN:], "big")
    if sw != SW_OK:
        raise Type4Error(f"tag answered status word {sw:04X}", sw)
    return bytes(rapdu[:-SW_LEN])


@dataclasses.dataclass(frozen=True, slots=True)
class CapabilityContainer:
    mapping_version: int
    max_le: int  # MLe: largest R-APDU data field
    max_lc: int  # MLc: largest C-APDU data field
    ndef_file_id: int
    ndef_max_size: int
    read_access: int
    write_access: int

    @property
    def read_chunk(self) -> int:
        return max(1, min(self.max_le, READ_CHUNK_MAX))


def parse_cc(data: bytes) -> CapabilityContainer:
    """The capability container file (NFC Forum T4T §5.1), e.g. ``000F20010C010C0406E104010C0000``."""
    if len(data) < CC_READ_LEN:
        raise Type4Error(f"capability container of {len(data)} bytes, need {CC_READ_LEN}")
    cclen = int.from_bytes(data[0:2], "big")
    if cclen < CC_READ_LEN:
        raise Type4Error(f"capability container CCLEN {cclen} < {CC_READ_LEN}")
    tag, length = data[7], data[8]
    if tag != NDEF_FILE_CONTROL_TLV or length != NDEF_FILE_CONTROL_LEN:
        raise Type4Error(f"capability container: expected NDEF File Control TLV 04 06, got {tag:02X} {length:02X}")
    return CapabilityContainer(
        mapping_version=data[2],
        max_le=int.from_bytes(data[3:5], "big"),
        max_lc=int.from_bytes(data[5:7], "big"),
        ndef_file_id=int.from_bytes(data[9:11], "big"),
        ndef_max_size=int.from_bytes(data[11:13], "big"),
        read_access=data[13],
        write_access=data[14],
    )


def encode_cc(cc: CapabilityContainer) -> bytes:
    """Capability container bytes (simulator side)."""
    return (
        CC_READ_LEN.to_bytes(2, "big")
        + bytes((cc.mapping_version,))
        + cc.max_le.to_bytes(2, "big")
        + cc.max_lc.to_bytes(2, "big")
        + bytes((NDEF_FILE_CONTROL_TLV, NDEF_FILE_CONTROL_LEN))
        + cc.ndef_file_id.to_bytes(2, "big")
        + cc.ndef_max_size.to_bytes(2, "big")
        + bytes((cc.read_access, cc.write_access))
    )


def chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, length) READ BINARY pairs covering the NDEF message after NLEN."""
    return [(NLEN_SIZE + start, min(chunk, length - start)) for start in range(0, length, chunk)]


# --- tag session (I/O through a callable) --------------------------------------------------------------
class Type4Tag:
    """Type 4 Tag operations over a ``transceive(command APDU) -> reply APDU`` callable."""

    def __init__(self, transceive: Transceive) -> None:
        self._transceive = transceive
        self.cc: CapabilityContainer | None = None

    def command(self, capdu: bytes) -> bytes:
        return parse_rapdu(self._transceive(capdu))

    def open(self) -> CapabilityContainer:
        """Select the NDEF application, read the CC, select the NDEF file."""
        self.command(select_application())
        self.command(select_file(CC_FILE_ID))
        cc = parse_cc(self.command(read_binary(0, CC_READ_LEN)))
        self.command(select_file(cc.ndef_file_id))
        self.cc = cc
        log.debug("type 4 tag open: %s", cc)
        return cc

    def read_ndef(self) -> bytes:
        """NLEN, then the message in chunks of at most MLe (and 255) bytes."""
        cc = self._require_cc()
        head = self.command(read_binary(0, NLEN_SIZE))
        if len(head) != NLEN_SIZE:
            raise Type4Error(f"NLEN read returned {len(head)} bytes")
        length = int.from_bytes(head, "big")
        if length > cc.ndef_max_size - NLEN_SIZE and cc.ndef_max_size > NLEN_SIZE:
            raise Type4Error(f"NLEN {length} exceeds the NDEF file size {cc.ndef_max_size}")
        message = bytearray()
        for offset, size in chunks(length, cc.read_chunk):
            part = self.command(read_binary(offset, size))
            if len(part) != size:
                raise Type4Error(f"READ BINARY at {offset} returned {len(part)} of {size} bytes")
            message += part
        return bytes(message)

    def write_ndef(self, message: bytes) -> None:
        cc = self._require_cc()
        if len(message) + NLEN_SIZE > cc.max_lc:
            raise Type4Error(f"NDEF message of {len(message)} bytes exceeds MLc {cc.max_lc}")
        self.command(write_ndef(message))

    def _require_cc(self) -> CapabilityContainer:
        if self.cc is None:
            raise Type4Error("tag not opened: call open() first")
        return self.cc
