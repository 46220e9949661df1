"""`glucoagent-backend serve --workers 3` against the real broker: ingest processes on an MQTT 5 shared
subscription, de-duplication exact across them, and a worker SIGKILLed mid-stream.

The boxes are provisioned through `serve`'s control connection with `glucoagent provision`; their
batches are then signed with each box's own key and published over its own certificate by a fast
in-test publisher that never resends, so every record that ends up stored and acknowledged got
there through the broker and the workers alone.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from support import MqttProbe
from support.lifecycle import BACKEND, device_id_of, device_probe

from agent.clock import Clock
from agent.identity.credentials import DeviceIdentity, load_identity
from agent.wire import cose, telemetry, topics
from backend.workers import worker_client_id
from testbed.harness import LocalSystem, spawn, stop_process

WORKERS = 3
BOXES = 3
BATCH = 20
WAIT_S = 90.0


class Box:
    """A provisioned box's identity, its own MQTT connection and every verified ack it received."""

    def __init__(self, system: LocalSystem, state: Path) -> None:
        self.ident: DeviceIdentity = load_identity(state)
        self.topics = topics.DeviceTopics(self.ident.device_id)
        self.probe: MqttProbe = device_probe(system, state)
        self.probe.subscribe(self.topics.acks)
        self.acked: set[int] = set()
        self.acks = 0
        self.clock = Clock()

    def batch(self, seqs: range) -> bytes:
        items = []
        for seq in seqs:
            header = telemetry.Header(self.ident.device_id, seq, telemetry.Kind.READING, self.clock.now())
            entries = [{telemetry.N: "glu", telemetry.U: "mg/dL", telemetry.V: 80 + seq % 90}]
            payload = telemetry.encode(header, entries)
            items.append(
                cose.sign1(
                    self.ident.key, payload, kid=self.ident.kid, content_type=telemetry.SENML_CBOR_CONTENT_FORMAT
                )
            )
        return cbor2.dumps(items)

    def send(self, payload: bytes) -> None:
        """Queue a QoS 1 publish without waiting (paho's own thread sends it)."""
        self.probe.client.publish(self.topics.telemetry, payload, qos=1)

    def collect(self) -> None:
        """Every ack received so far: verified with the command key, addressed to this box."""
        while not self.probe.messages.empty():
            msg = self.probe.messages.get_nowait()
            body: Any = cbor2.loads(cose.verify1(msg.payload, lambda _kid: self.ident.command_key).payload)
            assert body["dev"] == self.ident.device_id
            self.acked.update(body.get("c", []))
            self.acks += 1


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    # log_type all: the broker logs every PUBLISH it sends, with its DUP flag and the receiving client id
    s = LocalSystem(tmp_path_factory.mktemp("workers"), broker_conf=["log_type all"])
    s.broker.start()
    serve = spawn(
        [BACKEND, "serve", "--home", str(s.home.root), "--host", "localhost", "--port", str(s.broker.port),
         "--workers", str(WORKERS), "--crl-check-interval", "3600"],
        s.run / "serve.log",
    )  # fmt: skip
    s.procs.append(serve)
    try:
        for slot in range(1, WORKERS + 1):
            subscribed = f"{worker_client_id(slot)} 1 $share/ingest/{topics.ALL_TELEMETRY}"
            assert s.wait_for(lambda line=subscribed: line in s.broker.log_text(), 30), (
                f"worker {slot} did not subscribe:\n{(s.run / 'serve.log').read_text()}"
            )
        yield s
    finally:
        for proc in s.procs:
            stop_process(proc)
        s.broker.stop()
        s.db.close()


@pytest.fixture(scope="module")
def boxes(system: LocalSystem) -> Iterator[list[Box]]:
    made = []
    for i in range(BOXES):
        state = system.device_dir(f"box{i}")
        device_id_of(system.provision(state, patient=f"patient-w{i}"))
        made.append(Box(system, state))
    yield made
    for box in made:
        box.probe.close()


