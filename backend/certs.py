"""Keys, CSRs and X.509 building for the fleet CA: the issuer that signs certificates and CRLs, and
readers of a CRL's dates and number. Pure ``cryptography`` calls; where the files live is
``backend/pki.py``."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import GlucoagentError

KeyType = Literal["ed25519", "p256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

CA_DAYS = 3650
CRL_DAYS = 30
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between CA and peers


class PkiError(GlucoagentError):
    """A CSR or certificate request the CA refuses, or a PKI directory that is incomplete."""

    exit_code = 80


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def x509_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def generate_key(key_type: KeyType = "ed25519") -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(f"key type: expected ed25519 or p256, got {key_type!r}")


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_csr(key: PrivateKey, cn: str = "") -> bytes:
    """A CSR as a device builds one (the CA ignores the subject and sets CN = device id)."""
    subject = x509_name(cn) if cn else x509.Name([])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, algorithm)
        .public_bytes(serialization.Encoding.PEM)
    )


def device_public_key(public_key: object) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return public_key
    raise PkiError(f"unsupported device key {type(public_key).__name__}: expected Ed25519 or EC P-256")


class Issuer:
    """A CA key and certificate that sign leaf certificates and CRLs."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def new(cls, cn: str) -> Issuer:
        """A self-signed EC P-256 CA named ``cn``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = now_utc()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509_name(cn))
            .issuer_name(x509_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self,
        cn: str,
        public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        *,
        server_hosts: tuple[str, ...] = (),
    ) -> x509.Certificate:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki(), critical=False)
        )
        if server_hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(server_hosts)), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    def crl(self, revoked: dict[int, dt.datetime], number: int) -> x509.CertificateRevocationList:
        now = now_utc()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._aki(), critical=False)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def revocation_date(entry: x509.RevokedCertificate) -> dt.datetime:
    # cryptography >= 42 has the tz-aware ``*_utc`` twin and deprecates the naive one; 41 has only the naive one.
    when = getattr(entry, "revocation_date_utc", None)
    if when is None:
        when = entry.revocation_date.replace(tzinfo=dt.UTC)
    return when


def last_update_of(crl: x509.CertificateRevocationList) -> dt.datetime:
    when = getattr(crl, "last_update_utc", None)  # cryptography >= 42; 41 has only the naive one
    return when if when is not None else crl.last_update.replace(tzinfo=dt.UTC)


def next_update_of(crl: x509.CertificateRevocationList) -> dt.datetime:
    when = getattr(crl, "next_update_utc", None)
    if when is None:
        naive = crl.next_update
        if naive is None:
            raise PkiError("the CRL has no nextUpdate")
        when = naive.replace(tzinfo=dt.UTC)
    return when


def number_of(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0
