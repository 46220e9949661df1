"""The backend's home directory: fleet PKI, command key, database, broker run dir."""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.fsutil import atomic_write
from agent.mqtt import TlsFiles
from backend.broker import Broker
from backend.db import BackendDb
from backend.pki import FleetPki
from backend.service import BackendKeys, BackendService, link_settings

COMMAND_KEY = "command.key"
AUDIT_SALT = "audit.salt"
HOME_MODE = 0o700  # patient references, token hashes and readings: owner only
INITIAL_CONFIG: dict[str, Any] = {"mqtt.keepalive": 30}


class BackendHome:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, HOME_MODE)  # a home made before, or under a wide umask, is narrowed too
        _ = self.pki
        _ = self.command_key

    @functools.cached_property
    def audit_salt(self) -> bytes:
        """Key of the erasure audit's patient hash; kept apart from the rows it protects (0600)."""
        path = self.root / AUDIT_SALT
        if not path.exists():
            atomic_write(path, secrets.token_bytes(32))
        return path.read_bytes()

    @functools.cached_property
    def pki(self) -> FleetPki:
        return FleetPki.open(self.root / "pki")

    @functools.cached_property
    def command_key(self) -> ed25519.Ed25519PrivateKey:
        path = self.root / COMMAND_KEY
        if not path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            atomic_write(path, pem)
            return key
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(loaded, ed25519.Ed25519PrivateKey)
        return loaded

    def keys(self) -> BackendKeys:
        return BackendKeys(
            ca_pem=self.pki.ca_pem,
            sign_csr=lambda csr, device_id: self.pki.sign_device_csr(csr, device_id),
            command_key=self.command_key,
        )

    def db(self) -> BackendDb:
        return BackendDb(self.root / "backend.db")

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    def broker(self, port: int | None = None, extra_conf: Sequence[str] = ()) -> Broker:
        return Broker(self.pki, self.broker_dir, port=port, extra_conf=extra_conf)

    def backend_tls(self) -> TlsFiles:
        creds = self.pki.backend
        return TlsFiles(ca=creds.ca, cert=creds.cert, key=creds.key)

    def service(self, host: str, port: int, db: BackendDb | None = None) -> BackendService:
        return BackendService(db or self.db(), self.keys(), link_settings(host, port, self.backend_tls()), INITIAL_CONFIG)
