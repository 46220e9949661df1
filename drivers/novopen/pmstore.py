"""IEEE 11073-20601 objects of an insulin pen: config report, MDS attributes, PM-store.

Pure codecs over DATA APDU payloads (see ``drivers.novopen.ieee11073`` for the
envelope). Layouts per meter-protocols.md §D.3 and the captured session.

Dose entry (12 bytes): relative time u32 | units FLOAT u32 | flags u32.
"""

from __future__ import annotations

import dataclasses
import enum
from decimal import Decimal

from drivers.novopen.ieee11073 import (
    DataApdu,
    DataChoice,
    Ieee11073Error,
    Reader,
    encode_data_apdu,
    octets,
    u16,
    u32,
)

__all__ = [
    "DOSE_ENTRY_SIZE",
    "Attribute",
    "ConfigReport",
    "DoseEntry",
    "EventReport",
    "FloatSpecial",
    "MdsInfo",
    "SegmentData",
    "SegmentInfo",
    "decode_config_report",
    "decode_float",
    "decode_mds",
    "decode_segment_data",
    "decode_segment_info",
    "encode_float",
]

# --- nomenclature (ISO/IEEE 11073-10101) -------------------------------------------------------------
MDS_HANDLE = 0x0000
PM_STORE_HANDLE = 0x0100
MDC_NOTI_CONFIG = 0x0D1C
MDC_NOTI_SEGMENT_DATA = 0x0D21
MDC_ACT_SEG_GET_INFO = 0x0C0D
MDC_ACT_SEG_TRIG_XFER = 0x0C1C
MDC_MOC_VMO_PMSTORE = 0x003D  # object class 61
MDC_MOC_VMO_METRIC_NU = 0x0006
ATTR_SYS_ID = 0x0984
ATTR_TIME_REL = 0x098F
ATTR_ID_PROD_SPECN = 0x092D
ATTR_ID_MODEL = 0x0928
ATTR_DEV_CONFIG_ID = 0x0A44
ATTR_METRIC_STORE_CAPAC_CNT = 0x0941
ATTR_METRIC_STORE_USAGE_CNT = 0x0944
ATTR_NUM_SEG = 0x0951
ATTR_UNIT_CODE = 0x0996
ATTR_ID_INSTNO = 0x0922
ATTR_PM_SEG_MAP = 0x0A4E
ATTR_PM_SEG_LABEL_STRING = 0x0A58
ATTR_SEG_USAGE_CNT = 0x097B
ATTR_NU_VAL_OBS_BASIC_FLOAT = 0x0A56  # 4-byte FLOAT in a segment entry
MDC_DIM_INTL_UNIT = 0x1560  # 5472: international units (insulin)
#: Production specification spec-types.
PROD_SPEC_SERIAL = 1
PROD_SPEC_PART = 2
PROD_SPEC_HW = 3
PROD_SPEC_SW = 4
#: SegmSelection choice "all segments" (value 0).
SEGM_SELECTION_ALL = 0x0001
#: Segment entry header bit: entries carry a 4-byte relative time.
SEG_ELEM_HDR_RELATIVE_TIME = 0x4000
SEG_ELEM_HDR_ABSOLUTE_TIME = 0x8000
SEG_ELEM_HDR_BO_TIME = 0x2000
#: Segment data event status bits.
SEVTSTA_FIRST_ENTRY = 0x8000
SEVTSTA_LAST_ENTRY = 0x4000
SEVTSTA_MANAGER_CONFIRM = 0x0080
#: Trigger result "accepted".
TSXR_SUCCESSFUL = 0x0000
#: Config-report result "accepted".
ACCEPTED_CONFIG = 0x0000
#: Event time the manager puts in confirmations it cannot fill.
TIME_UNKNOWN = 0xFFFFFFFF
#: Dose entry layout and the normal-dose flags (XD and NVP keep only these).
DOSE_ENTRY_SIZE = 12
FLAGS_NORMAL_DOSE = 0x08000000

# --- FLOAT (IEEE 11073-20601 §F.6: signed 8-bit exponent, signed 24-bit mantissa) -------------------
MANTISSA_BITS = 24
MANTISSA_MASK = 0xFFFFFF
MANTISSA_SIGN = 0x800000
MANTISSA_MAX = 0x7FFFFD  # largest ordinary positive mantissa (0x7FFFFE is +INF)


class FloatSpecial(enum.IntEnum):
    """Reserved mantissas (exponent 0)."""

    NAN = 0x7FFFFF
    NRES = 0x800000
    PLUS_INFINITY = 0x7FFFFE
    MINUS_INFINITY = 0x800002
    RESERVED = 0x800001


