"""Issue 18 figures: the reference cloud's ingest, per worker and with 1, 2, 4 worker processes.

Per worker (one process, one core, no MQTT): 50-record batches signed by a registered device go
through ``BackendService.ingest`` (COSE verify, SenML decode, patient binding, one BEGIN IMMEDIATE
transaction with ON CONFLICT DO NOTHING, commit with synchronous=FULL) and the signed ack is encoded,
which is all a worker does per batch besides MQTT I/O. Baseline, same run, same core: bare Ed25519
verification (``Ed25519PublicKey.verify``) of the same records' payloads. The same pass is split into
its verify and store phases to show where the time goes; the store phase alone is SQLite's single
writer, the ceiling that more workers cannot pass.

Scaling: ``glucoagent-backend serve --workers N`` (N = 1, 2, 4) against a real mosquitto with TLS;
one publisher (backend identity) sends a pre-signed backlog of 8 devices x 3 000 readings in
50-record batches; timed from the first publish until the database holds every record.
"""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.clock import Clock
from agent.wire import cose, telemetry, topics
from agent.wire.ack import encode_ack
from backend.certs import make_csr
from backend.db import BackendDb
from backend.home import BackendHome
from backend.mqtt_client import BackendLink, link_settings
from bench.table import Row
from testbed.harness import BIN, LocalSystem, spawn, stop_process

BATCH = 50
PER_WORKER_BATCHES = 60  # 3 000 records per timed pass
DEVICES = 8
RECORDS_PER_DEVICE = 3_000
WORKER_COUNTS = (1, 2, 4)
TIMEOUT_S = 300.0


class Device:
    def __init__(self, home: BackendHome, db: BackendDb, n: int) -> None:
        self.device_id = f"gd-bench-{n:04d}"
        key = ed25519.Ed25519PrivateKey.generate()
        cert = home.pki.sign_device_csr(make_csr(key), self.device_id)
        self.key = key
        self.kid = cose.key_id(key.public_key())
        with db.tx() as tx:
            BackendDb.enrol_device(
                tx, token=secrets.token_hex(8), device_id=self.device_id, patient=f"bench-{n}", hw_serial=f"hw-{n}",
                kid=self.kid, cert_pem=cert, now=time.time(),
            )  # fmt: skip
        self.clock = Clock()

    def payloads(self, seqs: range) -> list[bytes]:
        out = []
        for seq in seqs:
            header = telemetry.Header(self.device_id, seq, telemetry.Kind.READING, self.clock.now())
            out.append(
                telemetry.encode(header, [{telemetry.N: "glu", telemetry.U: "mg/dL", telemetry.V: 80 + seq % 90}])
            )
        return out

    def batches(self, seqs: range) -> list[bytes]:
        items = [
            cose.sign1(self.key, p, kid=self.kid, content_type=telemetry.SENML_CBOR_CONTENT_FORMAT)
            for p in self.payloads(seqs)
        ]
        return [cbor2.dumps(items[i : i + BATCH]) for i in range(0, len(items), BATCH)]


def _per_worker(tmp: Path) -> tuple[float, float, float, float, float]:
    """(ingest records/s, bare verify/s, verify-phase records/s, store-phase records/s, ingest records per
    CPU-second)."""
    home = BackendHome(tmp / "one")
    home.ensure()
    db = home.db()
    service = home.service("localhost", 1, db)
    device = Device(home, db, 0)
    n = PER_WORKER_BATCHES * BATCH
    next_seq = [1]

    cpu_rate = [0.0]

    def ingest_pass() -> float:
        start = next_seq[0]
        next_seq[0] += n
        batches = device.batches(range(start, start + n))
        t0, c0 = time.perf_counter(), time.process_time()
        for payload in batches:
            acks = service.ingest(device.device_id, topics.TELEMETRY, payload)
            encode_ack(home.command_key, device.device_id, acks)
        cpu_rate[0] = max(cpu_rate[0], n / (time.process_time() - c0))
        return n / (time.perf_counter() - t0)

    payloads = device.payloads(range(1, n + 1))
    pub = device.key.public_key()
    signed = [(device.key.sign(p), p) for p in payloads]

    def bare_pass() -> float:
        t0 = time.perf_counter()
        for sig, msg in signed:
            pub.verify(sig, msg)
        return n / (time.perf_counter() - t0)

    items = [
        cose.sign1(device.key, p, kid=device.kid, content_type=telemetry.SENML_CBOR_CONTENT_FORMAT) for p in payloads
    ]
    key_for = service._key_for(device.device_id)

    def verify_pass() -> float:
        t0 = time.perf_counter()
        for item in items:
            telemetry.decode(cose.verify1(item, key_for).payload)
        return n / (time.perf_counter() - t0)

    rows = [json_row(seq) for seq in range(1, n + 1)]

    def store_pass() -> float:
        base = next_seq[0]
        next_seq[0] += n
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            with db.tx() as tx:
                for seq, fields in rows[i : i + BATCH]:
                    BackendDb.insert_record(
                        tx, device_id=device.device_id, stream="c", seq=base + seq, kind="reading",
                        received_at=time.time(), wall=time.time(), clock="synced", fields=fields,
                        cose=items[0], binding_id=1,
                    )  # fmt: skip
        return n / (time.perf_counter() - t0)

    try:
        # interleaved, best of 5 each: on a shared machine both sides meet the same disturbances
        best = [0.0, 0.0, 0.0, 0.0]
        for _ in range(5):
            for i, fn in enumerate((ingest_pass, bare_pass, verify_pass, store_pass)):
                best[i] = max(best[i], fn())
        return best[0], best[1], best[2], best[3], cpu_rate[0]
    finally:
        db.close()


