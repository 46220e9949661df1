"""The backend's home directory: fleet PKI, command key, database, broker run dir."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import GlucoagentError
from backend.broker import Broker
from backend.clouds.adapter import adapter_for
from backend.db import BackendDb
from backend.files import atomic_write
from backend.mqtt_client import link_settings
from backend.pki import ClientCreds, FleetPki
from backend.release import ReleaseShelf
from backend.revocation import reload_broker
from backend.service import CERT_DAYS, BackendKeys, BackendService

log = logging.getLogger(__name__)
COMMAND_KEY = "command.key"
RELEASE_KEY = "release.key"  # signs release manifests only (docs/updates.md); never the command key
AUDIT_SALT = "audit.salt"
HOME_MODE = 0o700  # patient references, token hashes and readings: owner only
INITIAL_CONFIG: dict[str, Any] = {"mqtt.keepalive": 30}


class BackendHome:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cert_days: float = CERT_DAYS  # device certificate lifetime (tests shorten it)
        # Called after the CRL file changed; the harness points it at its Broker.reload_crl.
        self.crl_reloader: Callable[[], None] | None = None

    def ensure(self) -> None:
        self.root.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, HOME_MODE)  # a home made before, or under a wide umask, is narrowed too
        _ = self.pki
        _ = self.command_key
        _ = self.release_key

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
        return _signing_key(self.root / COMMAND_KEY)

    @functools.cached_property
    def release_key(self) -> ed25519.Ed25519PrivateKey:
        return _signing_key(self.root / RELEASE_KEY)

    def keys(self) -> BackendKeys:
        return BackendKeys(
            ca_pem=self.pki.ca_pem,
            sign_csr=lambda csr, device_id: self.pki.sign_device_csr(csr, device_id, days=self.cert_days),
            command_key=self.command_key,
            release_key=self.release_key,
            revoke=self.revoke_certificates,
            revoked=self.pki.revoked_serials,
        )

    def revoke_certificates(self, serials: Sequence[int]) -> None:
        """Revoke, rewrite the CRL, and have the broker enforce it for every new login."""
        if serials:
            self.pki.revoke(*serials)
            self.reload_broker_crl()

    def reload_broker_crl(self) -> None:
        """The broker re-reads the CRL: the harness's own broker (``crl_reloader``), else the one
        `glucoagent-backend broker` runs in this home (found by its pid file, backend/broker.py)."""
        try:
            if self.crl_reloader is not None:
                self.crl_reloader()
            elif not reload_broker(self.broker_dir, self.pki):
                log.warning("CRL rewritten, but no broker runs in %s: it loads the CRL when it starts", self.broker_dir)
        except (GlucoagentError, OSError) as exc:  # the CRL is written: the CRL keeper's next check reloads it
            log.error("the broker did not reload the CRL: %s", exc)

    def db(self) -> BackendDb:
        return BackendDb(self.root / "backend.db")

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    def broker(self, port: int | None = None, extra_conf: Sequence[str] = ()) -> Broker:
        return Broker(self.pki, self.broker_dir, port=port, extra_conf=extra_conf)

    def backend_tls(self) -> ClientCreds:
        return self.pki.backend

    def service(
        self, host: str, port: int, db: BackendDb | None = None, role: str = "all", cloud: str = "glucoagent"
    ) -> BackendService:
        """``cloud``: the adapter the service sits behind (backend/clouds/)."""
        service = BackendService(
            db or self.db(),
            self.keys(),
            link_settings(host, port, self.backend_tls()),
            INITIAL_CONFIG,
            role,
            cloud=adapter_for(cloud),
        )
        service.releases = self.releases
        return service

    def ingest_worker(self, host: str, port: int, slot: int, cloud: str = "glucoagent") -> BackendService:
        """Ingest worker ``slot`` of ``serve --workers N`` (backend/workers.py): a kept session under a
        fixed client id, and a PUBACK only after what it received is stored and acknowledged. ``cloud``:
        where it reads (the Azure bridge's ingest endpoint, AWS's topic rule target, our topics)."""
        from backend.workers import WORKER_SESSION_S, worker_client_id

        settings = dataclasses.replace(
            link_settings(host, port, self.backend_tls()),
            client_id=worker_client_id(slot),
            session_expiry_s=WORKER_SESSION_S,
            manual_ack=True,
        )
        return BackendService(self.db(), self.keys(), settings, INITIAL_CONFIG, role="ingest", cloud=adapter_for(cloud))

    @property
    def releases(self) -> ReleaseShelf:
        return ReleaseShelf(self.root / "releases")


def _signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key kept in the home (0600, atomic_write), made on first use."""
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