def decode_float(raw: int) -> Decimal | FloatSpecial:
    """``0xFF000014`` -> Decimal('2.0'); reserved mantissas come back as ``FloatSpecial``."""
    if not 0 <= raw <= 0xFFFFFFFF:
        raise ValueError(f"FLOAT out of range: {raw}")
    mantissa = raw & MANTISSA_MASK
    if mantissa in FloatSpecial._value2member_map_:
        return FloatSpecial(mantissa)
    exponent = raw >> MANTISSA_BITS
    exponent = exponent - 0x100 if exponent & 0x80 else exponent
    mantissa = mantissa - (1 << MANTISSA_BITS) if mantissa & MANTISSA_SIGN else mantissa
    return Decimal(mantissa).scaleb(exponent)


def encode_float(value: Decimal | FloatSpecial) -> int:
    """Inverse of ``decode_float`` (exact: raises when the value needs more digits)."""
    if isinstance(value, FloatSpecial):
        return int(value)
    if not value.is_finite():
        raise ValueError(f"not a finite value: {value}")
    sign, digits, exponent = value.as_tuple()
    mantissa = int("".join(map(str, digits))) * (-1 if sign else 1)
    exponent = int(exponent)
    while abs(mantissa) > MANTISSA_MAX and exponent < 127 and mantissa % 10 == 0:
        mantissa //= 10
        exponent += 1
    if abs(mantissa) > MANTISSA_MAX or not -128 <= exponent <= 127:
        raise ValueError(f"{value} does not fit an IEEE 11073 FLOAT")
    return ((exponent & 0xFF) << MANTISSA_BITS) | (mantissa & MANTISSA_MASK)


# --- attributes ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Attribute:
    attr_id: int
    value: bytes


def decode_attribute_list(reader: Reader) -> tuple[Attribute, ...]:
    count = reader.u16()
    body = reader.sub("attribute list")
    attrs = tuple(Attribute(body.u16(), body.octets()) for _ in range(count))
    body.end()
    return attrs


def encode_attribute_list(attrs: tuple[Attribute, ...]) -> bytes:
    return u16(len(attrs)) + octets(b"".join(u16(a.attr_id) + octets(a.value) for a in attrs))


def attr_value(attrs: tuple[Attribute, ...], attr_id: int) -> bytes | None:
    return next((a.value for a in attrs if a.attr_id == attr_id), None)


def _uint(value: bytes | None, size: int, what: str) -> int | None:
    if value is None:
        return None
    if len(value) != size:
        raise Ieee11073Error(f"{what}: {len(value)} bytes, expected {size}")
    return int.from_bytes(value, "big")


# --- event reports --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class EventReport:
    handle: int
    event_time: int  # pen relative time (s) when it sent the report
    event_type: int
    info: bytes


def decode_event_report(data: DataApdu) -> EventReport:
    if data.choice not in (DataChoice.ROIV_CONFIRMED_EVENT_REPORT, DataChoice.ROIV_EVENT_REPORT):
        raise Ieee11073Error(f"expected an event report, got data choice 0x{data.choice:04X}")
    reader = Reader(data.payload, "event report")
    report = EventReport(reader.u16(), reader.u32(), reader.u16(), reader.octets())
    reader.end()
    return report


def encode_event_report(invoke_id: int, report: EventReport) -> bytes:
    payload = u16(report.handle) + u32(report.event_time) + u16(report.event_type) + octets(report.info)
    return encode_data_apdu(DataApdu(invoke_id, DataChoice.ROIV_CONFIRMED_EVENT_REPORT, payload))


def encode_event_result(invoke_id: int, handle: int, time: int, event_type: int, reply: bytes) -> bytes:
    payload = u16(handle) + u32(time) + u16(event_type) + octets(reply)
    return encode_data_apdu(DataApdu(invoke_id, DataChoice.RORS_CONFIRMED_EVENT_REPORT, payload))


def decode_event_result(data: DataApdu) -> EventReport:
    if data.choice != DataChoice.RORS_CONFIRMED_EVENT_REPORT:
        raise Ieee11073Error(f"expected an event report result, got data choice 0x{data.choice:04X}")
    reader = Reader(data.payload, "event report result")
    report = EventReport(reader.u16(), reader.u32(), reader.u16(), reader.octets())
    reader.end()
    return report


