"""The link faults of tests/system/test_link_faults.py under mqtt.profile azure, against the fake IoT Hub:
a black hole noticed by keepalive, RST and FIN cuts, lost acks (C2D) and flapping; every reading once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import TcpProxy

from agent.link.mqtt import PINGRESP_WAIT
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import device_config, stop_process

KEEPALIVE_S = 5
MQTT = {
    "keepalive": str(KEEPALIVE_S),
    "backoff_min_s": "0.5",
    "backoff_cap_s": "4",
    "stable_s": "6",
    "ack_timeout_s": "5",
    "connect_timeout_s": "3",
    "batch_records": "5",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureSystem]:
    with AzureSystem(tmp_path_factory.mktemp("azure-faults")) as s:
        yield s


class Box:
    def __init__(self, hub: AzureSystem, tmp: Path, n: int, seed: int, latency_s: float) -> None:
        self.hub, self.n = hub, n
        name = f"box-{seed}"
        self.state = hub.device_dir(name)
        self.device_id = hub.enrol(self.state)
        readings = random_records("onetouch-ultra2", n, seed=seed)
        self.meter = sorted((r.meter_time.isoformat(), r.value_mgdl) for r in readings)
        (tmp / f"{name}.json").write_text(dumps(readings))
        link = tmp / f"tty-{name}"
        hub.start_simulator("onetouch-ultra2", link, tmp / f"{name}.json", "--baud", "0")
        self.proxy = TcpProxy(hub.broker.port, latency_s=latency_s).start()
        config = device_config(
            self.state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            mqtt=hub.mqtt_options(**MQTT, endpoint=self.proxy.endpoint),
        )
        self.agent: subprocess.Popen[bytes] = hub.start_agent(self.state, config)

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")

    def connects(self) -> int:
        return self.log().count("uplink: connected to")

    def readings(self) -> int:
        return len(self.hub.db.records(device_id=self.device_id, kind="reading"))

    def wait(self, predicate: object, timeout: float, what: str) -> None:
        assert callable(predicate)
        if not self.hub.wait_for(predicate, timeout, poll=0.05):
            pytest.fail(f"{what}: not within {timeout}s\n--- agent.log ---\n{self.log()[-3000:]}")

    def assert_every_reading_exactly_once(self) -> None:
        stored = self.hub.db.records(device_id=self.device_id, kind="reading")
        assert sorted((r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored) == self.meter
        clinical = [r.seq for r in self.hub.db.records(device_id=self.device_id) if r.stream == "c"]
        assert clinical == list(range(1, len(clinical) + 1))


@pytest.fixture
def box(hub: AzureSystem, tmp_path: Path) -> Iterator[type[Box]]:
    made: list[Box] = []

    class Made(Box):
        def __init__(self, n: int, seed: int, latency_s: float = 0.0) -> None:
            super().__init__(hub, tmp_path, n, seed, latency_s)
            made.append(self)

    yield Made
    for b in made:
        b.proxy.close()
    for proc in list(hub.procs):
        stop_process(proc)
        hub.procs.remove(proc)


def test_black_hole_on_azure_is_noticed_by_keepalive(box: type[Box]) -> None:
    b = box(15, seed=31)
    b.wait(lambda: b.readings() == b.n, 30, "first upload")
    start = time.monotonic()
    b.proxy.black_hole()
    b.wait(lambda: any(t > start for t in b.proxy.client_closed_at), 3 * KEEPALIVE_S, "agent closing the dead link")
    detected = min(t for t in b.proxy.client_closed_at if t > start) - start
    assert detected <= 1.5 * KEEPALIVE_S
    assert f"no PINGRESP within {PINGRESP_WAIT * KEEPALIVE_S:.1f}s: link is dead" in b.log()
    b.proxy.forward()
    b.wait(lambda: b.connects() >= 2, 2 * KEEPALIVE_S + 10, "reconnect")
    b.assert_every_reading_exactly_once()
    assert b.hub.responder.closed == []


def test_rst_fin_lost_acks_and_flapping_on_azure_lose_and_double_nothing(box: type[Box]) -> None:
    b = box(400, seed=32, latency_s=0.05)
    b.wait(lambda: b.readings() >= 10, 30, "upload started")
    at_rst = b.readings()
    b.proxy.cut(rst=True)
    b.wait(lambda: b.connects() >= 2, 10, "reconnect after RST")
    b.proxy.cut(rst=False)
    b.wait(lambda: b.connects() >= 3, 10, "reconnect after FIN")
    duplicates = b.hub.db.counter("duplicates")
    start = time.monotonic()
    b.proxy.drop_replies()  # C2D acks lost on the way: the agent must resend, the backend store once
    at_drop = b.readings()
    b.wait(lambda: any(t > start for t in b.proxy.client_closed_at), 3 * KEEPALIVE_S, "agent giving up the link")
    b.proxy.forward()
    b.wait(lambda: b.connects() >= 4, 2 * KEEPALIVE_S + 10, "reconnect after lost acks")
    cuts = b.proxy.cuts
    b.proxy.flap(1.5)
    b.wait(lambda: b.proxy.cuts >= cuts + 3, 30, "three flaps")
    b.proxy.steady()
    assert at_rst < b.n and at_drop < b.n  # the faults hit the upload in the middle
    b.wait(lambda: b.readings() == b.n, 90, "all readings after the faults")
    time.sleep(2)  # a late duplicate would show now
    b.assert_every_reading_exactly_once()
    assert b.hub.db.counter("duplicates") > duplicates  # records were sent again and stored once
    assert b.agent.poll() is None
    assert b.hub.responder.closed == []
