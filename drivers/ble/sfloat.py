"""IEEE 11073-20601 medical floats as BLE health profiles carry them: 16-bit SFLOAT, 32-bit FLOAT.

SFLOAT: 4-bit signed exponent (high nibble), 12-bit signed mantissa; value = mantissa x 10^exponent.
FLOAT: 8-bit signed exponent (high byte), 24-bit signed mantissa. Little-endian on the wire.
Some mantissas are not numbers (NaN, NRes "not at this resolution", +/-INFINITY, a reserved value);
they decode to a ``Special`` and never to a number, so no caller can mistake one for a measurement.
Values are exact ``Decimal``s: 5.6 mmol/L stays 5.6, not 5.599999.
"""

from __future__ import annotations

import enum
from decimal import Decimal

from drivers.errors import InvalidResponse


class Special(enum.StrEnum):
    NAN = "NaN"
    NRES = "NRes"
    POS_INFINITY = "+INFINITY"
    NEG_INFINITY = "-INFINITY"
    RESERVED = "reserved"


#: mantissa -> special value (the exponent is ignored for these: the standard defines them at exponent 0,
#: and a meter sending them with another exponent still means "no number").
_SFLOAT_SPECIAL = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.POS_INFINITY,
    0x0802: Special.NEG_INFINITY,
    0x0801: Special.RESERVED,
}
_FLOAT_SPECIAL = {
    0x7FFFFF: Special.NAN,
    0x800000: Special.NRES,
    0x7FFFFE: Special.POS_INFINITY,
    0x800002: Special.NEG_INFINITY,
    0x800001: Special.RESERVED,
}


class NotANumber(InvalidResponse):
    """A medical float field held one of the special values (NaN, NRes, +/-INFINITY, reserved)."""

    def __init__(self, field: str, special: Special) -> None:
        self.field = field
        self.special = special
        super().__init__(f"{field} is {special.value}, not a number")


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _exact(mantissa: int, exponent: int) -> Decimal:
    """mantissa x 10^exponent; a whole number prints as one (120, not 1.2E+2)."""
    if exponent >= 0:
        return Decimal(mantissa * 10**exponent)
    return Decimal(mantissa).scaleb(exponent)


def decode_sfloat(raw: int) -> Decimal | Special:
    """A 16-bit SFLOAT (as an unsigned int) -> its exact value or the special it encodes."""
    mantissa = raw & 0x0FFF
    if mantissa in _SFLOAT_SPECIAL:
        return _SFLOAT_SPECIAL[mantissa]
    return _exact(_signed(mantissa, 12), _signed(raw >> 12, 4))


def decode_float(raw: int) -> Decimal | Special:
    """A 32-bit FLOAT (as an unsigned int) -> its exact value or the special it encodes."""
    mantissa = raw & 0xFFFFFF
    if mantissa in _FLOAT_SPECIAL:
        return _FLOAT_SPECIAL[mantissa]
    return _exact(_signed(mantissa, 24), _signed(raw >> 24, 8))


def sfloat_at(data: bytes, offset: int, field: str) -> Decimal:
    """The SFLOAT at ``offset`` as a number; a special value raises ``NotANumber`` naming ``field``."""
    value = decode_sfloat(int.from_bytes(data[offset : offset + 2], "little"))
    if isinstance(value, Special):
        raise NotANumber(field, value)
    return value


def encode_sfloat(value: Decimal | Special) -> bytes:
    """The 2 wire bytes of ``value`` (simulators and tests); exact or ValueError, never rounded."""
    if isinstance(value, Special):
        return next(k for k, v in _SFLOAT_SPECIAL.items() if v is value).to_bytes(2, "little")
    sign, digits, exponent = value.normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    while exponent > 0 and abs(mantissa * 10) <= 2045:  # 70, not 7E+1, where the mantissa can hold it
        mantissa, exponent = mantissa * 10, exponent - 1
    if not (-8 <= exponent <= 7 and abs(mantissa) <= 2045):  # +/-2046..2048 are the specials
        raise ValueError(f"{value} has no exact SFLOAT")
    return (((exponent & 0xF) << 12) | (mantissa & 0xFFF)).to_bytes(2, "little")
