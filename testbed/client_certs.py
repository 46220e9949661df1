"""Client certificates signed by the fleet CA with any CN and any validity window, for tests: expired,
not-yet-valid or reserved-name certificates the broker must refuse, and ready-made device identities.
Test rig only: the cloud itself signs nothing but CSRs (``FleetPki.sign_device_csr``)."""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from backend.certs import BACKDATE, Issuer, KeyType, cert_to_pem, generate_key, now_utc
from backend.pki import CA_KEY, IDENTITY_DAYS, ClientCreds, FleetPki


def issue_client_cert(
    pki: FleetPki,
    cn: str,
    key_type: KeyType = "ed25519",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> ClientCreds:
    """A client key and certificate for ``cn``, signed by the fleet CA, written under the PKI's ``clients/``."""
    ca_key = serialization.load_pem_private_key((pki.directory / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = now_utc()
    key = generate_key(key_type)
    cert = Issuer(ca_key, pki.ca_cert).issue(
        cn, key.public_key(), not_before or now - BACKDATE, not_after or now + dt.timedelta(days=IDENTITY_DAYS)
    )
    return pki.write_device_creds(cn, key, cert_to_pem(cert))
