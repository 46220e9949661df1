"""Link faults under `mqtt.profile aws` against the fake AWS IoT Core, and the agent at AWS's publish rate.

The link faults of tests/system/test_link_faults.py through the fake's SNI gate (itself a fault proxy): RST,
FIN, flapping, black hole; and the publish-rate throttle provoked by a fake whose quota is lowered: every
reading once. The SIGKILL loop under this profile is tests/system/test_crash.py's aws variant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.link.mqtt import PINGRESP_WAIT
from agent.wire import aws
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.clouds.aws_fake import AwsSystem, SniGate

FAST = {"backoff_min_s": "0.2", "backoff_cap_s": "2", "ack_timeout_s": "3", "connect_timeout_s": "3"}


def log_of(state: Path) -> str:
    return (state / "agent.log").read_text(errors="replace")


def readings(system: AwsSystem, device_id: str) -> list[tuple[str, int]]:
    return [
        (r.fields["glu:meter_time"], r.fields["glu:mgdl"])
        for r in system.db.records(device_id=device_id, kind="reading")
    ]


def once(system: AwsSystem, device_id: str, meter: list[tuple[str, int]]) -> None:
    got = readings(system, device_id)
    assert sorted(got) == sorted(meter)  # each reading once, none invented
    clinical = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))


def box(
    system: AwsSystem, tmp_path: Path, name: str, n: int, mqtt: dict[str, str]
) -> tuple[Path, Path, str, list[tuple[str, int]]]:
    state = system.device_dir(name)
    prov = system.provision(state, "patient-faults")
    assert prov.returncode == 0, prov.stdout + prov.stderr
    records = random_records("onetouch-ultra2", n, seed=len(name))
    (tmp_path / f"{name}.json").write_text(dumps(records))
    link = tmp_path / f"tty-{name}"
    system.start_simulator("onetouch-ultra2", link, tmp_path / f"{name}.json", "--baud", "0")
    config = system.config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], mqtt=mqtt)
    return state, config, prov.stdout.split()[-1], [(r.meter_time.isoformat(), r.value_mgdl) for r in records]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[AwsSystem]:
    with AwsSystem(tmp_path / "aws") as s:
        yield s


def test_rst_fin_black_hole_and_flapping_through_the_endpoint(system: AwsSystem, tmp_path: Path) -> None:
    gate = SniGate(system.broker.port, latency_s=0.05).start()  # the endpoint, and a bad network in front of it
    try:
        mqtt = {**FAST, "endpoint": f"mqtts://localhost:{gate.port}", "batch_records": "5", "inflight": "1"}
        state, config, device_id, meter = box(system, tmp_path, "faulty", 120, mqtt)
        system.start_agent(state, config)
        assert system.wait_for(lambda: len(readings(system, device_id)) >= 10, 30), log_of(state)[-3000:]
        gate.cut(rst=True)
        at_rst = len(readings(system, device_id))
        assert system.wait_for(lambda: log_of(state).count("uplink: connected") >= 2, 15)
        gate.cut(rst=False)
        assert system.wait_for(lambda: log_of(state).count("uplink: connected") >= 3, 15)
        cuts = gate.cuts
        gate.flap(1.5)
        assert system.wait_for(lambda: gate.cuts >= cuts + 3, 30)
        gate.steady()
        assert at_rst < len(meter)  # the faults hit the upload in the middle
        assert system.wait_for(lambda: len(readings(system, device_id)) == len(meter), 60), log_of(state)[-3000:]

        # A black hole: AWS's shortest keepalive is 30 s (the profile raises our 30 s default no lower), so a
        # dead link is noticed within 1.5 x 30 s.
        keepalive = aws.KEEPALIVE_MIN_S

        def up() -> bool:
            log = log_of(state)
            return log.rfind("uplink: connected") > max(log.rfind("link lost"), log.rfind("retrying in"))

        assert system.wait_for(up, 20)
        time.sleep(1.0)
        assert up()  # a live, settled connection goes into the black hole
        start = time.monotonic()
        gate.black_hole()
        assert system.wait_for(lambda: any(t > start for t in gate.client_closed_at), 1.6 * keepalive, poll=0.1)
        detected = min(t for t in gate.client_closed_at if t > start) - start
        assert detected <= 1.5 * keepalive, detected
        assert f"no PINGRESP within {PINGRESP_WAIT * keepalive:.1f}s: link is dead" in log_of(state)
        gate.forward()
        assert system.wait_for(lambda: log_of(state).count("uplink: connected") >= 5, 20), log_of(state)[-3000:]
        once(system, device_id, meter)
        assert gate.refused_sni == []
    finally:
        gate.close()


def test_the_publish_rate_throttle_loses_nothing(tmp_path: Path) -> None:
    # AWS allows 100 publishes/s per connection and throttles the rest; the profile paces uploads at half
    # that. A fake with a quota of 5/s makes the agent's uploads run into the throttle.
    with AwsSystem(tmp_path / "throttle", publish_rate=5) as system:
        mqtt = {**FAST, "endpoint": system.endpoint, "batch_records": "1", "inflight": "16"}
        state, config, device_id, meter = box(system, tmp_path, "eager", 40, mqtt)
        system.start_agent(state, config)
        assert system.wait_for(lambda: len(readings(system, device_id)) == len(meter), 90), log_of(state)[-3000:]
        once(system, device_id, meter)
        assert "publish rate exceeded" in system.broker.log_text()
        log = log_of(state)
        assert log.count("the broker refused a batch") >= 1
        assert "over a limit of the cloud such as AWS IoT Core's publishes per second" in log