def json_row(seq: int) -> tuple[int, str]:
    return seq, f'{{"glu": {80 + seq % 90}}}'


STATS = re.compile(
    r"ingest stats: \d+ batches, \d+ records, verify ([\d.]+) s, store ([\d.]+) s of which write-lock wait ([\d.]+) s, "
    r"process CPU ([\d.]+) s"
)


def _scaled(tmp: Path, workers: int) -> tuple[float, tuple[float, float, float, float]]:
    """Records/s of `serve --workers N` draining the backlog through the broker, and the workers' summed
    (verify, store, write-lock wait) seconds from their stop lines (N > 1)."""
    system = LocalSystem(tmp / f"w{workers}")
    system.broker.start()
    serve = None
    publisher: BackendLink | None = None
    try:
        devices = [Device(system.home, system.db, n) for n in range(DEVICES)]
        backlog = [(d.device_id, b) for d in devices for b in d.batches(range(1, RECORDS_PER_DEVICE + 1))]
        serve = spawn(
            [str(BIN / "glucoagent-backend"), "serve", "--home", str(system.home.root), "--port",
             str(system.broker.port), "--workers", str(workers), "--log-level", "info"],
            system.run / "serve.log",
        )  # fmt: skip
        pattern = re.compile(r"(backend-\S+) 1 (\$share/ingest/)?gluco/v1/dev/\+/telemetry")
        deadline = time.monotonic() + 30
        while len(set(pattern.findall(system.broker.log_text()))) < workers:
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError(
                    f"serve --workers {workers} did not subscribe: {(system.run / 'serve.log').read_text()}"
                )
            time.sleep(0.05)
        publisher = BackendLink(link_settings(system.broker.host, system.broker.port, system.home.backend_tls()))
        publisher.connect()
        total = DEVICES * RECORDS_PER_DEVICE
        t0 = time.perf_counter()
        for device_id, payload in backlog:
            publisher.publish(topics.DeviceTopics(device_id).telemetry, payload)
            publisher.loop(0)
        while system.db.query("SELECT count(*) FROM records")[0][0] < total:
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise RuntimeError(f"serve --workers {workers}: not all {total} records stored in {TIMEOUT_S:g}s")
            publisher.loop(0.02)
        rate = total / (time.perf_counter() - t0)
    finally:
        if publisher is not None:
            publisher.disconnect()
        if serve is not None:
            stop_process(serve)
        system.broker.stop()
        system.db.close()
    found = STATS.findall((system.run / "serve.log").read_text())
    verify, store, wait, cpu = (sum(float(f[i]) for f in found) for i in range(4))
    return rate, (verify, store, wait, cpu)


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        ingest, bare, verify, store, ingest_cpu = _per_worker(Path(tmp))
        runs = {n: _scaled(Path(tmp), n) for n in WORKER_COUNTS}
    scaled = {n: rate for n, (rate, _) in runs.items()}
    verify4, store4, wait4, _ = runs[WORKER_COUNTS[-1]][1]
    total = DEVICES * RECORDS_PER_DEVICE
    rows = [
        Row(
            "ingest: verified records/s per worker (verify, decode, store, ack)",
            ingest,
            bare,
            ">= 0.5x",
            ingest >= 0.5 * bare,
            "bare Ed25519 verify, same core",
            "50-record batches, no MQTT; one process",
        ),
        Row("ingest phase: COSE verify + SenML decode, records/s", verify, bare, "report", None, "bare Ed25519 verify"),
        Row(
            "ingest phase: SQLite store (50 per commit, FULL), records/s",
            store,
            None,
            "report",
            None,
            "the single writer every worker shares",
        ),
    ]
    for n in WORKER_COUNTS:
        rows.append(
            Row(
                f"ingest: serve --workers {n}, 24k backlog via mosquitto, records/s",
                scaled[n],
                scaled[1],
                "report",
                None,
                "serve --workers 1",
                "2-core machine: broker, publisher and workers share the cores",
            )
        )
    rows.append(
        Row(
            f"ingest: --workers {WORKER_COUNTS[-1]}, write-lock wait / worker busy time",
            wait4 / (verify4 + store4) if verify4 + store4 else 0.0,
            None,
            "report",
            None,
            f"summed over workers: verify {verify4:.1f} s, store {store4:.1f} s, lock wait {wait4:.2f} s",
        )
    )
    for n in WORKER_COUNTS[1:]:  # CPU time leaves out the cores others took: the figure free of the machine
        cpu = runs[n][1][3]
        rows.append(
            Row(
                f"ingest: --workers {n}, records per worker CPU-second",
                total / cpu if cpu else 0.0,
                ingest_cpu,
                "report",
                None,
                "one worker in-process, per CPU-second",
                "flat across N: sharing adds no per-record cost; throughput = this x free cores",
            )
        )
    return rows


if __name__ == "__main__":
    from bench.run import table

    print(table(run()))
