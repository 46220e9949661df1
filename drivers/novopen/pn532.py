"""PN532-class NFC reader, HSU (UART) frame codec.

Pure functions over bytes: no port, no clock, no logging. Source: NXP UM0701-02
"PN532 User Manual" §6.2 (frames), §7 (commands); quoted in Adafruit-PN532 and
dart_periphery ``pn532/constants.dart`` (see meter-protocols.md section D).

Normal information frame::

    00 00 FF LEN LCS TFI PD0 .. PDn DCS 00      LEN = len(TFI + PD), LEN + LCS = 0 (mod 256)
                                                TFI + sum(PD) + DCS = 0 (mod 256)

Extended information frame (LEN > 255)::

    00 00 FF FF FF LENM LENL LCS TFI PD0 .. PDn DCS 00

ACK ``00 00 FF 00 FF 00``, NACK ``00 00 FF FF 00 00`` (ask for the last frame again),
application error frame ``00 00 FF 01 FF 7F 81 00``.
"""

from __future__ import annotations

import dataclasses
import enum

from drivers.errors import InvalidChecksum, InvalidResponse

__all__ = [
    "ACK_FRAME",
    "CMD_GET_FIRMWARE_VERSION",
    "CMD_IN_DATA_EXCHANGE",
    "CMD_IN_LIST_PASSIVE_TARGET",
    "CMD_IN_RELEASE",
    "CMD_RF_CONFIGURATION",
    "CMD_SAM_CONFIGURATION",
    "ERROR_FRAME",
    "NACK_FRAME",
    "TFI_HOST",
    "TFI_READER",
    "WAKEUP",
    "Ack",
    "BadFrame",
    "ErrorFrame",
    "Frame",
    "FrameSplitter",
    "Nack",
    "PenRemoved",
    "Pn532Error",
    "Target",
    "Token",
    "decode_frame",
    "encode_frame",
    "encode_target",
    "exchange_status_error",
    "expect_reply",
    "get_firmware_version",
    "in_data_exchange",
    "in_list_passive_target",
    "in_release",
    "parse_in_list_passive_target",
    "reply_to",
    "rf_max_retries",
    "sam_configuration",
]

#: Preamble and postamble byte.
PREAMBLE = 0x00
POSTAMBLE = 0x00
#: Start of packet code.
START_CODE = b"\x00\xff"
#: LEN/LCS pair that announces an extended frame.
EXTENDED_MARK = b"\xff\xff"
#: Frame identifier host -> PN532 and PN532 -> host.
TFI_HOST = 0xD4
TFI_READER = 0xD5
#: Acknowledge / not-acknowledge frames (both directions).
ACK_FRAME = b"\x00\x00\xff\x00\xff\x00"
NACK_FRAME = b"\x00\x00\xff\xff\x00\x00"
#: Application-level error frame (syntax error in the last command).
ERROR_FRAME = b"\x00\x00\xff\x01\xff\x7f\x81\x00"
ERROR_FRAME_CODE = 0x7F
#: HSU wake-up: 0x55 0x55 then a long preamble so the PN532 leaves power-down (UM0701 §7.2.11).
WAKEUP = b"\x55\x55" + bytes(14)
#: Largest normal frame payload (TFI + data).
MAX_NORMAL_LEN = 0xFF
#: Largest extended frame payload the PN532 buffer accepts (TFI + cmd + 262 data bytes + status).
MAX_EXTENDED_LEN = 265

# Commands (UM0701 §7). The reply command code is the request code + 1.
CMD_GET_FIRMWARE_VERSION = 0x02
CMD_SAM_CONFIGURATION = 0x14
CMD_RF_CONFIGURATION = 0x32
CMD_IN_DATA_EXCHANGE = 0x40
CMD_IN_LIST_PASSIVE_TARGET = 0x4A
CMD_IN_RELEASE = 0x52

#: SAMConfiguration: normal mode (no SAM), virtual-card timeout 0x14 (1 s), use IRQ.
SAM_MODE_NORMAL = 0x01
SAM_TIMEOUT_1S = 0x14
SAM_USE_IRQ = 0x01
#: RFConfiguration item 5: MxRtyATR, MxRtyPSL, MxRtyPassiveActivation.
RF_ITEM_MAX_RETRIES = 0x05
RF_MAX_RTY_ATR = 0xFF
RF_MAX_RTY_PSL = 0x01
RF_MAX_RTY_PASSIVE_ACTIVATION = 0x02
#: InListPassiveTarget: one target, 106 kbps type A (ISO/IEC 14443-A).
MAX_TARGETS_ONE = 0x01
BRTY_106_TYPE_A = 0x00
#: Logical number the PN532 gives the first target; InRelease 0 releases all.
TARGET_ONE = 0x01
RELEASE_ALL = 0x00
#: SEL_RES bit: target is ISO/IEC 14443-4 (ISO-DEP) compliant, needed for Type 4 tags.
SEL_RES_ISO_DEP = 0x20
#: InDataExchange status byte: low 6 bits error, bit 6 "more information" (chaining).
STATUS_ERROR_MASK = 0x3F
STATUS_OK = 0x00


