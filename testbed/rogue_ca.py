"""A CA the fleet does not trust, for tests: its certificates must be refused by the broker and by
provisioning. Test rig only, so it lives here and not in ``backend/pki.py``; it reuses the fleet CA's
certificate builder (backend/certs.py) on purpose, so a rogue certificate differs from a fleet one only in its issuer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from agent.fsutil import atomic_write
from backend.certs import BACKDATE, Issuer, KeyType, cert_to_pem, common_name, generate_key, key_to_pem, now_utc
from backend.pki import CA_CERT, CERT_MODE, KEY_MODE, ClientCreds, FleetPki

__all__ = ["RogueCa"]


class RogueCa:
    """A CA the fleet does not trust, for tests: its certificates must be refused by the broker."""

    def __init__(self, directory: Path, fleet: FleetPki, *, same_name: bool = True) -> None:
        """``same_name`` gives the rogue CA the fleet CA's subject, so only the signature tells them apart."""
        self.directory = directory
        self.fleet_ca = fleet.ca_path
        self._issuer = Issuer.new(common_name(fleet.ca_cert.subject) if same_name else "rogue CA")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / CA_CERT, cert_to_pem(self._issuer.cert), CERT_MODE)

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    def issue_client_cert(self, cn: str, key_type: KeyType = "ed25519") -> ClientCreds:
        """A client certificate signed by the rogue CA; the creds pin the *fleet* CA for the server."""
        now = now_utc()
        key = generate_key(key_type)
        cert = self._issuer.issue(cn, key.public_key(), now - BACKDATE, now + dt.timedelta(days=30))
        stem = f"{cn}-{cert.serial_number:x}"
        atomic_write(self.directory / f"{stem}.key", key_to_pem(key), KEY_MODE)
        atomic_write(self.directory / f"{stem}.crt", cert_to_pem(cert), CERT_MODE)
        return ClientCreds(self.directory / f"{stem}.crt", self.directory / f"{stem}.key", self.fleet_ca)
