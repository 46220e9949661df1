"""The emulated device end to end: the .ipk installed into the mipsel root, the agent run from that root
under qemu-mipsel-static, against the real broker (mutual TLS, ACLs), the reference backend and a
simulated OneTouch Ultra 2 on a pseudo-terminal (the simulator runs on the host; the guest sees the
host's /dev, /tmp and network).

Everything the device does runs emulated: ``glucoagent provision`` (key made on the box, CSR, claim
over MQTT), ``glucoagent run`` with the package's own /etc/config/glucoagent (meter probe and read,
COSE_Sign1, SQLite buffer, upload, signed acks), ``glucoagent status``, a clean stop on SIGTERM and a
restart that stores nothing twice. Wall time on a 2-core host: ~4 s for provisioning,
~2 s from process start to all readings at the backend; the timeouts below are generous for slow CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.wire import cose, telemetry
from backend.db import StoredRecord
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from openwrt import build_ipk as B
from openwrt.mipsroot import GUEST_QEMU, build_root, install_ipk, run_in_root
from testbed.harness import LocalSystem

pytestmark = pytest.mark.slow

N = 25
PATIENT = "patient-emu-4410"
GUEST_TIMEOUT_S = 180  # one guest command (provision, status): seconds here, minutes on a loaded CI box
DELIVERY_TIMEOUT_S = 180  # agent start to all N readings verified at the backend


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # The guest sees the host's /tmp only, so everything it reads or writes lives there, whatever
    # TMPDIR or --basetemp say.
    d = Path(tempfile.mkdtemp(prefix="glucoagent-emu-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def root(ipk: Path, workdir: Path) -> Path:
    return install_ipk(ipk, workdir / "root", build_root())


@pytest.fixture(scope="module")
def system(workdir: Path) -> Iterator[LocalSystem]:
    with LocalSystem(workdir / "sys") as s:
        yield s


class Device:
    """The emulated box: guest commands run from the installed root, with a state dir under /tmp."""

    def __init__(self, root: Path, state: Path) -> None:
        self.root = root
        self.state = state
        self.log = state / "agent.log"

    def command(self, *args: str, config: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["/usr/bin/glucoagent", "--state-dir", str(self.state)]
        argv += ["--config", config] if config else []
        proc = run_in_root(self.root, [*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=GUEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"glucoagent {' '.join(args)} timed out under qemu: {err[-3000:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def start(self, config: str) -> subprocess.Popen[bytes]:
        argv = ["/usr/bin/glucoagent", "--state-dir", str(self.state), "--config", config, "run"]
        with self.log.open("ab") as out:
            return run_in_root(self.root, argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self, agent: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM as procd sends it; the return code, or a failure (with the log) if it hangs."""
        agent.send_signal(signal.SIGTERM)
        try:
            return agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
            pytest.fail(f"agent ignored SIGTERM under qemu for {timeout} s: {self.tail()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def tail(self) -> str:
        return self.text()[-4000:]


def shipped_config(root: Path, port: str) -> str:
    """The package's own /etc/config/glucoagent with what a technician sets by ``uci set``: the meter's
    port, and logs to stderr (the host may have a /dev/log the guest would otherwise log to)."""
    path = root / B.UCI_CONFIG.lstrip("/")
    text = path.read_text()
    edits = {
        "\toption port '/dev/ttyUSB0'\n": f"\toption port '{port}'\n",
        "config agent 'agent'\n": "config agent 'agent'\n\toption log_target 'stderr'\n",
    }
    for old, new in edits.items():
        assert text.count(old) == 1, f"{B.UCI_CONFIG} changed: {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return B.UCI_CONFIG  # a guest path: the agent reads it from the root like on the box


def _guest_cmdline(pid: int, timeout: float = 30) -> list[str]:
    """The command line of ``pid`` once unshare and the bootstrap have exec'd into qemu."""
    deadline = time.monotonic() + timeout
    while True:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
        if argv[0] == GUEST_QEMU or time.monotonic() > deadline:
            return argv
        time.sleep(0.02)


def test_emulated_agent_delivers_every_reading_verified_exactly_once(
    root: Path, system: LocalSystem, workdir: Path
) -> None:
    meter = random_records("onetouch-ultra2", N, seed=47)
    records = workdir / "ultra2.json"
    records.write_text(dumps(meter))
    link = workdir / "ttyEMU0"
    system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
    assert os.readlink(link).startswith("/dev/pts/")

    device = Device(root, system.device_dir("emu-device"))
    t0 = time.monotonic()
    prov = device.command(
        "provision", "--endpoint", system.broker.endpoint, f"--token={system.token(PATIENT)}", f"--patient={PATIENT}"
    )
    provision_s = time.monotonic() - t0
    assert prov.returncode == 0, prov.stdout + prov.stderr[-3000:]
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    assert device_id.startswith("gd-")
    assert system.db.patient_of(device_id) == PATIENT
    assert (device.state / "device.key").stat().st_mode & 0o777 == 0o600  # made on the (emulated) box

    config = shipped_config(root, port=str(link))
    t0 = time.monotonic()
    agent = device.start(config)

    def stored() -> list[StoredRecord]:
        return system.db.records(device_id=device_id, kind="reading")

    def delivered_or_dead() -> bool:
        return len(stored()) >= N or agent.poll() is not None

    try:
        # It is the emulated build that runs: qemu-mipsel-static, chrooted into the installed root.
        cmdline = _guest_cmdline(agent.pid)
        assert cmdline[0] == GUEST_QEMU, cmdline
        assert cmdline[3:5] == ["/usr/bin/python3.11", "/usr/bin/glucoagent"] and cmdline[-1] == "run", cmdline
        assert os.path.samefile(f"/proc/{agent.pid}/root", root)

        assert system.wait_for(delivered_or_dead, timeout=DELIVERY_TIMEOUT_S), device.tail()
        deliver_s = time.monotonic() - t0
        assert agent.poll() is None, device.tail()
        assert len(stored()) == N, device.tail()

        def status() -> dict[str, object]:
            r = device.command("status", "--json", config=config)
            assert r.returncode == 0, r.stderr[-3000:]
            return json.loads(r.stdout)  # type: ignore[no-any-return]

        st = status()
        # the last acks may still be on their way; the snapshot `status` reads follows the daemon's state
        # within a pass of its loop (slow under emulation)
        if st["buffer_depth"] != 0 or not st["meters"]:
            assert system.wait_for(
                lambda: (s := status())["buffer_depth"] == 0 and bool(s["meters"]), timeout=60, poll=1
            ), device.tail()
            st = status()
        assert st["provisioned"] is True and st["connected"] is True, st
        assert [m["protocol"] for m in st["meters"]] == ["onetouch-ultra2"], st  # type: ignore[union-attr]
    finally:
        rc = device.stop(agent)
    assert rc == 0, device.tail()
    log = device.text()
    assert "stopping" in log
    assert "Traceback" not in log, log[-4000:]

    # Exactly once: N readings, the clinical stream gap-free, the same values the meter holds.
    rows = stored()
    assert len(rows) == N
    clinical = sorted(r.seq for r in system.db.records(device_id=device_id) if r.stream == "c")
    assert clinical == list(range(1, len(clinical) + 1))
    got = {(r.fields["glu:meter_time"], r.fields["glu:mgdl"], r.fields["glu:meal"]) for r in rows}
    assert got == {(m.meter_time.isoformat(), m.value_mgdl, m.meal.value) for m in meter}

    # Signed on the emulated box with the key it made there; verifies independently of the backend.
    public_key = x509.load_pem_x509_certificate((device.state / "device.crt").read_bytes()).public_key()
    raws = system.db.query("SELECT cose FROM records WHERE device_id = ?", (device_id,))
    assert len(raws) == len(system.db.records(device_id=device_id)) >= N
    for (raw,) in raws:
        verified = cose.verify1(raw, lambda kid: public_key if kid == cose.key_id(public_key) else None)
        assert telemetry.decode(verified.payload).device_id == device_id
        assert PATIENT.encode() not in raw

    # A restart re-reads the same meter from its SQLite buffer state and stores nothing new.
    agent = device.start(config)
    try:
        assert system.wait_for(
            lambda: f"{N} records, 0 new" in device.text() or agent.poll() is not None, timeout=DELIVERY_TIMEOUT_S
        ), device.tail()
        assert agent.poll() is None, device.tail()
    finally:
        rc = device.stop(agent)
    assert rc == 0, device.tail()
    assert len(stored()) == N
    assert len([r for r in system.db.records(device_id=device_id) if r.stream == "c"]) == len(clinical)
    print(f"emulated: provision {provision_s:.1f} s, start to all {N} readings verified {deliver_s:.1f} s")
