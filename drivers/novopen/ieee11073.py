"""IEEE 11073-20601 (MDER, big-endian) APDUs a NovoPen and its manager exchange.

Pure codecs over bytes. Envelope and association here; the PM-store objects
(config report, MDS attributes, segment info, segment data, FLOAT) live in
``drivers.novopen.pmstore``. Layouts per meter-protocols.md §D.3 [NVP ``data/*.kt``,
XD ``mt/*.java``], checked against ``vectors/novopen/apdus.json``.

APDU = choice u16 | length u16 | body. PRST body = octet-string length u16 |
invoke-id u16 | data choice u16 | choice length u16 | payload.
"""

from __future__ import annotations

import dataclasses
import enum

from drivers.errors import InvalidResponse

__all__ = [
    "AARE",
    "AARQ",
    "ABRT",
    "PRST",
    "RLRE",
    "RLRQ",
    "Apdu",
    "AssociationRequest",
    "AssociationResponse",
    "DataApdu",
    "DataChoice",
    "Ieee11073Error",
    "Reader",
    "aare_for",
    "decode_aare",
    "decode_aarq",
    "decode_apdu",
    "decode_data_apdu",
    "encode_aare",
    "encode_aarq",
    "encode_apdu",
    "encode_data_apdu",
    "release_request",
    "release_response",
]

# --- APDU choices ---------------------------------------------------------------------------------
AARQ = 0xE200  # association request (pen -> manager)
AARE = 0xE300  # association response
RLRQ = 0xE400  # release request
RLRE = 0xE500  # release response
ABRT = 0xE600  # abort
PRST = 0xE700  # presentation APDU carrying a DATA APDU
APDU_CHOICES = frozenset({AARQ, AARE, RLRQ, RLRE, ABRT, PRST})

#: Association: assoc-version 1, data protocol 20601, protocol version 1, MDER, nomenclature 1.
ASSOC_VERSION1 = 0x80000000
DATA_PROTO_ID_20601 = 0x5079
PROTOCOL_VERSION1 = 0x80000000
ENCODING_MDER = 0x8000
NOMENCLATURE_VERSION1 = 0x80000000
SYS_TYPE_MANAGER = 0x80000000
SYS_TYPE_AGENT = 0x00800000
#: AARE results.
RESULT_ACCEPTED = 0x0000
RESULT_REJECTED_PERMANENT = 0x0001
RESULT_ACCEPTED_UNKNOWN_CONFIG = 0x0003
#: Release reasons.
RELEASE_NORMAL = 0x0000
#: dev-config-id a manager answers with (the value is the agent's business).
MANAGER_CONFIG_ID = 0x0000


class DataChoice(enum.IntEnum):
    """DATA APDU message choices (roiv = invoke, rors = result, roer = error, rorj = reject)."""

    ROIV_EVENT_REPORT = 0x0100
    ROIV_CONFIRMED_EVENT_REPORT = 0x0101
    ROIV_GET = 0x0103
    ROIV_SET = 0x0104
    ROIV_CONFIRMED_SET = 0x0105
    ROIV_ACTION = 0x0106
    ROIV_CONFIRMED_ACTION = 0x0107
    RORS_CONFIRMED_EVENT_REPORT = 0x0201
    RORS_GET = 0x0203
    RORS_CONFIRMED_SET = 0x0205
    RORS_CONFIRMED_ACTION = 0x0207
    ROER = 0x0300
    RORJ = 0x0400


class Ieee11073Error(InvalidResponse):
    """An APDU that does not parse, or one the pen sent where another was due."""