# --- configuration ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ConfigObject:
    obj_class: int
    handle: int
    attributes: tuple[Attribute, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigReport:
    config_id: int
    objects: tuple[ConfigObject, ...]

    def _store(self) -> ConfigObject | None:
        return next((o for o in self.objects if o.obj_class == MDC_MOC_VMO_PMSTORE), None)

    def _store_uint(self, attr_id: int, size: int) -> int | None:
        store = self._store()
        return None if store is None else _uint(attr_value(store.attributes, attr_id), size, f"attr 0x{attr_id:04X}")

    @property
    def store_capacity(self) -> int | None:
        return self._store_uint(ATTR_METRIC_STORE_CAPAC_CNT, 4)

    @property
    def store_usage(self) -> int | None:
        return self._store_uint(ATTR_METRIC_STORE_USAGE_CNT, 4)

    @property
    def segment_count(self) -> int | None:
        return self._store_uint(ATTR_NUM_SEG, 2)

    @property
    def unit_code(self) -> int | None:
        for obj in self.objects:
            code = _uint(attr_value(obj.attributes, ATTR_UNIT_CODE), 2, "unit code")
            if code is not None:
                return code
        return None


def decode_config_report(report: EventReport) -> ConfigReport:
    if report.event_type != MDC_NOTI_CONFIG:
        raise Ieee11073Error(f"expected MDC_NOTI_CONFIG, got event 0x{report.event_type:04X}")
    reader = Reader(report.info, "config report")
    config_id = reader.u16()
    count = reader.u16()
    body = reader.sub("config object list")
    reader.end()
    objects = tuple(ConfigObject(body.u16(), body.u16(), decode_attribute_list(body)) for _ in range(count))
    body.end()
    return ConfigReport(config_id, objects)


def encode_config_report(config: ConfigReport) -> bytes:
    objs = b"".join(u16(o.obj_class) + u16(o.handle) + encode_attribute_list(o.attributes) for o in config.objects)
    return u16(config.config_id) + u16(len(config.objects)) + octets(objs)


def accept_config(invoke_id: int, config_id: int) -> bytes:
    """``E7 00 00 16 00 14 <invoke> 02 01 00 0E 00 00 00 00 00 00 0D 1C 00 04 <config id> 00 00``."""
    return encode_event_result(invoke_id, MDS_HANDLE, 0, MDC_NOTI_CONFIG, u16(config_id) + u16(ACCEPTED_CONFIG))


# --- GET MDS attributes ---------------------------------------------------------------------------
def get_mds_attributes(invoke_id: int, handle: int = MDS_HANDLE) -> bytes:
    """GET with an empty attribute-id list: all attributes of ``handle``."""
    payload = u16(handle) + u16(0) + u16(0)
    return encode_data_apdu(DataApdu(invoke_id, DataChoice.ROIV_GET, payload))


def decode_get_request(data: DataApdu) -> int:
    if data.choice != DataChoice.ROIV_GET:
        raise Ieee11073Error(f"expected a GET, got data choice 0x{data.choice:04X}")
    return Reader(data.payload, "GET").u16()


@dataclasses.dataclass(frozen=True, slots=True)
class MdsInfo:
    system_id: bytes
    relative_time: int | None  # pen clock, seconds
    serial: str
    part_number: str
    hw_revision: str
    sw_revision: str
    manufacturer: str
    model: str
    dev_config_id: int | None


def _text(value: bytes) -> str:
    return value.decode("ascii", errors="replace").rstrip("\x00")


def decode_mds(data: DataApdu) -> MdsInfo:
    if data.choice != DataChoice.RORS_GET:
        raise Ieee11073Error(f"expected a GET result, got data choice 0x{data.choice:04X}")
    reader = Reader(data.payload, "GET result")
    reader.u16()  # handle
    attrs = decode_attribute_list(reader)
    reader.end()
    specs: dict[int, str] = {}
    spec = attr_value(attrs, ATTR_ID_PROD_SPECN)
    if spec is not None:
        sr = Reader(spec, "production spec")
        count = sr.u16()
        body = sr.sub("production spec entries")
        for _ in range(count):
            spec_type, _component = body.u16(), body.u16()
            specs[spec_type] = _text(body.octets())
    manufacturer = model = ""
    model_attr = attr_value(attrs, ATTR_ID_MODEL)
    if model_attr is not None:
        mr = Reader(model_attr, "model")
        manufacturer, model = _text(mr.octets()), _text(mr.octets())
    serial = specs.get(PROD_SPEC_SERIAL, "")
    if not serial:
        raise Ieee11073Error("MDS attributes carry no serial number")
    return MdsInfo(
        system_id=Reader(attr_value(attrs, ATTR_SYS_ID) or u16(0), "system id").octets(),
        relative_time=_uint(attr_value(attrs, ATTR_TIME_REL), 4, "relative time"),
        serial=serial,
        part_number=specs.get(PROD_SPEC_PART, ""),
        hw_revision=specs.get(PROD_SPEC_HW, ""),
        sw_revision=specs.get(PROD_SPEC_SW, ""),
        manufacturer=manufacturer,
        model=model,
        dev_config_id=_uint(attr_value(attrs, ATTR_DEV_CONFIG_ID), 2, "dev config id"),
    )


def encode_mds(invoke_id: int, info: MdsInfo) -> bytes:
    """GET result carrying the MDS attributes (simulator side)."""
    specs = [
        (PROD_SPEC_SERIAL, info.serial),
        (PROD_SPEC_PART, info.part_number),
        (PROD_SPEC_HW, info.hw_revision),
        (PROD_SPEC_SW, info.sw_revision),
    ]
    spec_body = b"".join(u16(t) + u16(1) + octets(v.encode("ascii")) for t, v in specs)
    attrs = [Attribute(ATTR_SYS_ID, octets(info.system_id))]
    if info.relative_time is not None:
        attrs.append(Attribute(ATTR_TIME_REL, u32(info.relative_time)))
    attrs += [
        Attribute(ATTR_ID_PROD_SPECN, u16(len(specs)) + octets(spec_body)),
        Attribute(ATTR_ID_MODEL, octets(info.manufacturer.encode()) + octets(info.model.encode())),
    ]
    if info.dev_config_id is not None:
        attrs.append(Attribute(ATTR_DEV_CONFIG_ID, u16(info.dev_config_id)))
    payload = u16(MDS_HANDLE) + encode_attribute_list(tuple(attrs))
    return encode_data_apdu(DataApdu(invoke_id, DataChoice.RORS_GET, payload))


# --- actions: segment info, trigger transfer --------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    handle: int
    action_type: int
    data: bytes


def encode_action(invoke_id: int, action: Action, *, result: bool = False) -> bytes:
    choice = DataChoice.RORS_CONFIRMED_ACTION if result else DataChoice.ROIV_CONFIRMED_ACTION
    payload = u16(action.handle) + u16(action.action_type) + octets(action.data)
    return encode_data_apdu(DataApdu(invoke_id, choice, payload))


def decode_action(data: DataApdu, *, result: bool) -> Action:
    choice = DataChoice.RORS_CONFIRMED_ACTION if result else DataChoice.ROIV_CONFIRMED_ACTION
    if data.choice != choice:
        raise Ieee11073Error(f"expected data choice 0x{choice:04X}, got 0x{data.choice:04X}")
    reader = Reader(data.payload, "action")
    action = Action(reader.u16(), reader.u16(), reader.octets())
    reader.end()
    return action


def segment_info_request(invoke_id: int) -> bytes:
    """``... 01 00 0C 0D 00 06 00 01 00 02 00 00``: info on all segments of the PM-store."""
    selection = u16(SEGM_SELECTION_ALL) + octets(u16(0))
    return encode_action(invoke_id, Action(PM_STORE_HANDLE, MDC_ACT_SEG_GET_INFO, selection))


def trigger_transfer(invoke_id: int, instance: int) -> bytes:
    return encode_action(invoke_id, Action(PM_STORE_HANDLE, MDC_ACT_SEG_TRIG_XFER, u16(instance)))


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentInfo:
    instance: int
    attributes: tuple[Attribute, ...]

    @property
    def label(self) -> str:
        raw = attr_value(self.attributes, ATTR_PM_SEG_LABEL_STRING)
        return _text(Reader(raw, "label").octets()) if raw else ""

    @property
    def usage(self) -> int | None:
        return _uint(attr_value(self.attributes, ATTR_SEG_USAGE_CNT), 4, "segment usage")

    def entry_size(self) -> int | None:
        """Bytes per entry from the segment map, or None when the segment has no map."""
        raw = attr_value(self.attributes, ATTR_PM_SEG_MAP)
        if raw is None:
            return None
        reader = Reader(raw, "segment map")
        header = reader.u16()
        size = 4 if header & SEG_ELEM_HDR_RELATIVE_TIME else 0
        size += 8 if header & SEG_ELEM_HDR_ABSOLUTE_TIME else 0
        size += 8 if header & SEG_ELEM_HDR_BO_TIME else 0
        count = reader.u16()
        body = reader.sub("segment map entries")
        for _ in range(count):
            body.u16()  # class
            body.u16()  # metric type partition
            body.u16()  # metric type code
            body.u16()  # handle
            n = body.u16()
            amap = body.sub("attribute value map")
            for _ in range(n):
                amap.u16()
                size += amap.u16()
        return size


def decode_segment_info(action: Action) -> tuple[SegmentInfo, ...]:
    if action.action_type != MDC_ACT_SEG_GET_INFO:
        raise Ieee11073Error(f"expected segment info, got action 0x{action.action_type:04X}")
    reader = Reader(action.data, "segment info list")
    count = reader.u16()
    body = reader.sub("segment info entries")
    reader.end()
    segments = tuple(SegmentInfo(body.u16(), decode_attribute_list(body)) for _ in range(count))
    body.end()
    return segments


def encode_segment_info(segments: tuple[SegmentInfo, ...]) -> bytes:
    body = b"".join(u16(s.instance) + encode_attribute_list(s.attributes) for s in segments)
    return u16(len(segments)) + octets(body)


def dose_segment_map() -> bytes:
    """The segment map a NovoPen reports: relative time, FLOAT dose, two 16-bit flag words."""
    elems = [
        (0x0006, 0x0082, 0x3401, 0x0002, 0x0A56, 4),
        (0x0006, 0x0082, 0x3402, 0x0003, 0x0A66, 2),
        (0x0006, 0x0082, 0xF000, 0x0004, 0x0A66, 2),
    ]
    body = b"".join(
        u16(c) + u16(p) + u16(code) + u16(h) + u16(1) + octets(u16(a) + u16(n)) for c, p, code, h, a, n in elems
    )
    return u16(SEG_ELEM_HDR_RELATIVE_TIME) + u16(len(elems)) + octets(body)


def decode_trigger_result(action: Action) -> tuple[int, int]:
    """(segment instance, result code) of a trigger-transfer reply."""
    if action.action_type != MDC_ACT_SEG_TRIG_XFER:
        raise Ieee11073Error(f"expected trigger result, got action 0x{action.action_type:04X}")
    reader = Reader(action.data, "trigger result")
    instance, code = reader.u16(), reader.u16()
    reader.end()
    return instance, code


# --- segment data ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class DoseEntry:
    """One 12-byte entry exactly as stored by the pen."""

    relative_time: int
    units_raw: int
    flags: int

    def encode(self) -> bytes:
        return u32(self.relative_time) + u32(self.units_raw) + u32(self.flags)


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentData:
    report_time: int  # pen relative clock when this report was sent
    instance: int
    first_index: int
    status: int
    entries: tuple[DoseEntry, ...]

    @property
    def last(self) -> bool:
        return bool(self.status & SEVTSTA_LAST_ENTRY)


def decode_segment_data(report: EventReport) -> SegmentData:
    if report.event_type != MDC_NOTI_SEGMENT_DATA:
        raise Ieee11073Error(f"expected MDC_NOTI_SEGMENT_DATA, got event 0x{report.event_type:04X}")
    reader = Reader(report.info, "segment data")
    instance, first, count, status = reader.u16(), reader.u32(), reader.u32(), reader.u16()
    body = reader.octets()
    reader.end()
    if len(body) != count * DOSE_ENTRY_SIZE:
        raise Ieee11073Error(f"segment data: {count} entries need {count * DOSE_ENTRY_SIZE} bytes, got {len(body)}")
    entries = tuple(
        DoseEntry(
            int.from_bytes(body[i : i + 4], "big"),
            int.from_bytes(body[i + 4 : i + 8], "big"),
            int.from_bytes(body[i + 8 : i + 12], "big"),
        )
        for i in range(0, len(body), DOSE_ENTRY_SIZE)
    )
    return SegmentData(report.event_time, instance, first, status, entries)


def encode_segment_data(invoke_id: int, data: SegmentData) -> bytes:
    body = b"".join(e.encode() for e in data.entries)
    info = u16(data.instance) + u32(data.first_index) + u32(len(data.entries)) + u16(data.status) + octets(body)
    return encode_event_report(invoke_id, EventReport(PM_STORE_HANDLE, data.report_time, MDC_NOTI_SEGMENT_DATA, info))


def confirm_segment_data(invoke_id: int, data: SegmentData) -> bytes:
    """The manager's confirmation: instance, first index, count, status 0x0080 (XD ACK1/ACK2)."""
    reply = u16(data.instance) + u32(data.first_index) + u32(len(data.entries)) + u16(SEVTSTA_MANAGER_CONFIRM)
    return encode_event_result(invoke_id, PM_STORE_HANDLE, TIME_UNKNOWN, MDC_NOTI_SEGMENT_DATA, reply)
