"""The device's own credentials: key pair made on the box, CSR, certificate, pinned keys.

Layout in the state directory (all files mode 0600, the directory 0700):
``device.key`` (PKCS#8 PEM, never leaves the box), ``device.crt`` (chain from the
fleet CA), ``ca.crt`` (fleet CA, pinned for TLS), ``command.pub`` (cloud key that
signs commands), ``device.json`` (device id, endpoint, initial config).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import ConfigError, NotProvisioned
from agent.fsutil import atomic_write
from agent.identity import der
from agent.wire.cose import is_private_key, is_public_key, key_id

if TYPE_CHECKING:
    from cryptography import x509

    from agent.wire.cose import PrivateKey, PublicKey

KEY_FILE = "device.key"
CERT_FILE = "device.crt"
CA_FILE = "ca.crt"
COMMAND_KEY_FILE = "command.pub"
DEVICE_FILE = "device.json"
KEY_TYPES = ("ed25519", "p256")


def not_after(cert: x509.Certificate) -> float:
    """The certificate's notAfter as a POSIX time.

    ``not_valid_after_utc`` arrived in cryptography 42; OpenWrt's python3-cryptography and the
    emulated device's are older, where only the naive-UTC ``not_valid_after`` exists.
    """
    aware = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return float(aware.timestamp())
    return float(cert.not_valid_after.replace(tzinfo=dt.UTC).timestamp())


def ensure_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)


def generate_key(key_type: str) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "p256":
        from cryptography.hazmat.primitives.asymmetric import ec  # only for a P-256 key (docs/field.md)

        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError(f"agent.key_type: expected one of {', '.join(KEY_TYPES)}, got {key_type!r}")


def key_pem(key: PrivateKey) -> bytes:
    # the serialization package (it loads ssh, bcrypt, the ciphers) only when a key is made: not at steady state
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_or_create_key(state_dir: Path, key_type: str) -> PrivateKey:
    """The key is created once, on the box, and reused: re-running provisioning is safe."""
    path = state_dir / KEY_FILE
    if path.exists():
        return load_key(path)
    ensure_state_dir(state_dir)
    key = generate_key(key_type)
    atomic_write(path, key_pem(key))
    return key


def load_key(path: Path) -> PrivateKey:
    try:
        pem = path.read_bytes()
        seed = der.ed25519_private_seed(pem)
        if seed is not None:  # the usual key, read without the serialization package (RSS, docs/field.md)
            key: object = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        else:
            from cryptography.hazmat.primitives import serialization  # a P-256 key: the full parser

            key = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: the device key is unreadable ({exc}); deprovision and enrol again") from exc
    if not is_private_key(key):
        raise ConfigError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def build_csr(key: PrivateKey, hardware_serial: str, common_name: str | None = None) -> bytes:
    """CSR naming the hardware serial; the CA chooses the device id (the certificate CN). ``common_name``:
    the device id asked for (an AWS renewal: the thing the new certificate is for)."""
    # x509 and serialization only for provisioning and renewal: not at steady state (RSS, docs/field.md)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    names = [x509.NameAttribute(NameOID.SERIAL_NUMBER, hardware_serial)]
    if common_name:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    subject = x509.Name(names)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def hardware_serial() -> str:
    """A stable hardware identity: the machine id (OpenWRT: first MAC would do as well)."""
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value:
            return value[:32]
    for iface in sorted(Path("/sys/class/net").glob("*")):
        try:
            mac = (iface / "address").read_text().strip()
        except OSError:
            continue
        if mac and mac != "00:00:00:00:00:00":
            return mac.replace(":", "")
    return "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Everything provisioning left behind, loaded for the daemon."""

    state_dir: Path
    device_id: str
    endpoint: str
    key: PrivateKey
    kid: bytes
    command_key: PublicKey
    initial_config: dict[str, Any]

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def ca_path(self) -> Path:
        return self.state_dir / CA_FILE


def load_public_key(pem: bytes) -> object:
    """A PEM public key; an Ed25519 one without the serialization package (RSS, docs/field.md)."""
    raw = der.ed25519_public_raw(pem)
    if raw is not None:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    from cryptography.hazmat.primitives import serialization  # a P-256 key: the full parser

    return serialization.load_pem_public_key(pem)


def is_provisioned(state_dir: Path) -> bool:
    return all((state_dir / f).exists() for f in (KEY_FILE, CERT_FILE, CA_FILE, COMMAND_KEY_FILE, DEVICE_FILE))


def load_identity(state_dir: Path) -> DeviceIdentity:
    if not is_provisioned(state_dir):
        raise NotProvisioned(f"not provisioned: no credentials in {state_dir} (run `glucoagent provision`)")
    try:
        meta = json.loads((state_dir / DEVICE_FILE).read_text())
        key = load_key(state_dir / KEY_FILE)
        command_key = load_public_key((state_dir / COMMAND_KEY_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"credentials in {state_dir} are unreadable: {exc}") from exc
    if not is_public_key(command_key):
        raise ConfigError(f"{state_dir / COMMAND_KEY_FILE}: unsupported key type")
    return DeviceIdentity(
        state_dir=state_dir,
        device_id=meta["device_id"],
        endpoint=meta["endpoint"],
        key=key,
        kid=key_id(key.public_key()),
        command_key=command_key,
        initial_config=dict(meta.get("config", {})),
    )


def save_credentials(
    state_dir: Path,
    *,
    device_id: str,
    endpoint: str,
    cert_chain_pem: bytes,
    ca_pem: bytes,
    command_key_pem: bytes,
    config: dict[str, Any],
) -> None:
    """Write each file atomically; device.json last, so its presence means the set is complete."""
    atomic_write(state_dir / CERT_FILE, cert_chain_pem)
    atomic_write(state_dir / CA_FILE, ca_pem)
    atomic_write(state_dir / COMMAND_KEY_FILE, command_key_pem)
    meta = {"device_id": device_id, "endpoint": endpoint, "config": config}
    atomic_write(state_dir / DEVICE_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())


