"""The handshake check used while the box's clock is wrong: the validity window is ignored, nothing else."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.link.mqtt import verify_ignoring_validity
from backend.certs import Issuer, cert_to_pem, generate_key

NOW = dt.datetime.now(dt.UTC)


def _der(issuer: Issuer, *, hosts: tuple[str, ...] = ("broker.example", "127.0.0.1"), years: int = 0) -> bytes:
    start = NOW + dt.timedelta(days=365 * years)
    cert = issuer.issue("broker", generate_key("ed25519").public_key(), start, start + dt.timedelta(days=30), server_hosts=hosts)
    return cert.public_bytes(Encoding.DER)


def test_a_fleet_certificate_outside_its_window_is_accepted_by_name_and_ip() -> None:
    fleet = Issuer.new("fleet CA")
    ca = cert_to_pem(fleet.cert)
    for years in (-10, 0, 10):  # expired, valid, not yet valid
        verify_ignoring_validity(_der(fleet, years=years), ca, "broker.example")
        verify_ignoring_validity(_der(fleet, years=years), ca, "127.0.0.1")


@pytest.mark.parametrize("case", ["rogue-ca", "other-host", "other-ip", "client-cert"])
def test_everything_but_the_window_is_still_checked(case: str) -> None:
    fleet = Issuer.new("fleet CA")
    rogue = Issuer.new("fleet CA")  # same name: only the signature tells them apart
    ca = cert_to_pem(fleet.cert)
    der = {
        "rogue-ca": _der(rogue),
        "other-host": _der(fleet, hosts=("evil.example",)),
        "other-ip": _der(fleet, hosts=("10.0.0.1",)),
        "client-cert": fleet.issue("gd-000000000001", generate_key("ed25519").public_key(), NOW, NOW).public_bytes(
            Encoding.DER
        ),
    }[case]
    host = "127.0.0.1" if case == "other-ip" else "broker.example"
    with pytest.raises(ssl.SSLCertVerificationError):
        verify_ignoring_validity(der, ca, host)