class Pn532Status(enum.IntEnum):
    """InDataExchange / InRelease error codes (UM0701 §7.1, table 16), the ones we name."""

    OK = 0x00
    TIMEOUT = 0x01  # the target has not answered
    CRC_ERROR = 0x02
    PARITY_ERROR = 0x03
    RF_PROTOCOL_ERROR = 0x0B
    DEP_FORMAT_ERROR = 0x13
    INVALID_STATE = 0x25
    NOT_ACCEPTABLE = 0x27
    TARGET_RELEASED = 0x29
    CARD_EXCHANGED = 0x2A
    CARD_DISAPPEARED = 0x2B


#: Status codes that mean "the pen left the field".
GONE_STATUSES = frozenset(
    {Pn532Status.TIMEOUT, Pn532Status.TARGET_RELEASED, Pn532Status.CARD_EXCHANGED, Pn532Status.CARD_DISAPPEARED}
)


class Pn532Error(InvalidResponse):
    """The reader reported an error (error frame, or a non-zero status byte)."""


class PenRemoved(Pn532Error):
    """The target stopped answering: the pen was taken out of the field (or never came)."""


# --- tokens ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Nack:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorFrame:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """A normal or extended information frame: TFI, command code and parameters."""

    tfi: int
    command: int
    params: bytes = b""

    def __post_init__(self) -> None:
        if self.tfi not in (TFI_HOST, TFI_READER):
            raise ValueError(f"unknown TFI 0x{self.tfi:02X}")
        if not 0 <= self.command <= 0xFF:
            raise ValueError(f"command out of range: {self.command}")
        if len(self.params) + 2 > MAX_EXTENDED_LEN:
            raise ValueError(f"frame too long: {len(self.params)} parameter bytes")


@dataclasses.dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame whose length or data checksum failed; the receiver should NACK it."""

    error: InvalidResponse


Token = Ack | Nack | ErrorFrame | Frame | BadFrame


def _checksum(data: bytes) -> int:
    """The byte that makes ``sum(data) + it == 0 (mod 256)``."""
    return (-sum(data)) & 0xFF


def encode_frame(frame: Frame) -> bytes:
    """Frame bytes for the wire, extended form when TFI + data exceed 255 bytes."""
    body = bytes((frame.tfi, frame.command)) + frame.params
    if len(body) <= MAX_NORMAL_LEN:
        head = bytes((len(body), _checksum(bytes((len(body),)))))
    else:
        length = len(body).to_bytes(2, "big")
        head = EXTENDED_MARK + length + bytes((_checksum(length),))
    return bytes((PREAMBLE,)) + START_CODE + head + body + bytes((_checksum(body), POSTAMBLE))


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one information frame (leading preamble bytes allowed)."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"bytes expected, got {type(data).__name__}")
    splitter = FrameSplitter()
    tokens = splitter.feed(bytes(data))
    if tokens and isinstance(tokens[0], BadFrame):
        raise tokens[0].error
    if len(tokens) != 1 or splitter.pending:
        raise InvalidResponse(f"expected one frame, got {len(tokens)} token(s) and {len(splitter.pending)} spare bytes")
    token = tokens[0]
    if not isinstance(token, Frame):
        raise InvalidResponse(f"expected an information frame, got {type(token).__name__}")
    return token


class FrameSplitter:
    """Incremental decoder: feed it what the port returned, get the tokens that completed.

    Bytes before a start code are skipped (preamble, wake-up, noise). A frame whose
    LEN/LCS fails is dropped and the scan resumes after its start code; one whose DCS
    fails becomes ``BadFrame``. Never raises on input; memory is bounded by one frame.
    """

    def __init__(self) -> None:
        self.pending = bytearray()

    def feed(self, data: bytes) -> list[Token]:
        self.pending += data
        tokens: list[Token] = []
        while True:
            token, consumed = self._next()
            if consumed == 0:
                return tokens
            del self.pending[:consumed]
            if token is not None:
                tokens.append(token)

    def _next(self) -> tuple[Token | None, int]:
        buf = self.pending
        start = buf.find(START_CODE)
        if start < 0:
            # keep a trailing 0x00: it may be the first half of a start code
            keep = 1 if buf[-1:] == b"\x00" else 0
            return None, len(buf) - keep
        if start > 0:
            return None, start
        if len(buf) < 4:
            return None, 0
        pair = bytes(buf[2:4])
        if pair == b"\x00\xff":  # ACK; its postamble is skipped later like any preamble byte
            return Ack(), 4
        if pair == b"\xff\x00":  # NACK
            return Nack(), 4
        if pair == EXTENDED_MARK:
            if len(buf) < 7:
                return None, 0
            length = int.from_bytes(buf[4:6], "big")
            if (sum(buf[4:7]) & 0xFF) != 0 or length < 1:
                return BadFrame(InvalidChecksum(buf[6], _checksum(bytes(buf[4:6])), "extended LCS")), 2
            if length > MAX_EXTENDED_LEN:
                return BadFrame(InvalidResponse(f"extended frame of {length} bytes exceeds the PN532 buffer")), 2
            header = 7
        else:
            length, lcs = buf[2], buf[3]
            if (length + lcs) & 0xFF != 0:
                return BadFrame(InvalidChecksum(lcs, _checksum(bytes((length,))), "LCS")), 2
            header = 4
        if length == 0:
            return BadFrame(InvalidResponse("information frame with LEN 0")), header
        end = header + length + 1  # + DCS
        if len(buf) < end:
            return None, 0
        body = bytes(buf[header : header + length])
        dcs = buf[header + length]
        consumed = end + (1 if buf[end : end + 1] == b"\x00" else 0)
        if (sum(body) + dcs) & 0xFF != 0:
            return BadFrame(InvalidChecksum(dcs, _checksum(body), "DCS")), consumed
        if length == 1 and body[0] == ERROR_FRAME_CODE:
            return ErrorFrame(), consumed
        if body[0] not in (TFI_HOST, TFI_READER) or length < 2:
            return BadFrame(InvalidResponse(f"frame with TFI 0x{body[0]:02X} and {length} bytes")), consumed
        return Frame(body[0], body[1], body[2:]), consumed


# --- command payloads -------------------------------------------------------------------------------
def sam_configuration() -> Frame:
    return Frame(TFI_HOST, CMD_SAM_CONFIGURATION, bytes((SAM_MODE_NORMAL, SAM_TIMEOUT_1S, SAM_USE_IRQ)))


def rf_max_retries() -> Frame:
    """Make InListPassiveTarget give up after a few tries instead of waiting forever."""
    params = bytes((RF_ITEM_MAX_RETRIES, RF_MAX_RTY_ATR, RF_MAX_RTY_PSL, RF_MAX_RTY_PASSIVE_ACTIVATION))
    return Frame(TFI_HOST, CMD_RF_CONFIGURATION, params)


def get_firmware_version() -> Frame:
    return Frame(TFI_HOST, CMD_GET_FIRMWARE_VERSION)


def in_list_passive_target() -> Frame:
    return Frame(TFI_HOST, CMD_IN_LIST_PASSIVE_TARGET, bytes((MAX_TARGETS_ONE, BRTY_106_TYPE_A)))


def in_data_exchange(data: bytes, target: int = TARGET_ONE) -> Frame:
    return Frame(TFI_HOST, CMD_IN_DATA_EXCHANGE, bytes((target,)) + data)


def in_release(target: int = RELEASE_ALL) -> Frame:
    return Frame(TFI_HOST, CMD_IN_RELEASE, bytes((target,)))


def reply_to(request: Frame, params: bytes = b"") -> Frame:
    """The PN532's answer frame to ``request`` (used by the simulator)."""
    return Frame(TFI_READER, request.command + 1, params)


