"""Under mqtt.profile azure, against the fake IoT Hub (testbed/clouds/azure_fake.py): every reading once,
verified by the backend's ingest behind the hub's routes; acks cumulative as C2D messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import device_config

PATIENT = "patient-azure-1"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureSystem]:
    with AzureSystem(tmp_path_factory.mktemp("azure")) as s:
        yield s


def status(system: AzureSystem, state: Path, config: Path) -> dict[str, object]:
    out = system.glucoagent(state, "status", "--json", config=config)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_reading_once_through_the_hub(hub: AzureSystem) -> None:
    meter = random_records("onetouch-ultra2", 40, seed=21)
    records = hub.run / "azure-e2e.json"
    records.write_text(dumps(meter))
    link = hub.run / "ttyAZ1"
    hub.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
    state = hub.device_dir("az-device")
    device_id = hub.enrol(state, PATIENT)
    config = device_config(state / "glucoagent.uci", [(str(link), "auto")], mqtt=hub.mqtt_options())
    agent = hub.start_agent(state, config)

    def readings() -> int:
        return len(hub.db.records(device_id=device_id, kind="reading"))

    assert hub.wait_for(lambda: readings() >= 40, timeout=90), (state / "agent.log").read_text()[-3000:]
    assert hub.wait_for(lambda: status(hub, state, config)["buffer_depth"] == 0, timeout=30)
    assert agent.poll() is None
    assert readings() == 40
    clinical = sorted(r.seq for r in hub.db.records(device_id=device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))
    got = {(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in hub.db.records(device_id=device_id, kind="reading")}
    assert got == {(m.meter_time.isoformat(), m.value_mgdl) for m in meter}
    assert hub.responder.closed == []  # the agent kept every rule of the hub
    assert hub.responder.routed > 0 and hub.responder.c2d_sent > 0
    log = (state / "agent.log").read_text()
    assert f"connected to mqtts://localhost:{hub.broker.port} as {device_id}" in log


def test_check_stops_after_tls_on_a_one_connection_cloud(hub: AzureSystem) -> None:
    """`glucoagent check` must not log in beside the agent: IoT Hub would drop the agent's connection."""
    state = hub.run / "az-device"
    config = state / "glucoagent.uci"
    out = hub.glucoagent(state, "check", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TLS handshake" in out.stdout
    assert "not tried over mqtts://" in out.stdout and "one connection per device" in out.stdout
    assert status(hub, state, config)["connected"] is True  # the agent's link was left alone


def test_websockets_on_443_path(tmp_path: Path) -> None:
    """MQTT over WebSockets with IoT Hub's path, through the same routes (agent/link/routes.py)."""
    with AzureSystem(tmp_path / "ws", websockets=True) as hub:
        meter = random_records("onetouch-ultra2", 5, seed=23)
        (tmp_path / "m.json").write_text(dumps(meter))
        link = tmp_path / "ttyWS"
        hub.start_simulator("onetouch-ultra2", link, tmp_path / "m.json", "--baud", "0")
        state = hub.device_dir("ws-box")
        device_id = hub.enrol(state)
        ws = f"wss://localhost:{hub.broker.ws_port}/$iothub/websocket"
        config = device_config(
            state / "glucoagent.uci", [(str(link), "auto")],
            mqtt=hub.mqtt_options(transport="websockets", ws_endpoint=ws),
        )  # fmt: skip
        hub.start_agent(state, config)
        assert hub.wait_for(lambda: len(hub.db.records(device_id=device_id, kind="reading")) == 5, 60), (
            (state / "agent.log").read_text()[-2000:]
        )
        assert f"connected to {ws} as {device_id}" in (state / "agent.log").read_text()