def worker_pid(system: LocalSystem, slot: int) -> int:
    """The pid of `ingest-worker --slot N` of this system's `serve` (its own home)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "ingest-worker" in argv and str(system.home.root) in argv and argv[argv.index("--slot") + 1] == str(slot):
            return int(entry.name)
    raise AssertionError(f"no ingest worker {slot} running")


def deliveries(system: LocalSystem, topic: str) -> list[tuple[str, int]]:
    """(client id, DUP flag) of every PUBLISH the broker sent on ``topic``, from its log."""
    pattern = re.compile(rf"Sending PUBLISH to (\S+) \(d(\d), q1, r0, m\d+, '{re.escape(topic)}'")
    return [(m[1], int(m[2])) for m in pattern.finditer(system.broker.log_text())]


def wait_stored_and_acked(system: LocalSystem, boxes: list[Box], expected: dict[str, set[int]]) -> None:
    def done() -> bool:
        for box in boxes:
            box.collect()
        return all(
            box.acked >= expected[box.ident.device_id]
            and len(system.db.records(box.ident.device_id)) >= len(expected[box.ident.device_id])
            for box in boxes
        )

    assert system.wait_for(done, WAIT_S, poll=0.3), {
        b.ident.device_id: (len(b.acked), len(system.db.records(b.ident.device_id))) for b in boxes
    }


def assert_exactly_once(system: LocalSystem, boxes: list[Box], expected: dict[str, set[int]]) -> None:
    for box in boxes:
        seqs = [r.seq for r in system.db.records(box.ident.device_id)]
        assert sorted(seqs) == sorted(expected[box.ident.device_id]), "stored once each, none missing"


def test_the_same_batches_twice_through_different_workers_are_stored_once_and_acked(
    system: LocalSystem, boxes: list[Box]
) -> None:
    dups_before = system.db.counter("duplicates")
    expected: dict[str, set[int]] = {}
    for box in boxes:  # two batches per box, each published twice, back to back
        first, second = box.batch(range(1, BATCH + 1)), box.batch(range(BATCH + 1, 2 * BATCH + 1))
        for payload in (first, second, first, second):
            # one at a time (PUBACK is the broker's receipt, not the workers'): the broker deals them in
            # this order, round robin, so a batch's two copies go to two of the three workers, which
            # handle them (and the box's other batch) concurrently
            box.probe.publish(box.topics.telemetry, payload)
        expected[box.ident.device_id] = set(range(1, 2 * BATCH + 1))
    wait_stored_and_acked(system, boxes, expected)
    assert_exactly_once(system, boxes, expected)
    assert system.wait_for(lambda: system.db.counter("duplicates") - dups_before == BOXES * 2 * BATCH, 10)
    for box in boxes:
        assert system.wait_for(lambda box=box: (box.collect(), box.acks)[1] >= 4, 10), "an ack for each copy"
        got = deliveries(system, box.topics.telemetry)
        assert len(got) == 4
        # mosquitto deals a share group round robin: the copies of one batch went to two workers
        assert got[0][0] != got[2][0] and got[1][0] != got[3][0], got
        assert {cid for cid, _ in got} <= {worker_client_id(k) for k in range(1, WORKERS + 1)}


def test_a_worker_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    system: LocalSystem, boxes: list[Box]
) -> None:
    victim = worker_client_id(2)
    pid = worker_pid(system, 2)
    base = 1000
    batches = 60
    payloads = {box.ident.device_id: [box.batch(range(base + i * BATCH, base + (i + 1) * BATCH)) for i in range(batches)]
                for box in boxes}  # fmt: skip
    expected = {
        box.ident.device_id: set(range(1, 2 * BATCH + 1)) | set(range(base, base + batches * BATCH)) for box in boxes
    }
    for i in range(batches):
        for box in boxes:
            box.send(payloads[box.ident.device_id][i])
        # Stopped first, killed a few batches later: the broker has dealt it batches it never acked (a
        # plain kill could land, on a busy machine, when the worker had caught up with everything)
        if i == batches // 3:
            os.kill(pid, signal.SIGSTOP)
        if i == batches // 3 + 3:
            os.kill(pid, signal.SIGKILL)  # with batches in flight to it: the stream goes on
    wait_stored_and_acked(system, boxes, expected)
    assert_exactly_once(system, boxes, expected)
    # the supervisor restarted the worker under its client id, and the broker redelivered to it
    assert worker_pid(system, 2) != pid
    assert f"ingest worker 2 (pid {pid}) exited with -9: restarting it" in (system.run / "serve.log").read_text()
    redelivered = [
        dup for box in boxes for cid, dup in deliveries(system, box.topics.telemetry) if cid == victim and dup
    ]
    assert redelivered, "the killed worker had messages in flight, redelivered (DUP) when it came back"
    stats = {
        cid: sum(1 for box in boxes for c, _ in deliveries(system, box.topics.telemetry) if c == cid)
        for cid in (worker_client_id(k) for k in range(1, WORKERS + 1))
    }
    assert all(stats.values()), f"every worker took a share: {stats}"


def test_what_mosquitto_does_with_a_dead_shared_subscribers_messages(system: LocalSystem) -> None:
    """The broker fact the design rests on (backend/workers.py): messages in flight to a shared subscriber
    that dies are not given to the other members; a kept session gets them back under the same client id."""
    topic, share = f"{topics.PREFIX}/test/share", f"$share/probe/{topics.PREFIX}/test/share"
    creds = system.home.pki.backend

    def member(client_id: str, *, kept: bool) -> MqttProbe:
        probe = MqttProbe(creds, system.broker.host, system.broker.port, client_id=client_id)
        probe.client.manual_ack_set(True)  # never acks: whatever it receives stays in flight
        assert probe.connect(clean_start=not kept, session_expiry_s=60 if kept else 0)
        probe.subscribe(share)
        return probe

    for kept in (False, True):
        dying, other = member("backend-share-dying", kept=kept), member("backend-share-other", kept=False)
        publisher = MqttProbe(creds, system.broker.host, system.broker.port)
        assert publisher.connect()
        sent = [f"{kept}-{i}".encode() for i in range(10)]
        for payload in sent:
            publisher.publish(topic, payload)
        held = {dying.next_message().payload for _ in range(5)}  # round robin: half each
        dying.client.socket().close()  # the process is gone: no DISCONNECT, nothing acknowledged
        dying.client.loop_stop()
        for payload in sent[:2]:  # the stream goes on
            publisher.publish(topic, payload + b"-after")
        got_other: set[bytes] = set()
        while True:
            try:
                got_other.add(other.next_message(1.0).payload)
            except TimeoutError:
                break
        assert not held & got_other, "mosquitto 2.0 gives nothing in flight to a dead member to the others"
        if kept:
            back = member("backend-share-dying", kept=True)
            redelivered = {back.next_message().payload for _ in range(len(held))}
            assert held <= redelivered | {m.payload for m in iter_nowait(back)}
            back.close()
        for probe in (other, publisher):
            probe.close()


def iter_nowait(probe: MqttProbe) -> Iterator[Any]:
    while not probe.messages.empty():
        yield probe.messages.get_nowait()
