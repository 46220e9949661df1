"""`glucoagent-backend serve --workers 2 --cloud azure|aws`: the ingest workers read telemetry where each cloud
delivers it (the Azure bridge's ingest endpoint, AWS's topic rule target), on an MQTT 5 shared subscription of
the fake's broker standing in for an Event Hubs consumer group / a rule's fan-out. A real box (enrolled by
the cloud's own flow through `serve`'s control connection) uploads while a worker is SIGKILLed: every reading
stored once, verified, gap-free, and acknowledged (the box's buffer drains), de-duplication exact across the
workers by the (device, stream, seq) key."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.aws_fake import AwsSystem, SniGate
from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import BIN, LocalSystem, device_config, spawn

BACKEND = str(BIN / "glucoagent-backend")
WORKERS = 2


def worker_pids(system: LocalSystem) -> dict[int, int]:
    """slot -> pid of this system's `ingest-worker` processes."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "ingest-worker" in argv and str(system.home.root) in argv:
            out[int(argv[argv.index("--slot") + 1])] = int(entry.name)
    return out


def serve(system: LocalSystem, cloud: str) -> None:
    proc = spawn(
        [BACKEND, "serve", "--home", str(system.home.root), "--host", "localhost", "--port", str(system.broker.port),
         "--workers", str(WORKERS), "--cloud", cloud, "--crl-check-interval", "3600"],
        system.run / "serve.log",
    )  # fmt: skip
    system.procs.append(proc)
    assert system.wait_for(lambda: len(worker_pids(system)) == WORKERS, 30), (system.run / "serve.log").read_text()


@pytest.mark.parametrize("cloud", ["azure", "aws"])
def test_workers_ingest_each_reading_once_across_a_worker_kill(tmp_path: Path, cloud: str) -> None:
    system: LocalSystem
    if cloud == "azure":
        hub = AzureSystem(tmp_path / cloud, hub="localhost")  # the hub DPS assigns is where the box connects
        hub.broker.start()
        hub.responder.start()
        system = hub
    else:
        amazon = AwsSystem(tmp_path / cloud)
        amazon.broker.start()
        amazon.gate = SniGate(amazon.broker.port)
        amazon.gate.start()
        amazon.aws.start()
        system = amazon
    try:
        serve(system, cloud)
        state = system.device_dir("box")
        if isinstance(system, AzureSystem):
            prov = system.provision_by_dps(state)
            mqtt = system.mqtt_options(dps_host="localhost", ack_timeout_s="3", backoff_min_s="0.1", backoff_cap_s="1")
        else:
            prov = system.provision(state)
            mqtt = {"profile": "aws", "ack_timeout_s": "3", "backoff_min_s": "0.1", "backoff_cap_s": "1"}
        assert prov.returncode == 0, prov.stdout + prov.stderr + (system.run / "serve.log").read_text()[-3000:]
        device_id = prov.stdout.strip().rsplit(" ", 1)[-1]

        meter = random_records("onetouch-ultra2", 60, seed=201)
        records = system.run / "meter.json"
        records.write_text(dumps(meter))
        link = system.run / "tty-box"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        config = device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")],
                               agent={"reread_s": "10", "port_scan_s": "0.3"}, mqtt=mqtt)  # fmt: skip
        system.start_agent(state, config)

        def stored() -> int:
            return len(system.db.records(device_id=device_id, kind="reading"))

        assert system.wait_for(lambda: stored() >= 1, 60), (state / "agent.log").read_text()[-3000:]
        victim = worker_pids(system)[1]
        os.kill(victim, signal.SIGKILL)  # mid-stream: its in-flight batches come again (kept session, resends)
        assert system.wait_for(lambda: worker_pids(system).get(1, victim) != victim, 30)  # restarted

        assert system.wait_for(lambda: stored() >= 60, 120), (state / "agent.log").read_text()[-3000:]
        got = sorted((r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in system.db.records(device_id, "reading"))
        assert got == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in meter), "each reading once, unaltered"
        seqs = sorted(r.seq for r in system.db.records(device_id) if r.stream == "c")
        assert seqs == list(range(1, len(seqs) + 1))

        def drained() -> bool:  # every record acknowledged end to end: nothing left in the box's buffer
            out = system.glucoagent(state, "status", "--json", config=config).stdout
            return bool(out) and json.loads(out)["buffer_depth"] == 0

        assert system.wait_for(drained, 60), (state / "agent.log").read_text()[-3000:]
        serve_log = (system.run / "serve.log").read_text()
        assert "ingest worker 1" in serve_log and "restarting it" in serve_log
    finally:
        system.stop()
