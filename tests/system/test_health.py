"""Health telemetry: signed samples on the device's own health topic, at the configured interval.

The box starts offline (the proxy refuses it) with a meter attached, so its first
sample is taken with readings waiting; then the link comes up and the next
sample shows them uploaded. Samples are watched on the wire by a second backend
client and checked in the backend's store.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from support import TcpProxy

from agent.clock import ClockQuality
from agent.wire import cose, telemetry, topics
from agent.wire.clocksync import anchor_of
from backend.db import StoredRecord
from backend.mqtt_client import tls_client
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

INTERVAL_S = 10  # the smallest agent.health_interval_s the configuration accepts
READINGS = 10
FIELDS = {
    "uptime_s",
    "agent_version",
    "buffer_depth",
    "oldest_unsent_age_s",
    "uploaded",
    "acked",
    "reconnects",
    "connect_failures",
    "too_large_records",
    "serial_errors",
    "free_storage_bytes",
    "rss_kib",
    "clock",
}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("health")) as s:
        yield s


class Tap:
    """A second backend client that records every message on the given topics."""

    def __init__(self, system: LocalSystem, *filters: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = tls_client(system.home.pki.backend, "backend-health-tap")
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        subscribed = queue.Queue[object]()
        self.client.on_subscribe = lambda *_a: subscribed.put(True)
        self.client.connect(system.broker.host, system.broker.port)
        self.client.loop_start()
        rc, _mid = self.client.subscribe([(f, 1) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        subscribed.get(timeout=10)

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_health_samples_on_their_own_topic_at_the_interval(system: LocalSystem, tmp_path: Path) -> None:
    state = system.device_dir("health-box")
    prov = system.provision(state)
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.split()[-1]
    dev = topics.DeviceTopics(device_id)
    records = tmp_path / "meter.json"
    records.write_text(dumps(random_records("onetouch-ultra2", READINGS, seed=3)))
    link = tmp_path / "ttyHEALTH"
    system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
    tap = Tap(system, dev.health, dev.telemetry)
    with TcpProxy(system.broker.port) as proxy:
        proxy.refuse()  # offline from the start: readings pile up, health samples are buffered too
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            agent={"health_interval_s": str(INTERVAL_S)},
            mqtt={"endpoint": proxy.endpoint, "backoff_min_s": "0.5", "backoff_cap_s": "2", "keepalive": "5"},
        )
        agent = system.start_agent(state, config)

        def snapshot() -> dict[str, int]:
            try:
                return dict(json.loads((state / "run" / "status.json").read_text()))
            except (OSError, ValueError):
                return {}

        # The first sample is taken offline, with the meter's readings waiting in the buffer.
        assert system.wait_for(
            lambda: snapshot().get("buffer_health_samples", 0) >= 1 and snapshot().get("buffer_depth", 0) >= READINGS,
            INTERVAL_S,
        ), (state / "agent.log").read_text()[-2000:]
        proxy.forward()

        def samples() -> list[StoredRecord]:
            """The periodic samples, ordered by seq; a clock anchor (taken when the box learns the cloud's
            signed time, agent/wire/clocksync.py) is an event of its own, not one of them."""
            return [r for r in system.db.records(device_id=device_id, kind="health") if anchor_of(r.fields) is None]

        assert system.wait_for(lambda: len(samples()) >= 2, INTERVAL_S + 10), (state / "agent.log").read_text()[-2000:]
        assert agent.poll() is None
    seen = tap.drain()
    tap.close()

    # On the wire: health only on the health topic, each a CBOR array of COSE_Sign1 by the device key.
    public_key = x509.load_pem_x509_certificate((state / "device.crt").read_bytes()).public_key()
    on_health, on_telemetry = [], []
    for topic, payload in seen:
        for item in cbor2.loads(payload):
            verified = cose.verify1(item, lambda kid: public_key if kid == cose.key_id(public_key) else None)
            rec = telemetry.decode(verified.payload)
            (on_health if topic == dev.health else on_telemetry).append(rec)
    assert len(on_health) >= 2
    assert all(r.kind is telemetry.Kind.HEALTH for r in on_health)
    assert all(r.kind is not telemetry.Kind.HEALTH for r in on_telemetry)
    assert sum(r.kind is telemetry.Kind.READING for r in on_telemetry) >= READINGS

    first, second = ({k.removeprefix("health:"): v for k, v in r.fields.items()} for r in samples()[:2])
    print(f"health samples:\n{first}\n{second}")
    for sample in (first, second):
        assert set(sample) >= FIELDS
        assert sample["serial_errors"] == 0
        assert 0 < sample["free_storage_bytes"] <= shutil.disk_usage(state).total
        assert 1_000 < sample["rss_kib"] < 1_000_000
        assert sample["clock"] in {q.value for q in ClockQuality}
    # Offline: readings waiting, nothing uploaded, failed attempts counted.
    assert first["buffer_depth"] >= READINGS
    assert first["oldest_unsent_age_s"] > 0
    assert first["uploaded"] == first["acked"] == first["reconnects"] == 0
    assert first["connect_failures"] >= 1
    # Online: the backlog went up and was acknowledged.
    assert second["buffer_depth"] == 0
    assert second["oldest_unsent_age_s"] == 0
    assert second["reconnects"] >= 1
    assert second["acked"] >= READINGS
    assert second["uploaded"] >= second["acked"]
    # At the configured interval, by the agent's own clocks.
    assert abs((second["uptime_s"] - first["uptime_s"]) - INTERVAL_S) < 1.5
    walls = sorted(r.wall for r in samples())
    assert abs((walls[1] - walls[0]) - INTERVAL_S) < 1.5
    assert time.time() - walls[0] < 3 * INTERVAL_S