class Reader:
    """Bounds-checked big-endian reader; every underflow is an ``Ieee11073Error``."""

    def __init__(self, data: bytes, what: str = "APDU") -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.remaining < n:
            raise Ieee11073Error(f"{self.what}: need {n} bytes at offset {self.pos}, {self.remaining} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def octets(self) -> bytes:
        """An octet string: u16 length then that many bytes."""
        return self.take(self.u16())

    def sub(self, what: str) -> Reader:
        """A reader over the next u16-length-prefixed block."""
        return Reader(self.octets(), what)

    def end(self) -> None:
        if self.remaining:
            raise Ieee11073Error(f"{self.what}: {self.remaining} unexpected trailing bytes")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def octets(data: bytes) -> bytes:
    return u16(len(data)) + data


# --- envelope ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Apdu:
    choice: int
    body: bytes


def encode_apdu(apdu: Apdu) -> bytes:
    return u16(apdu.choice) + octets(apdu.body)


def decode_apdu(data: bytes) -> Apdu:
    reader = Reader(data)
    choice = reader.u16()
    if choice not in APDU_CHOICES:
        raise Ieee11073Error(f"unknown APDU choice 0x{choice:04X}")
    body = reader.octets()
    reader.end()
    return Apdu(choice, body)


# --- association ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class PhdAssociationInformation:
    protocol_version: int
    encoding_rules: int
    nomenclature_version: int
    functional_units: int
    system_type: int
    system_id: bytes
    dev_config_id: int
    data_req_mode_flags: int
    init_agent_count: int
    init_manager_count: int
    options: bytes = b""  # option-list body (count, length, entries) kept verbatim

    def encode(self) -> bytes:
        return (
            u32(self.protocol_version)
            + u16(self.encoding_rules)
            + u32(self.nomenclature_version)
            + u32(self.functional_units)
            + u32(self.system_type)
            + octets(self.system_id)
            + u16(self.dev_config_id)
            + u16(self.data_req_mode_flags)
            + bytes((self.init_agent_count, self.init_manager_count))
            + (self.options or u16(0) + u16(0))
        )

    @classmethod
    def decode(cls, reader: Reader) -> PhdAssociationInformation:
        info = cls(
            protocol_version=reader.u32(),
            encoding_rules=reader.u16(),
            nomenclature_version=reader.u32(),
            functional_units=reader.u32(),
            system_type=reader.u32(),
            system_id=reader.octets(),
            dev_config_id=reader.u16(),
            data_req_mode_flags=reader.u16(),
            init_agent_count=reader.u8(),
            init_manager_count=reader.u8(),
            options=reader.take(reader.remaining),
        )
        Reader(info.options, "option list").take(4)
        return info


@dataclasses.dataclass(frozen=True, slots=True)
class AssociationRequest:
    assoc_version: int
    data_proto_id: int
    info: PhdAssociationInformation


def encode_aarq(req: AssociationRequest) -> bytes:
    proto = u16(req.data_proto_id) + octets(req.info.encode())
    body = u32(req.assoc_version) + u16(1) + octets(proto)
    return encode_apdu(Apdu(AARQ, body))


def decode_aarq(data: bytes) -> AssociationRequest:
    apdu = decode_apdu(data)
    if apdu.choice != AARQ:
        raise Ieee11073Error(f"expected an association request, got APDU 0x{apdu.choice:04X}")
    reader = Reader(apdu.body, "AARQ")
    assoc_version = reader.u32()
    count = reader.u16()
    protos = reader.sub("AARQ data-proto-list")
    reader.end()
    for _ in range(count):
        proto_id = protos.u16()
        info = protos.sub("AARQ data-proto-info")
        if proto_id == DATA_PROTO_ID_20601:
            parsed = PhdAssociationInformation.decode(info)
            return AssociationRequest(assoc_version, proto_id, parsed)
    raise Ieee11073Error("association request offers no IEEE 11073-20601 data protocol")


@dataclasses.dataclass(frozen=True, slots=True)
class AssociationResponse:
    result: int
    data_proto_id: int
    info: PhdAssociationInformation


def aare_for(req: AssociationRequest, result: int = RESULT_ACCEPTED_UNKNOWN_CONFIG) -> AssociationResponse:
    """The manager's answer: accept, ask for the configuration (unknown config), echo the agent's system id.

    Byte-identical to xDrip's encoder output for its A_REQUEST vector.
    """
    info = PhdAssociationInformation(
        protocol_version=req.info.protocol_version,
        encoding_rules=ENCODING_MDER,
        nomenclature_version=req.info.nomenclature_version,
        functional_units=0,
        system_type=SYS_TYPE_MANAGER,
        system_id=req.info.system_id,
        dev_config_id=MANAGER_CONFIG_ID,
        data_req_mode_flags=0,
        init_agent_count=0,
        init_manager_count=0,
    )
    return AssociationResponse(result, DATA_PROTO_ID_20601, info)


def encode_aare(resp: AssociationResponse) -> bytes:
    body = u16(resp.result) + u16(resp.data_proto_id) + octets(resp.info.encode())
    return encode_apdu(Apdu(AARE, body))


def decode_aare(data: bytes) -> AssociationResponse:
    apdu = decode_apdu(data)
    if apdu.choice != AARE:
        raise Ieee11073Error(f"expected an association response, got APDU 0x{apdu.choice:04X}")
    reader = Reader(apdu.body, "AARE")
    result, proto = reader.u16(), reader.u16()
    info = PhdAssociationInformation.decode(reader.sub("AARE data-proto-info"))
    reader.end()
    return AssociationResponse(result, proto, info)


def release_request(reason: int = RELEASE_NORMAL) -> bytes:
    return encode_apdu(Apdu(RLRQ, u16(reason)))


def release_response(reason: int = RELEASE_NORMAL) -> bytes:
    return encode_apdu(Apdu(RLRE, u16(reason)))


def abort(reason: int = 0) -> bytes:
    return encode_apdu(Apdu(ABRT, u16(reason)))


# --- DATA APDU -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class DataApdu:
    invoke_id: int
    choice: int
    payload: bytes


def encode_data_apdu(data: DataApdu) -> bytes:
    inner = u16(data.invoke_id) + u16(data.choice) + octets(data.payload)
    return encode_apdu(Apdu(PRST, octets(inner)))


def decode_data_apdu(data: bytes | Apdu) -> DataApdu:
    apdu = data if isinstance(data, Apdu) else decode_apdu(data)
    if apdu.choice != PRST:
        raise Ieee11073Error(f"expected a PRST APDU, got 0x{apdu.choice:04X}")
    outer = Reader(apdu.body, "PRST")
    inner = outer.sub("DATA APDU")
    outer.end()
    invoke_id, choice = inner.u16(), inner.u16()
    payload = inner.octets()
    inner.end()
    if choice == DataChoice.ROER:
        err = Reader(payload, "error result")
        raise Ieee11073Error(f"pen returned error result {err.u16():#06x} for invoke id {invoke_id}")
    if choice == DataChoice.RORJ:
        rej = Reader(payload, "reject result")
        raise Ieee11073Error(f"pen rejected invoke id {invoke_id}: problem {rej.u16():#06x}")
    return DataApdu(invoke_id, choice, payload)
