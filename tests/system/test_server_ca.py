"""``mqtt.server_ca``: the broker's trust anchor is a file the box is given (the cloud's public root behind Azure
or AWS; by default the fleet CA delivered at enrolment), never fetched. Against the fake hub (whose broker
certificate our fleet CA signs): the wrong root is refused with the existing TLS error and exit code, by
`glucoagent check` and by the agent, which never logs in; the right root under another name is taken; a missing
file is one clear error."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import device_config


def foreign_root(path: Path) -> Path:
    """A CA that did not sign the broker (as a cloud's root is not our fleet CA, or the other way round)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other Root G2")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def config(hub: AzureSystem, state: Path, server_ca: str) -> Path:
    return device_config(
        state / "glucoagent.uci", [], agent={"health_interval_s": "3600"},
        mqtt=hub.mqtt_options(server_ca=server_ca, backoff_min_s="0.1", backoff_cap_s="1"),
    )  # fmt: skip


def test_the_broker_is_verified_with_the_configured_root_only(tmp_path: Path) -> None:
    with AzureSystem(tmp_path / "hub") as hub:
        state = hub.device_dir("anchor-box")
        hub.enrol(state)

        wrong = foreign_root(state / "anchors" / "other-root.pem")
        cfg = config(hub, state, str(wrong))
        out = hub.glucoagent(state, "check", config=cfg)
        assert out.returncode == 43, out.stdout + out.stderr
        assert "TLS: the broker at localhost:" in out.stdout and "is not signed by the pinned fleet CA" in out.stdout

        agent = hub.start_agent(state, cfg)
        log = state / "agent.log"
        assert hub.wait_for(lambda: log.exists() and "is not signed by the pinned fleet CA" in log.read_text(), 30)
        time.sleep(1)
        assert "uplink: connected to" not in log.read_text()
        agent.terminate()
        agent.wait(15)
        hub.procs.remove(agent)

        # The right root, delivered under its own name (relative to the state directory): taken.
        shutil.copy(state / "ca.crt", state / "anchors" / "hub-root.pem")
        cfg = config(hub, state, "anchors/hub-root.pem")
        out = hub.glucoagent(state, "check", config=cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        mark = log.read_text().count("uplink: connected to")
        agent = hub.start_agent(state, cfg)
        assert hub.wait_for(lambda: log.read_text().count("uplink: connected to") > mark, 30), log.read_text()[-2000:]

        # A root that is not there: one clear error, no system CAs as a fallback.
        cfg = config(hub, state, "anchors/missing.pem")
        out = hub.glucoagent(state, "check", config=cfg)
        assert out.returncode == 43, out.stdout + out.stderr
        assert "cannot load the broker's trust anchor" in out.stdout
        assert isinstance(out, subprocess.CompletedProcess)