def expect_reply(request: Frame, reply: Frame) -> bytes:
    """Check ``reply`` answers ``request``; return its parameters."""
    if reply.tfi != TFI_READER or reply.command != (request.command + 1) & 0xFF:
        raise InvalidResponse(
            f"reply 0x{reply.tfi:02X}/0x{reply.command:02X} does not answer command 0x{request.command:02X}"
        )
    return reply.params


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One ISO/IEC 14443-A target found by InListPassiveTarget."""

    number: int
    sens_res: bytes
    sel_res: int
    uid: bytes
    ats: bytes

    @property
    def iso_dep(self) -> bool:
        return bool(self.sel_res & SEL_RES_ISO_DEP)


def parse_in_list_passive_target(params: bytes) -> Target | None:
    """Parameters of an InListPassiveTarget reply: None when no target is in the field."""
    if not params:
        raise InvalidResponse("InListPassiveTarget reply without NbTg")
    count = params[0]
    if count == 0:
        return None
    if count != 1 or len(params) < 6:
        raise InvalidResponse(f"InListPassiveTarget reply malformed: {params.hex()}")
    number, sens_res, sel_res, uid_len = params[1], params[2:4], params[4], params[5]
    uid = params[6 : 6 + uid_len]
    if len(uid) != uid_len:
        raise InvalidResponse(f"InListPassiveTarget: UID length {uid_len}, {len(uid)} bytes present")
    ats = params[6 + uid_len :]
    if ats and ats[0] != len(ats):
        raise InvalidResponse(f"InListPassiveTarget: ATS length byte {ats[0]}, {len(ats)} bytes present")
    return Target(number, bytes(sens_res), sel_res, bytes(uid), bytes(ats))


def encode_target(target: Target) -> bytes:
    """InListPassiveTarget reply parameters for one target (simulator side)."""
    return (
        bytes((1, target.number)) + target.sens_res + bytes((target.sel_res, len(target.uid))) + target.uid + target.ats
    )


def exchange_status_error(status: int) -> Pn532Error | None:
    """The exception an InDataExchange status byte stands for, or None when it is OK."""
    code = status & STATUS_ERROR_MASK
    if code == STATUS_OK:
        return None
    try:
        name = Pn532Status(code).name
    except ValueError:
        name = "unknown"
    if code in GONE_STATUSES:
        return PenRemoved(f"reader status 0x{code:02X} ({name}): pen left the field")
    return Pn532Error(f"reader status 0x{code:02X} ({name})")
