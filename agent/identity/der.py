"""The few DER reads the daemon needs at steady state, without cryptography's ``serialization`` and
``x509`` packages (together about 1.1 MiB resident in the daemon: docs/field.md "What the box costs").

An Ed25519 key in its one fixed PKCS#8 / SubjectPublicKeyInfo form (RFC 8410 §7, §4: what cryptography
writes), and a certificate's notAfter (RFC 5280 §4.1.2.5). Anything these do not recognise exactly
gives None, and the caller falls back to cryptography's full parser: they never refuse what it accepts.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re

ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")  # v1, id-Ed25519, OCTET STRING
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # id-Ed25519, BIT STRING (0 unused bits)
ED25519_LEN = 32
_SEQUENCE, _INTEGER, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x02, 0x17, 0x18, 0xA0
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_UTC = re.compile(rb"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")
_GENERALIZED = re.compile(rb"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z")


def pem_block(pem: bytes, label: str) -> bytes | None:
    """The DER of the first ``-----BEGIN label-----`` block, or None."""
    for match in _PEM.finditer(pem):
        if match.group(1) == label.encode():
            try:
                return base64.b64decode(b"".join(match.group(2).split()), validate=True)
            except binascii.Error:
                return None
    return None


def ed25519_private_seed(pem: bytes) -> bytes | None:
    """The 32-byte seed of an unencrypted PKCS#8 v1 Ed25519 key, or None for any other key."""
    der = pem_block(pem, "PRIVATE KEY")
    if der is None or len(der) != len(ED25519_PKCS8_PREFIX) + ED25519_LEN or not der.startswith(ED25519_PKCS8_PREFIX):
        return None
    return der[len(ED25519_PKCS8_PREFIX) :]


def ed25519_public_raw(pem: bytes) -> bytes | None:
    """The 32 raw bytes of an Ed25519 SubjectPublicKeyInfo, or None for any other key."""
    der = pem_block(pem, "PUBLIC KEY")
    if der is None or len(der) != len(ED25519_SPKI_PREFIX) + ED25519_LEN or not der.startswith(ED25519_SPKI_PREFIX):
        return None
    return der[len(ED25519_SPKI_PREFIX) :]


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``pos``; ValueError if it overruns ``end``."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("overrun")
    return tag, pos, pos + length


def _time(tag: int, value: bytes) -> float | None:
    if tag == _UTC_TIME and (m := _UTC.fullmatch(value)):
        year = int(m.group(1))
        year += 1900 if year >= 50 else 2000  # RFC 5280 §4.1.2.5.1
    elif tag == _GENERALIZED_TIME and (m := _GENERALIZED.fullmatch(value)):
        year = int(m.group(1))
    else:
        return None
    month, day, hour, minute, second = (int(g) for g in m.groups()[1:])
    try:
        return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()
    except ValueError:  # no such date (February 30th, hour 24, a leap second)
        return None


def cert_not_after(pem: bytes) -> float | None:
    """notAfter (POSIX seconds) of the first certificate in ``pem``, or None if it cannot be read this way."""
    der = pem_block(pem, "CERTIFICATE")
    if der is None:
        return None
    try:
        tag, start, end = _tlv(der, 0, len(der))  # Certificate
        if tag != _SEQUENCE:
            return None
        tag, pos, tbs_end = _tlv(der, start, end)  # TBSCertificate
        if tag != _SEQUENCE:
            return None
        fields: list[tuple[int, int, int]] = []
        while pos < tbs_end and len(fields) < 5:
            tag, start, pos = _tlv(der, pos, tbs_end)
            fields.append((tag, start, pos))
        if fields and fields[0][0] == _VERSION:
            fields.pop(0)
        if len(fields) < 4 or fields[0][0] != _INTEGER or fields[3][0] != _SEQUENCE:
            return None  # serialNumber, signature, issuer, validity
        _, pos, validity_end = fields[3]
        _, _, pos = _tlv(der, pos, validity_end)  # notBefore
        tag, start, stop = _tlv(der, pos, validity_end)  # notAfter
    except ValueError:
        return None
    return _time(tag, der[start:stop])
