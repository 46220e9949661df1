"""Issue 5 figures: draining a 10 000-reading backlog through local mosquitto, and start-up to first publish.

Ours: a provisioned box whose buffer already holds 10 000 signed readings (filled
directly with ``Store`` + ``Recorder``, no meter), then ``glucoagent run`` with the
default upload settings; rows leave the buffer only on the backend's signed
end-to-end ack. Timed from the first upload the backend receives until it holds
all 10 000. The same drain with ``mqtt.ack = puback`` shows the agent's own
speed: there rows leave on the broker's PUBACK, so the span from the first to the
last upload seen by a subscriber does not wait for the reference backend (one
Python thread that verifies every signature, de-duplicates, stores, signs acks).

Baseline, same run, same broker, same TLS: a plain paho process publishing the
very same batch payloads (the bytes the agent sent) at QoS 1 with paho's default
in-flight window, timed from its first publish to its last PUBACK; nobody
subscribes, so it is the transport's ceiling.

Start-up: from spawning the process to its first upload arriving at a
subscriber, for ``glucoagent run`` and for the plain paho process.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

from agent.buffer.intake import Recorder
from agent.buffer.store import Store
from agent.clock import Clock
from agent.config import AlertsSection
from agent.identity.credentials import load_identity
from agent.identity.signer import Signer
from agent.wire.batch import encode_batch
from agent.wire.topics import DeviceTopics
from backend.mqtt_client import tls_client
from bench.bench_store import in_range
from bench.table import Row
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config, stop_process

BACKLOG = 10_000
BATCH = 50  # mqtt.batch_records default: the baseline publishes the agent's batches
BASELINE_TOPIC = "gluco/v1/bench/baseline"  # the backend identity may write it; nobody reads it
TIMEOUT_S = 300.0

# A plain paho QoS 1 publisher: argv = host port ca cert key payload-file; prints its own timings.
BASELINE = r"""
import ssl, sys, time
t_spawned = time.time()
import cbor2
import paho.mqtt.client as mqtt
import paho.mqtt.client as mqtt
host, port, ca, cert, key, payloads_file, topic = sys.argv[1:8]
payloads = cbor2.loads(open(payloads_file, "rb").read())
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="backend-bench-baseline", protocol=mqtt.MQTTv5)
c.tls_set_context(ctx)
c.connect(host, int(port), keepalive=30)
c.loop_start()
t0 = time.perf_counter()
infos = [c.publish(topic, p, qos=1) for p in payloads]
for i in infos:
    i.wait_for_publish(60)
elapsed = time.perf_counter() - t0
assert all(i.is_published() for i in infos)
c.disconnect()
c.loop_stop()
print(elapsed)
"""


def _fill(state: Path) -> list[bytes]:
    """10 000 in-range readings (no alerts) signed into the box's buffer; returns the agent's batch payloads."""
    ident = load_identity(state)
    store = Store(state / "buffer.db", max_records=BACKLOG * 2)
    try:
        recorder = Recorder(store, Signer(ident.device_id, ident.key, ident.kid, Clock()), AlertsSection())
        readings = in_range(random_records("onetouch-ultra2", BACKLOG, seed=5))
        seqs = recorder.accept_readings("onetouch-ultra2:bench", readings, complete=True)
        assert len(seqs) == BACKLOG, len(seqs)
        rows = store.pending(BACKLOG)
    finally:
        store.close()
    return [encode_batch([r.cose for r in rows[i : i + BATCH]]) for i in range(0, len(rows), BATCH)]


class _Arrivals:
    """Backend-side clock: first upload seen by a subscriber, and the moment the backend holds all readings."""

    def __init__(self, system: LocalSystem, topics: list[str]) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.stored = 0
        self.all_stored = threading.Event()
        self.last_stored_at = 0.0
        system.on_record = self._on_record
        self.client = tls_client(system.home.pki.backend, "backend-bench-tap")
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(system.broker.host, system.broker.port)
        self.client.loop_start()
        self.client.subscribe([(t, 0) for t in topics])
        if not ready.wait(10):
            raise RuntimeError("bench tap: no SUBACK")

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        self.first.setdefault(msg.topic, now)
        self.last[msg.topic] = now

    def _on_record(self, _device: str, _rec: object) -> None:
        self.stored += 1
        if self.stored >= BACKLOG:
            self.last_stored_at = time.time()
            self.all_stored.set()

    def reset(self) -> None:
        self.first.clear()
        self.last.clear()
        self.stored = 0
        self.all_stored.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _drain(system: LocalSystem, tap: _Arrivals, name: str, ack: str) -> tuple[float, float, float]:
    """A fresh box each time: readings/s from the first upload until the backend holds all, readings/s from
    the first to the last upload a subscriber saw, seconds from spawning the agent to its first upload."""
    state = system.device_dir(name)
    prov = system.provision(state, patient=f"bench-{name}")
    if prov.returncode:
        raise RuntimeError(f"provisioning failed: {prov.stdout}{prov.stderr}")
    payloads = _fill(state)
    topic = DeviceTopics(load_identity(state).device_id).telemetry
    config = device_config(
        state / "glucoagent.uci", [], agent={"health_interval_s": "3600", "log_level": "warning"}, mqtt={"ack": ack}
    )
    tap.reset()
    spawned = time.time()
    agent = system.start_agent(state, config)
    try:
        if not tap.all_stored.wait(TIMEOUT_S):
            raise RuntimeError(f"backend holds {tap.stored} of {BACKLOG} after {TIMEOUT_S:g}s")
    finally:
        stop_process(agent)
        system.procs.remove(agent)
    first = tap.first[topic]
    if name == "e2e":
        (system.run / "payloads.cbor").write_bytes(cbor2.dumps(payloads))
    return BACKLOG / (tap.last_stored_at - first), BACKLOG / (tap.last[topic] - first), first - spawned


def _baseline(system: LocalSystem, tap: _Arrivals) -> tuple[float, float]:
    creds = system.home.pki.backend
    tap.reset()
    spawned = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            BASELINE,
            system.broker.host,
            str(system.broker.port),
            str(creds.ca),
            str(creds.cert),
            str(creds.key),
            str(system.run / "payloads.cbor"),
            BASELINE_TOPIC,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    return BACKLOG / float(out.stdout.strip()), tap.first[BASELINE_TOPIC] - spawned


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp, LocalSystem(Path(tmp) / "system") as system:
        tap = _Arrivals(system, ["gluco/v1/dev/+/telemetry", BASELINE_TOPIC])
        try:
            e2e_rate, _, e2e_start = _drain(system, tap, "e2e", "backend")
            _, puback_rate, _ = _drain(system, tap, "puback", "puback")
            base_rate, base_start = _baseline(system, tap)
        finally:
            tap.close()
    return [
        Row(
            "uplink: 10k backlog drained, end-to-end acks (readings/s)",
            e2e_rate,
            base_rate,
            "report",
            None,
            "plain paho QoS 1",
            "bound by the reference backend's ingest: see the ingest rows (bench_ingest) for its goal",
        ),
        Row(
            "uplink: 10k backlog drained, mqtt.ack=puback (readings/s)",
            puback_rate,
            base_rate,
            "report",
            None,
            "plain paho QoS 1",
            "first to last upload at a subscriber: the agent without the reference backend in the loop",
        ),
        Row(
            "uplink: process start to first upload received (s)",
            e2e_start,
            base_start,
            "report",
            None,
            "plain paho process",
            "glucoagent run (loads config, identity, buffer) vs python + paho connect",
        ),
    ]


if __name__ == "__main__":
    from bench.run import table

    print(table(run()))
