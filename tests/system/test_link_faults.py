"""Bad networks between the box and the cloud, made for real with a TCP proxy (testbed/faultproxy.py).

Real processes throughout: the Ultra 2 simulator on a pty, ``glucoagent run``, the
proxy, mosquitto with mutual TLS and the reference backend. The device's
``mqtt.endpoint`` points at the proxy, which resets connections (RST), closes
them (FIN), black-holes them, refuses them or flaps; the broker is also killed
and restarted mid-upload. What must hold:

- a dead link (black hole) is noticed within 1.5 x keepalive (keepalive 5 s here);
- reconnects back off with full jitter between backoff_min_s/2 and the cap, the
  delay grows while the network stays bad, and resets once the link was stable;
- the backend ends with every reading exactly once, sequence numbers without gaps;
- while offline the agent is idle (CPU from /proc/<pid>/stat).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import TcpProxy

from agent.link.mqtt import PINGRESP_WAIT
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config, stop_process

KEEPALIVE_S = 5
BACKOFF_MIN_S = 0.5
BACKOFF_CAP_S = 4.0
STABLE_S = 6.0
MQTT = {
    "keepalive": str(KEEPALIVE_S),
    "backoff_min_s": str(BACKOFF_MIN_S),
    "backoff_cap_s": str(BACKOFF_CAP_S),
    "stable_s": str(STABLE_S),
    "ack_timeout_s": "5",
    "connect_timeout_s": "3",
    "batch_records": "5",
    "inflight": "1",
}
DELAY_RE = re.compile(r"uplink: .*(?:reconnecting|retrying) in (\d+(?:\.\d+)?)s$", re.MULTILINE)
LOG_RESOLUTION_S = 0.05  # the agent logs delays with one decimal
SHORTEST_S = BACKOFF_MIN_S / 2 - LOG_RESOLUTION_S  # the uplink never waits less than backoff_min_s / 2
CONNECTED = "uplink: connected to"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("faults")) as s:
        yield s


@dataclasses.dataclass
class Rig:
    """One provisioned box whose link runs through ``proxy``, reading a simulated Ultra 2 with ``n`` readings."""

    system: LocalSystem
    state: Path
    device_id: str
    proxy: TcpProxy
    agent: subprocess.Popen[bytes]
    n: int
    meter: list[tuple[str, int]]

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")

    def connects(self) -> int:
        return self.log().count(CONNECTED)

    def delays(self, after: int = 0) -> list[float]:
        """Backoff delays the agent logged, from character ``after`` of its log on."""
        return [float(m) for m in DELAY_RE.findall(self.log()[after:])]

    def readings(self) -> int:
        rows = self.system.db.query(
            "SELECT count(*) FROM records WHERE device_id = ? AND kind = 'reading'", (self.device_id,)
        )
        return int(rows[0][0])

    def status(self) -> str | None:
        rows = self.system.db.query("SELECT status FROM devices WHERE device_id = ?", (self.device_id,))
        return rows[0][0] if rows else None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.system.wait_for(predicate, timeout, poll=0.05):
            pytest.fail(f"{what}: not within {timeout}s\n--- agent.log (tail) ---\n{self.log()[-3000:]}")

    def assert_every_reading_exactly_once(self) -> None:
        stored = self.system.db.records(device_id=self.device_id, kind="reading")
        got = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
        assert len(got) == self.n
        assert sorted(got) == sorted(self.meter)  # each meter reading once, none invented
        clinical = [r.seq for r in self.system.db.records(device_id=self.device_id) if r.stream == "c"]
        assert clinical == list(range(1, len(clinical) + 1))  # no gap, nothing twice


@pytest.fixture
def rig(system: LocalSystem, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(n: int, *, latency_s: float = 0.0, seed: int = 7) -> Rig:
        name = f"box-{len(list(system.run.glob('box-*')))}"
        state = system.device_dir(name)
        prov = system.provision(state)
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.split()[-1]
        readings = random_records("onetouch-ultra2", n, seed=seed)
        records = tmp_path / f"{name}.json"
        records.write_text(dumps(readings))
        link = tmp_path / f"tty-{name}"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        proxy = TcpProxy(system.broker.port, latency_s=latency_s).start()
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            mqtt={**MQTT, "endpoint": proxy.endpoint},
        )
        agent = system.start_agent(state, config)
        meter = [(r.meter_time.isoformat(), r.value_mgdl) for r in readings]
        made.append(Rig(system, state, device_id, proxy, agent, n, meter))
        return made[-1]

    yield make
    for r in made:
        r.proxy.close()
    for proc in list(system.procs):  # agents and simulators of this test
        stop_process(proc)
        system.procs.remove(proc)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def test_black_hole_is_detected_within_one_and_a_half_keepalives(rig: Callable[..., Rig]) -> None:
    r = rig(20)
    r.wait(lambda: r.readings() == r.n and r.status() == "online", 30, "first upload")
    assert r.agent.poll() is None

    start = time.monotonic()
    r.proxy.black_hole()  # sockets stay open, nothing gets through: only keepalive can tell
    r.wait(lambda: any(t > start for t in r.proxy.client_closed_at), 3 * KEEPALIVE_S, "agent closing the dead link")
    detected = min(t for t in r.proxy.client_closed_at if t > start) - start
    print(f"dead link detected after {detected:.2f}s (keepalive {KEEPALIVE_S}s)")
    assert detected <= 1.5 * KEEPALIVE_S
    assert f"no PINGRESP within {PINGRESP_WAIT * KEEPALIVE_S:.1f}s: link is dead" in r.log()
    # The broker saw the TCP close (the proxy passes it on) and published the will.
    r.wait(lambda: r.status() == "offline", 10, "will 'offline'")

    # Attempts into the black hole hang in the TLS handshake and time out; the agent keeps trying.
    r.wait(lambda: len(r.proxy.accepted_at) >= 2, BACKOFF_CAP_S + 2, "a reconnect attempt")
    r.proxy.forward()
    r.wait(lambda: r.connects() == 2 and r.status() == "online", 2 * KEEPALIVE_S + BACKOFF_CAP_S + 5, "reconnect")
    assert r.agent.poll() is None
    r.assert_every_reading_exactly_once()


def test_cuts_with_and_without_rst_and_flapping_lose_and_double_nothing(rig: Callable[..., Rig]) -> None:
    r = rig(200, latency_s=0.05)  # a slow link: the backlog takes several seconds to drain
    r.wait(lambda: r.readings() >= 10, 30, "upload started")

    r.proxy.cut(rst=True)  # the agent reads ECONNRESET
    at_rst = r.readings()
    r.wait(lambda: r.connects() >= 2, 10, "reconnect after RST")
    r.wait(lambda: r.readings() >= at_rst + 10, 20, "upload resumed after RST")

    r.proxy.cut(rst=False)  # orderly FIN from the "broker"
    at_fin = r.readings()
    r.wait(lambda: r.connects() >= 3, 10, "reconnect after FIN")

    # Acks lost: the batch in flight reaches the backend, its ack never comes back. The agent must
    # send it again (ack timeout or reconnect) and the backend must store it only once.
    duplicates = r.system.db.counter("duplicates")
    start = time.monotonic()
    r.proxy.drop_replies()
    at_drop = r.readings()
    r.wait(lambda: any(t > start for t in r.proxy.client_closed_at), 3 * KEEPALIVE_S, "agent giving up the link")
    r.proxy.forward()
    r.wait(lambda: r.connects() >= 4, 2 * KEEPALIVE_S + BACKOFF_CAP_S + 5, "reconnect after lost acks")

    cuts = r.proxy.cuts
    r.proxy.flap(1.5)  # cut whatever is connected every 1.5 s
    r.wait(lambda: r.proxy.cuts >= cuts + 3, 30, "three flaps while connected")
    r.proxy.steady()
    at_flap = r.readings()
    print(f"readings at the RST cut {at_rst}, FIN cut {at_fin}, acks lost {at_drop}, flapping end {at_flap} of {r.n}")
    assert at_rst < r.n
    assert at_fin < r.n
    assert at_drop < r.n  # every fault hit the upload in the middle

    r.wait(lambda: r.readings() == r.n, 60, "all readings after the faults")
    r.wait(lambda: r.status() == "online", 10, "online")
    r.assert_every_reading_exactly_once()
    assert r.agent.poll() is None

    resent = r.system.db.counter("duplicates") - duplicates
    assert resent >= 1  # the batch whose ack was lost came again, and was stored once
    delays = r.delays()
    print(f"backoff delays: {delays}; records sent twice and stored once: {resent}")
    assert len(delays) >= 5
    assert all(SHORTEST_S <= d <= BACKOFF_CAP_S for d in delays)
    assert len(set(delays)) >= 3  # jittered, not a fixed interval


def test_offline_backoff_grows_with_jitter_resets_when_stable_and_stays_idle(rig: Callable[..., Rig]) -> None:
    r = rig(5)
    r.wait(lambda: r.readings() == r.n and r.connects() == 1, 30, "first upload")

    mark = len(r.log())
    r.proxy.refuse()  # every new connection is reset at once: a broker that is down
    r.proxy.cut(rst=True)
    r.wait(lambda: len(r.delays(mark)) >= 2, 5, "offline")
    cpu0, wall0 = cpu_seconds(r.agent.pid), time.monotonic()
    r.wait(lambda: time.monotonic() - wall0 >= 10, 12, "10 s offline")  # the measurement window
    cpu1, wall1 = cpu_seconds(r.agent.pid), time.monotonic()
    share = (cpu1 - cpu0) / (wall1 - wall0)
    delays = r.delays(mark)
    print(f"offline for {wall1 - wall0:.1f}s: CPU {100 * share:.2f}%, {len(delays)} delays {delays}")
    assert share < 0.05
    assert 3 <= len(delays) <= 30  # neither a busy loop nor stuck
    assert all(SHORTEST_S <= d <= BACKOFF_CAP_S for d in delays)
    assert max(delays) > 2 * BACKOFF_MIN_S  # it grew towards the cap
    assert len(set(delays)) >= 3  # full jitter

    r.proxy.forward()
    r.wait(lambda: r.connects() == 2, BACKOFF_CAP_S + 5, "reconnect")
    up_since = time.monotonic()
    r.wait(lambda: time.monotonic() - up_since > STABLE_S + 1, STABLE_S + 3, "a stable link")
    assert r.connects() == 2  # stayed up the whole time
    mark = len(r.log())
    r.proxy.cut(rst=True)
    r.wait(lambda: len(r.delays(mark)) >= 1, 5, "the next drop")
    first = r.delays(mark)[0]
    print(f"first delay after {STABLE_S + 1:.0f}s of stable link: {first}s")
    assert first <= BACKOFF_MIN_S + LOG_RESOLUTION_S  # the attempt count was reset: back to the first step
    r.wait(lambda: r.connects() == 3, BACKOFF_CAP_S + 5, "reconnect")


def test_broker_killed_and_restarted_mid_upload(system: LocalSystem, rig: Callable[..., Rig]) -> None:
    r = rig(200, latency_s=0.05, seed=8)
    r.wait(lambda: r.readings() >= 20, 30, "upload started")

    system.broker.kill()  # SIGKILL: only its last autosave survives
    at_kill = r.readings()
    assert at_kill < r.n
    mark = len(r.log())
    r.wait(lambda: len(r.delays(mark)) >= 2, 20, "agent noticing the broker is gone")

    system.broker.start()  # same port, same persistence
    r.wait(lambda: r.readings() == r.n, 60, "all readings after the restart")
    r.wait(lambda: r.status() == "online", 10, "online")
    print(f"broker killed at {at_kill} of {r.n} readings; delays while down {r.delays(mark)}")
    r.assert_every_reading_exactly_once()
    assert r.agent.poll() is None
