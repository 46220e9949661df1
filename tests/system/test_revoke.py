"""`glucoagent-backend revoke DEVICE`: CRL, broker reload and disconnection at once (issue 12).

Before it existed a revoked box stayed connected until it happened to reconnect, and nothing
but a restart of the broker loaded a new CRL.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.wire import topics
from backend import cli
from backend.broker import Broker
from backend.home import BackendHome
from backend.pki import ClientCreds, generate_key, make_csr
from backend.provisioning import new_token

ADMINISTRATIVE_ACTION = 0x98
Probe = Any  # conftest.MqttProbe
ProbeFactory = Callable[..., Probe]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[BackendHome, Broker]]:
    h = BackendHome(tmp_path / "home")
    h.ensure()
    with h.broker() as broker:
        yield h, broker


def _enrol(home: BackendHome, broker: Broker) -> tuple[str, ClientCreds]:
    """A box enrolled through the service's provisioning handler, as over the claim path."""
    db = home.db()
    token = new_token()
    db.add_token(token, "patient-1", 3600)
    service = home.service("localhost", broker.port, db)
    key = generate_key("ed25519")
    request_id = secrets.token_hex(12)
    request = {"req": request_id, "token": token, "patient": "patient-1", "csr": make_csr(key), "hw": {}}
    reply = service.provision(request_id, cbor2.dumps(request))
    db.close()
    assert reply["ok"], reply
    return reply["device_id"], home.pki.write_device_creds(reply["device_id"], key, reply["cert"])


def test_revoke_disconnects_the_device_at_once_and_refuses_it_after(
    home: tuple[BackendHome, Broker], mqtt_probe: ProbeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    h, broker = home
    dev_id, creds = _enrol(h, broker)
    other_id, other_creds = _enrol(h, broker)
    device = mqtt_probe(creds, client_id=dev_id, broker=broker)
    assert device.connect()
    side = mqtt_probe(creds, client_id=f"{dev_id}-check", broker=broker)  # every connection of the box goes
    assert side.connect()
    other = mqtt_probe(other_creds, client_id=other_id, broker=broker)
    assert other.connect()

    started = time.monotonic()
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(cli.main(["revoke", dev_id, "--home", str(h.root), "--port", str(broker.port)]))
    )
    runner.start()
    with device._cond:
        gone_in_time = device._cond.wait_for(lambda: device.disconnected is not None, 30)
    elapsed = time.monotonic() - started
    runner.join(30)
    with capsys.disabled():  # the figure docs/security.md quotes (a measurement, not an assertion)
        print(f"\nrevoke -> device disconnected after {elapsed * 1000:.0f} ms (CLI in-process, CRL write included)")
    assert result == [0]
    assert gone_in_time
    assert device.disconnected is not None and device.disconnected.value == ADMINISTRATIVE_ACTION
    with side._cond:
        assert side._cond.wait_for(lambda: side.disconnected is not None, 10)
    assert "closed every connection of" in capsys.readouterr().out

    assert mqtt_probe(creds, client_id=dev_id, broker=broker).connect() is False  # the reloaded CRL refuses it
    assert other.disconnected is None  # nobody else was touched
    assert not other.publish(topics.DeviceTopics(other_id).telemetry, b"still here").is_failure
    again = mqtt_probe(other_creds, client_id=f"{other_id}-check", broker=broker)
    assert again.connect()


def test_revoke_of_an_unknown_device_is_one_clear_error(
    home: tuple[BackendHome, Broker], capsys: pytest.CaptureFixture[str]
) -> None:
    h, broker = home
    code = cli.main(["revoke", "gd-000000000000", "--home", str(h.root), "--port", str(broker.port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 80
    assert err == ["glucoagent-backend: error: no certificate was issued to a device 'gd-000000000000' by this backend"]


def test_revoke_without_a_running_broker_takes_effect_at_its_start(
    tmp_path: Path, mqtt_probe: ProbeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    h = BackendHome(tmp_path / "home")
    h.ensure()
    broker = h.broker()
    broker.start()
    dev_id, creds = _enrol(h, broker)
    broker.stop()
    assert cli.main(["revoke", dev_id, "--home", str(h.root)]) == 0
    assert "refuses" in capsys.readouterr().out
    broker.start()
    try:
        assert mqtt_probe(creds, client_id=dev_id, broker=broker).connect() is False
    finally:
        broker.stop()
