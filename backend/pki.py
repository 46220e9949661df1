"""The fleet's reference PKI: one CA, the broker's server certificate, the claim and backend identities.

Layout of the PKI directory (keys mode 0600, every write atomic: temp file, fsync, rename):

    ca.key ca.crt              fleet CA, EC P-256; signs everything below and the CRL
    server.key server.crt      broker; SAN DNS:localhost, IP:127.0.0.1; serverAuth
    claim.key claim.crt        factory claim identity (CN ``claim``): provisioning topics only
    backend.key backend.crt    reference cloud (CN ``backend``): every fleet topic
    crl.pem                    revocation list, always present (empty at first)
    clients/                   device credentials written by ``write_device_creds``

The broker takes the certificate CN as the MQTT user name (``use_identity_as_username``),
so a CN *is* an identity: device certificates carry the device id, and the reserved names
``claim`` and ``backend`` are never issued to a device. Device keys may be Ed25519 (the
default on the box) or EC P-256. Only APIs present in cryptography 41 are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.wire.topics import DEVICE_ID_RE
from backend.certs import (
    BACKDATE,
    Issuer,
    KeyType,
    PkiError,
    PrivateKey,
    cert_to_pem,
    common_name,
    device_public_key,
    generate_key,
    key_to_pem,
    last_update_of,
    make_csr,
    next_update_of,
    now_utc,
    number_of,
    revocation_date,
)
from backend.files import atomic_write

__all__ = [
    "BACKEND_CN",
    "CLAIM_CN",
    "RESERVED_CNS",
    "ClientCreds",
    "FleetPki",
    "KeyType",
    "PkiError",
    "generate_key",
    "make_csr",
]


CLAIM_CN = "claim"
BACKEND_CN = "backend"
RESERVED_CNS = frozenset({CLAIM_CN, BACKEND_CN})
SERVER_HOSTS = ("localhost", "127.0.0.1")

SERVER_DAYS = 825
IDENTITY_DAYS = 825
CRL_REISSUE_AGE = dt.timedelta(days=1)  # the running service re-issues the CRL daily: 29 days of slack

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
CLAIM_KEY, CLAIM_CERT = "claim.key", "claim.crt"
BACKEND_KEY, BACKEND_CERT = "backend.key", "backend.crt"
CRL_FILE = "crl.pem"
CRL_LOCK_FILE = ".crl.lock"
CLIENTS_DIR = "clients"
CERT_MODE = 0o644
KEY_MODE = 0o600


@dataclasses.dataclass(frozen=True, slots=True)
class ClientCreds:
    """What an MQTT client needs for mutual TLS: its certificate, its key and the CA it pins."""

    cert: Path
    key: Path
    ca: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())

    @property
    def serial(self) -> int:
        return self.certificate().serial_number

    @property
    def common_name(self) -> str:
        return common_name(self.certificate().subject)


class FleetPki:
    """The fleet CA and its standing identities, kept in one directory. Thread-safe."""

    def __init__(self, directory: Path, issuer: Issuer) -> None:
        self.directory = directory
        self._issuer = issuer
        self._lock = threading.Lock()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path) -> FleetPki:
        """Load the PKI in ``directory``, creating it first if it holds none."""
        if (directory / CA_CERT).exists():
            return cls.load(directory)
        return cls.create(directory)

    @classmethod
    def create(cls, directory: Path) -> FleetPki:
        if (directory / CA_CERT).exists():
            raise PkiError(f"{directory}: a fleet CA exists already (use FleetPki.load)")
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        issuer = Issuer.new("glucoagent fleet CA")
        pki = cls(directory, issuer)
        now = now_utc()
        identities = [
            (SERVER_KEY, SERVER_CERT, "localhost", SERVER_DAYS, SERVER_HOSTS),
            (CLAIM_KEY, CLAIM_CERT, CLAIM_CN, IDENTITY_DAYS, ()),
            (BACKEND_KEY, BACKEND_CERT, BACKEND_CN, IDENTITY_DAYS, ()),
        ]
        for key_file, cert_file, cn, days, hosts in identities:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = issuer.issue(cn, key.public_key(), now - BACKDATE, now + dt.timedelta(days=days), server_hosts=hosts)
            pki._write_pair(directory / key_file, key, directory / cert_file, cert)
        pki._write_crl({}, 1)
        # The CA last: its presence marks a complete directory for ``open``.
        pki._write_pair(directory / CA_KEY, issuer.key, directory / CA_CERT, issuer.cert)
        return pki

    @classmethod
    def load(cls, directory: Path) -> FleetPki:
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{directory}: not a fleet PKI directory: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / CA_KEY}: expected an EC CA key, got {type(key).__name__}")
        for name in (SERVER_KEY, SERVER_CERT, CLAIM_KEY, CLAIM_CERT, BACKEND_KEY, BACKEND_CERT):
            if not (directory / name).exists():
                raise PkiError(f"{directory}: {name} is missing")
        return cls(directory, Issuer(key, cert))

    # --- paths and standing identities ----------------------------------------------------------
    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_cert_path(self) -> Path:
        """Alias of ``ca_path``."""
        return self.ca_path

    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    @property
    def ca_cert(self) -> x509.Certificate:
        return self._issuer.cert

    @property
    def server_cert_path(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key_path(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def claim(self) -> ClientCreds:
        return ClientCreds(self.directory / CLAIM_CERT, self.directory / CLAIM_KEY, self.ca_path)

    @property
    def backend(self) -> ClientCreds:
        return ClientCreds(self.directory / BACKEND_CERT, self.directory / BACKEND_KEY, self.ca_path)

    # --- issuing --------------------------------------------------------------------------------
    def sign_device_csr(self, csr_pem: bytes, device_id: str, days: float = 365) -> bytes:
        """Certificate (PEM) for a device: CN = ``device_id``, clientAuth, the CSR's own key.

        The CSR's signature is checked first (proof the requester holds the key); its subject
        is ignored, since the CA, not the device, names the device.
        """
        if not DEVICE_ID_RE.match(device_id) or device_id in RESERVED_CNS:
            raise PkiError(f"refusing to issue a device certificate for {device_id!r}: not a valid device id")
        if days <= 0:
            raise PkiError(f"certificate lifetime: expected days > 0, got {days}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"malformed CSR: {exc}") from exc
        public_key = device_public_key(csr.public_key())
        if not csr.is_signature_valid:
            raise PkiError("CSR signature does not verify: the requester does not hold the key")
        now = now_utc()
        with self._lock:
            cert = self._issuer.issue(device_id, public_key, now - BACKDATE, now + dt.timedelta(days=days))
        return cert_to_pem(cert)

    def write_device_creds(self, device_id: str, key: PrivateKey, cert_pem: bytes) -> ClientCreds:
        """Store a device's key and certificate under ``clients/`` and return them as creds."""
        return self._write_client(device_id, key, x509.load_pem_x509_certificate(cert_pem))

    def _write_client(self, cn: str, key: PrivateKey, cert: x509.Certificate) -> ClientCreds:
        stem = f"{cn}-{cert.serial_number:x}"
        folder = self.directory / CLIENTS_DIR
        self._write_pair(folder / f"{stem}.key", key, folder / f"{stem}.crt", cert)
        return ClientCreds(folder / f"{stem}.crt", folder / f"{stem}.key", self.ca_path)

    # --- revocation -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _crl_update(self) -> Iterator[None]:
        """One CRL read-modify-write at a time, across threads *and* processes: ``serve``'s CRL keeper
        re-issuing while ``glucoagent-backend revoke`` adds a serial must never drop the revocation."""
        with self._lock, open(self.directory / CRL_LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def revoke(self, serial: int, *more: int) -> None:
        """Add the serials to the CRL and rewrite ``crl.pem`` (the broker reads it on reload)."""
        with self._crl_update():
            crl = self._load_crl()
            revoked = {entry.serial_number: revocation_date(entry) for entry in crl} if crl else {}
            for number in (serial, *more):
                revoked.setdefault(number, now_utc())
            self._write_crl(revoked, (number_of(crl) if crl else 0) + 1)

    def refresh_crl_if_due(self, max_age: dt.timedelta = CRL_REISSUE_AGE) -> bool:
        """Re-issue the CRL (same entries, next number, nextUpdate ``CRL_DAYS`` ahead) once it is ``max_age`` old.

        True when it was re-issued. Past its nextUpdate a CRL makes OpenSSL refuse every client
        certificate, so the running service calls this often (backend/broker.py ``CrlKeeper``).
        """
        with self._crl_update():
            crl = self._load_crl()
            if crl is not None and last_update_of(crl) + BACKDATE + max_age > now_utc():
                return False
            revoked = {entry.serial_number: revocation_date(entry) for entry in crl} if crl else {}
            self._write_crl(revoked, (number_of(crl) if crl else 0) + 1)
            return True

    def crl_next_update(self) -> dt.datetime:
        crl = self._load_crl()
        if crl is None:
            raise PkiError(f"{self.crl_path} is missing")
        return next_update_of(crl)

    def revoked_serials(self) -> frozenset[int]:
        crl = self._load_crl()
        return frozenset(entry.serial_number for entry in crl) if crl else frozenset()

    def crl_pem(self) -> bytes:
        """The current CRL (PEM), written first if the directory has none yet."""
        with self._lock:
            if not self.crl_path.exists():
                self._write_crl({}, 1)
            return self.crl_path.read_bytes()

    def _load_crl(self) -> x509.CertificateRevocationList | None:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except FileNotFoundError:
            return None

    def _write_crl(self, revoked: dict[int, dt.datetime], number: int) -> None:
        crl = self._issuer.crl(revoked, number)
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), CERT_MODE)

    @staticmethod
    def _write_pair(key_path: Path, key: PrivateKey, cert_path: Path, cert: x509.Certificate) -> None:
        atomic_write(key_path, key_to_pem(key), KEY_MODE)
        atomic_write(cert_path, cert_to_pem(cert), CERT_MODE)
