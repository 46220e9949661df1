"""agent.identity.der against cryptography's own parsers: the same answer, or None (never a wrong one)."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from agent.identity import der
from agent.identity.credentials import load_key, load_public_key, not_after

PEM = serialization.Encoding.PEM


def _cert(not_valid_after: dt.datetime, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gd-0123456789ab")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(not_valid_after)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(PEM)


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # the last UTCTime year
        dt.datetime(2050, 1, 1, tzinfo=dt.UTC),  # GeneralizedTime from here (RFC 5280)
        dt.datetime(2031, 2, 28, 7, 8, 9, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # "no well-defined expiration"
    ],
)
@pytest.mark.parametrize("curve", ["ed25519", "p256"])
def test_not_after_matches_x509(when: dt.datetime, curve: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate() if curve == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    pem = _cert(when, key)
    assert der.cert_not_after(pem) == not_after(x509.load_pem_x509_certificate(pem)) == when.timestamp()


def test_not_after_of_a_chain_is_the_first_certificate() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    first, second = _cert(dt.datetime(2030, 1, 1, tzinfo=dt.UTC), key), _cert(dt.datetime(2040, 1, 1, tzinfo=dt.UTC), key)
    assert der.cert_not_after(first + second) == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",  # not base64
        b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",  # an empty SEQUENCE
        b"-----BEGIN CERTIFICATE-----\nMIIBAAA=\n-----END CERTIFICATE-----\n",  # a length beyond the data
        b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",  # another label
    ],
)
def test_unreadable_certificates_give_none(pem: bytes) -> None:
    assert der.cert_not_after(pem) is None


def test_a_date_that_does_not_exist_gives_none() -> None:
    good = der.pem_block(_cert(dt.datetime(2030, 1, 1, tzinfo=dt.UTC), ed25519.Ed25519PrivateKey.generate()), "CERTIFICATE")
    assert good is not None and good.count(b"300101000000Z") == 1  # notAfter as UTCTime
    bad = good.replace(b"300101000000Z", b"300230000000Z")  # February 30th, same length
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    assert der.cert_not_after(pem) is None


def test_truncated_certificate_gives_none() -> None:
    body = der.pem_block(_cert(dt.datetime(2030, 1, 1, tzinfo=dt.UTC), ed25519.Ed25519PrivateKey.generate()), "CERTIFICATE")
    assert body is not None
    for cut in (2, 10, 40, len(body) // 2):
        pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(body[:cut]) + b"-----END CERTIFICATE-----\n"
        assert der.cert_not_after(pem) is None


def test_ed25519_keys_read_without_serialization_are_the_same_keys(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "device.key"
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert der.ed25519_private_seed(path.read_bytes()) == key.private_bytes_raw()
    loaded = load_key(path)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey) and loaded.private_bytes_raw() == key.private_bytes_raw()
    public_pem = key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert der.ed25519_public_raw(public_pem) == key.public_key().public_bytes_raw()
    assert load_public_key(public_pem) == key.public_key()


def test_other_keys_fall_back_to_the_full_parser(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert der.ed25519_private_seed(pem) is None and der.ed25519_public_raw(public_pem) is None
    path = tmp_path / "device.key"
    path.write_bytes(pem)
    loaded = load_key(path)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.private_numbers() == key.private_numbers()
    assert load_public_key(public_pem) == key.public_key()
