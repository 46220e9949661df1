"""The agent honours the broker's Maximum Packet Size (issue 12), on a real mosquitto with
``max_packet_size``, mutual TLS and the reference backend.

mosquitto disconnects a client that sends a bigger packet ("disconnected due to oversize packet")
and paho 2.x ignores the size the broker declares in CONNACK; it resends the same message after the
reconnect, so an upload batch that does not fit used to loop for ever. What must hold:

- the PUBLISH size the agent computes is the broker's: a payload of exactly ``max_payload(topic)``
  is taken, one byte more is refused by our guard, and a few bytes more sent behind its back get us
  disconnected;
- with the default batch (50 records) far above the limit, every reading arrives once over one
  connection (connects counted in the agent's and the broker's log);
- a record no message may carry stays in the buffer, is reported (log, health counter, condition and
  alert) and does not hold back the others; it is delivered once the broker allows larger packets.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import fill_buffer

from agent.buffer.intake import Recorder
from agent.buffer.store import CLINICAL, Store
from agent.clock import Clock
from agent.config import Config, with_state_dir
from agent.identity.credentials import load_identity
from agent.identity.signer import Signer
from agent.link.mqtt import LinkSettings, MqttLink, PacketTooLarge, TlsFiles, publish_packet_size
from agent.link.uplink import TOO_LARGE, Uplink
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config

MAX_PACKET = 4096  # a reading is ~300 bytes: the default batch of 50 is ~4x this
OVERSIZE_LINE = "oversize packet"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("maxpacket"), broker_conf=[f"max_packet_size {MAX_PACKET}"]) as s:
        yield s


def test_the_computed_limit_is_the_brokers(system: LocalSystem) -> None:
    creds = system.home.pki.backend
    settings = LinkSettings(
        host="localhost", port=system.broker.port, client_id="backend-size-probe", tls=TlsFiles(creds.ca, creds.cert, creds.key)
    )
    topic = "gluco/v1/test/size"
    link = MqttLink(settings)
    link.connect()
    try:
        assert link.max_packet_size == MAX_PACKET  # declared in CONNACK
        most = link.max_payload(topic)
        assert most is not None and publish_packet_size(topic, most) == MAX_PACKET
        mid = link.publish(topic, b"x" * most)
        assert _acked(link, mid), "the broker refused a packet of exactly its maximum size"
        with pytest.raises(PacketTooLarge, match="maximum packet size"):
            link.publish(topic, b"x" * (most + 1))
        assert link.connected  # refused here, nothing sent
        # Behind the guard's back the broker hangs up. mosquitto 2.0.11 leaves the Remaining Length's own
        # bytes (2 here) out of its count, so it tolerates 2 bytes over; the spec (and we) count the whole packet.
        link.client.publish(topic, b"x" * (most + 3), qos=1)
        deadline = time.monotonic() + 10
        while link.loop(0.1) and time.monotonic() < deadline:
            pass
        assert not link.connected
    finally:
        link.close()
    assert system.wait_for(
        lambda: "size-probe" in system.broker.log_text() and OVERSIZE_LINE in system.broker.log_text(), 10
    )


def _acked(link: MqttLink, mid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not link.loop(0.1):
            return False
        ok = link.acked(mid)
        if ok is not None:
            return ok
    return False


def test_default_batches_that_do_not_fit_are_cut_to_the_brokers_size(system: LocalSystem) -> None:
    count = 120
    meter = random_records("onetouch-ultra2", count, seed=12)
    records = system.run / "ultra2-maxpacket.json"
    records.write_text(dumps(meter))
    link = system.run / "ttyMAXPKT"
    system.start_simulator("onetouch-ultra2", link, records)
    state = system.device_dir("maxpacket-device")
    prov = system.provision(state, "patient-maxpacket")
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    config = device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")])
    mark = len(system.broker.log_text())  # provisioning's own login is before this
    agent = system.start_agent(state, config)
    log = state / "agent.log"

    def readings() -> int:
        return len(system.db.records(device_id=device_id, kind="reading"))

    assert system.wait_for(lambda: readings() >= count, timeout=90), log.read_text()[-3000:]
    time.sleep(2)  # anything doubled or a reconnect would show by now
    assert agent.poll() is None
    stored = system.db.records(device_id=device_id, kind="reading")
    assert len(stored) == count
    assert {r.fields["glu:meter_time"] for r in stored} == {m.meter_time.isoformat() for m in meter}
    clinical = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == CLINICAL)
    assert clinical == list(range(1, len(clinical) + 1))  # readings and alerts, each once
    text = log.read_text()
    assert text.count("uplink: connected to") == 1, text[-3000:]
    assert "link lost" not in text
    broker_log = system.broker.log_text()[mark:]
    assert broker_log.count(f"as {device_id} ") == 1, broker_log  # one "New client connected ... as <id>"
    assert f"{device_id} disconnected" not in broker_log
    assert not any(OVERSIZE_LINE in line and device_id in line for line in broker_log.splitlines())


def test_a_record_too_large_for_any_message_is_kept_reported_and_does_not_block(tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "run", broker_conf=[f"max_packet_size {MAX_PACKET}"]) as system:
        state = system.device_dir("big-device")
        prov = system.provision(state, "patient-big")
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
        before = fill_buffer(state, 30, seed=1)
        ident = load_identity(state)
        store = Store(state / "buffer.db")
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), Config().alerts)
        recorder.alert("diagnostic", "x" * (2 * MAX_PACKET))  # a real signed record that no message may carry
        (big,) = [r for r in store.pending(10_000) if len(r.cose) > MAX_PACKET]
        store.close()
        after = fill_buffer(state, 30, seed=2)
        assert before[-1] < big.seq < after[0]  # in the middle of the backlog
        cfg = with_state_dir(Config(), state)
        cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, backoff_min_s=0.2, backoff_cap_s=1.0))

        def delivered(kind: str) -> list[int]:
            return sorted(r.seq for r in system.db.records(device_id=device_id, kind=kind))

        store = Store(state / "buffer.db")
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), cfg.alerts)
        try:
            uplink = Uplink(cfg, ident, store, raise_condition=recorder.raise_condition)
            with _running(uplink):
                assert system.wait_for(lambda: len(delivered("reading")) == 60, timeout=60)
                assert system.wait_for(lambda: uplink.counters.too_large == 1, timeout=10)
                # the others went on; the big one stays in the buffer, reported, over one connection
                assert store.stats().pending_clinical >= 1
                assert big.id in {r.id for r in store.pending(10_000)}
                assert TOO_LARGE in store.conditions()
                assert system.wait_for(
                    lambda: any(r.fields.get("alert") == TOO_LARGE for r in system.db.records(device_id=device_id)),
                    timeout=20,
                )
                assert uplink.counters.reconnects == 1
                assert big.seq not in delivered("alert")
            # The broker's limit is raised: the record that waited is delivered, once, and the condition ends.
            system.broker.stop()
            system.broker.extra_conf = (f"max_packet_size {4 * MAX_PACKET}",)
            system.broker.start()
            uplink = Uplink(cfg, ident, store, raise_condition=recorder.raise_condition)
            with _running(uplink):
                assert system.wait_for(lambda: big.seq in delivered("alert"), timeout=60)
                assert system.wait_for(lambda: TOO_LARGE not in store.conditions(), timeout=10)
                assert system.wait_for(lambda: store.stats().pending_clinical == 0, timeout=20)
                assert uplink.counters.too_large == 0
        finally:
            store.close()
        clinical = [r.seq for r in system.db.records(device_id=device_id) if r.stream == CLINICAL]
        assert sorted(clinical) == list(range(1, len(clinical) + 1))  # nothing lost, nothing twice


class _running:
    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self.thread = threading.Thread(target=uplink.run, name="uplink-test", daemon=True)

    def __enter__(self) -> Uplink:
        self.thread.start()
        return self.uplink

    def __exit__(self, *_: object) -> None:
        self.uplink.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
