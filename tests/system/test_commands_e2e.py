"""Cloud-to-device commands end to end, with the real broker, backend, agent and CLI (docs/commands.md).

One box (with a simulated meter) runs for the whole module. Commands go out the way an
operator sends them (`glucoagent-backend command`, a real process) or, for bad input, as
hand-made messages published by the backend identity. Every result is checked against the
device's certificate by the same code the backend uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.identity.credentials import load_key
from agent.wire import cose, topics
from agent.wire.result import Result
from backend.commands import record_sent, stored_result, verify_result
from backend.mqtt_client import BackendLink, link_settings
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import BIN, LocalSystem, device_config

PATIENT = "patient-cmd-5521"
BACKEND_CLI = str(BIN / "glucoagent-backend")
SETTIME = """#!/bin/sh
echo "start $1" >> "{dir}/settime.calls"
if [ -f "{dir}/settime.slow" ]; then sleep 6; fi
echo "end $1" >> "{dir}/settime.calls"
"""
REBOOT = """#!/bin/sh
echo "reboot" >> "{dir}/reboot.calls"
if [ -f "{dir}/reboot.slow" ]; then sleep 6; fi
if [ -f "{dir}/reboot.term" ]; then kill -TERM "$PPID"; fi
exit 0
"""


@dataclasses.dataclass
class Box:
    system: LocalSystem
    state: Path
    config: Path
    device_id: str
    token: str
    agent: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")

    def restart(self) -> None:
        if self.agent.poll() is None:
            os.killpg(self.agent.pid, signal.SIGTERM)
            self.agent.wait(15)
        self.start()

    def start(self) -> None:
        before = self.log.count("uplink: connected")
        self.agent = self.system.start_agent(self.state, self.config)
        assert self.system.wait_for(lambda: self.log.count("uplink: connected") > before, 30), self.log[-3000:]

    def kill(self) -> None:
        os.killpg(self.agent.pid, signal.SIGKILL)
        self.agent.wait()

    def calls(self, name: str) -> list[str]:
        path = self.state.parent / f"{name}.calls"
        return path.read_text().splitlines() if path.exists() else []


class Cloud:
    """The backend identity on its own connection: publishes raw envelopes, collects verified results."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.messages: queue.Queue[bytes] = queue.Queue()
        home = box.system.home
        settings = link_settings("localhost", box.system.broker.port, home.backend_tls())
        self.dev = topics.DeviceTopics(box.device_id)
        self.link = BackendLink(settings, on_message=lambda t, p: self.messages.put(p) if t == self.dev.results else None)
        self.link.connect()
        assert self.link.subscribe([self.dev.results]) == [1]

    def publish(self, payload: bytes) -> None:
        mid = self.link.publish(self.dev.commands, payload)
        deadline = time.monotonic() + 5
        while self.link.acked(mid) is None and time.monotonic() < deadline:
            self.link.loop(0.05)

    def result(self, match: Any, timeout: float = 20.0) -> tuple[Result, bytes]:
        """The next verified result for which ``match(result)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.link.loop(0.05)
            try:
                payload = self.messages.get_nowait()
            except queue.Empty:
                continue
            result = verify_result(self.box.system.db, self.box.device_id, payload)
            if match(result):
                return result, payload
        raise AssertionError(f"no matching result within {timeout}s; agent log:\n{self.box.log[-3000:]}")

    def close(self) -> None:
        self.link.disconnect()


def envelope(box: Box, body: dict[str, Any], key: ed25519.Ed25519PrivateKey | None = None) -> bytes:
    return cose.sign1(key or box.system.home.command_key, cbor2.dumps(body, canonical=True))


def body(box: Box, ctype: str, args: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    b = {"id": "t" + os.urandom(8).hex(), "dev": box.device_id, "type": ctype, "args": args or {}, "iat": now, "exp": now + 600}
    b.update(over)
    return b


def command(box: Box, ctype: str, *args: str, timeout: float = 40, background: bool = False) -> Any:
    argv = [BACKEND_CLI, "command", box.device_id, ctype, *args, "--home", str(box.system.home.root),
            "--port", str(box.system.broker.port), "--timeout", str(timeout)]  # fmt: skip
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)


def finished(proc: subprocess.CompletedProcess[str] | subprocess.Popen[str]) -> dict[str, Any]:
    if isinstance(proc, subprocess.Popen):
        out, err = proc.communicate(timeout=90)
        rc = proc.returncode
    else:
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    assert out.strip(), f"exit {rc}: {err}"
    result = json.loads(out)
    assert rc == (0 if result["status"] == "ok" else 1), err
    return dict(result)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    run = tmp_path_factory.mktemp("cmd")
    with LocalSystem(run) as system:
        for name, text in (("settime.sh", SETTIME), ("reboot.sh", REBOOT)):
            script = run / name
            script.write_text(text.format(dir=run))
            script.chmod(0o755)
        records = run / "meter.json"
        records.write_text(dumps(random_records("onetouch-ultra2", 12, seed=5)))
        link = run / "ttyCMD"
        system.start_simulator("onetouch-ultra2", link, records)
        state = system.device_dir("box")
        token = system.token(PATIENT)
        prov = system.provision(state, PATIENT, token)
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            agent={
                "settime_command": f"{run}/settime.sh {{epoch}}",
                "reboot_command": f"{run}/reboot.sh",
                "reread_s": "86400",
                "health_interval_s": "3600",
            },
            mqtt={"backoff_min_s": "0.1", "backoff_cap_s": "1"},
        )
        b = Box(system, state, config, device_id, token, system.start_agent(state, config))
        assert system.wait_for(lambda: len(system.db.records(device_id=device_id, kind="reading")) >= 12, 60), b.log
        yield b


@pytest.fixture
def cloud(box: Box) -> Iterator[Cloud]:
    c = Cloud(box)
    yield c
    c.close()
    assert box.agent.poll() is None, "the agent must stay up"


# --- each command ---------------------------------------------------------------------------------
def test_ping(box: Box) -> None:
    r = finished(command(box, "ping"))
    assert (r["status"], r["code"]) == ("ok", "pong")
    assert r["data"]["connected"] is True
    assert stored_result(box.system.db, box.device_id, r["id"])[:2] == ("ok", "pong")  # the service kept it too


def test_sync_time_runs_the_configured_command_and_trusts_the_clock(box: Box) -> None:
    before = len(box.calls("settime"))
    t = int(time.time())
    r = finished(command(box, "sync_time", f"time={t}"))
    assert (r["status"], r["code"]) == ("ok", "time_set")
    calls = box.calls("settime")[before:]
    assert len(calls) == 2 and calls[0].startswith("start ") and abs(int(calls[0].split()[1]) - t) <= 5
    assert finished(command(box, "ping"))["data"]["clock"] == "synced"


def test_set_config_persists_applies_or_asks_for_a_restart(box: Box) -> None:
    r = finished(command(box, "set_config", "key=alerts.hypo_mgdl", "value=80"))
    assert (r["status"], r["code"], r["data"]["restart_required"]) == ("ok", "applied", False)
    assert "option hypo_mgdl '80'" in box.config.read_text()
    r = finished(command(box, "set_config", "key=mqtt.keepalive", "value=20"))
    assert (r["status"], r["code"]) == ("ok", "restart_required")
    assert "option keepalive '20'" in box.config.read_text()
    for key, value, code in (
        ("agent.reboot_command", "rm -rf /", "not_settable"),
        ("agent.state_dir", "/tmp", "not_settable"),
        ("alerts.hypo_mgdl", "9999", "bad_value"),
        ("alerts.severe_hypo_mgdl", "150", "bad_value"),  # above hypo_mgdl: the whole file must stay valid
    ):
        r = finished(command(box, "set_config", f"key={key}", f"value={value}"))
        assert (r["status"], r["code"]) == ("refused", code), r
    assert "rm -rf" not in box.config.read_text() and "9999" not in box.config.read_text()


def test_read_now_reads_the_attached_meter(box: Box) -> None:
    reads = box.log.count(" records, ")  # "meter <source> on <port>: N records, M new"
    r = finished(command(box, "read_now"))
    assert (r["status"], r["code"], r["data"]["ports"]) == ("ok", "scheduled", 1)
    assert box.system.wait_for(lambda: box.log.count(" records, ") > reads, timeout=20)


def test_resend_requeues_retained_records(box: Box) -> None:
    dups = box.system.db.counter("duplicates")
    r = finished(command(box, "resend", "first=1", "last=5"))
    assert (r["status"], r["code"], r["data"]["requeued"]) == ("ok", "requeued", 5)
    assert box.system.wait_for(lambda: box.system.db.counter("duplicates") >= dups + 5, timeout=20)
    r = finished(command(box, "resend", "first=900000", "last=900010"))
    assert (r["status"], r["code"]) == ("failed", "not_retained")


def test_diagnostics_has_health_and_log_lines_but_no_secrets(box: Box) -> None:
    proc = command(box, "diagnostics", "lines=40")
    r = finished(proc)
    assert (r["status"], r["code"]) == ("ok", "snapshot")
    assert r["data"]["health"]["buffer_depth"] == 0 and 0 < len(r["data"]["log"]) <= 40
    assert any("command" in line for line in r["data"]["log"])
    key = load_key(box.state / "device.key")
    pem_lines = [ln for ln in serialization.load_pem_private_key((box.state / "device.key").read_bytes(), None)
                 .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode().splitlines() if "-----" not in ln]  # fmt: skip
    assert pem_lines
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    for secret in (*pem_lines, raw.hex(), PATIENT, box.token):
        assert secret not in proc.stdout


# --- exactly once ---------------------------------------------------------------------------------
def test_a_command_sent_while_the_box_is_offline_runs_once_on_return(box: Box) -> None:
    os.killpg(box.agent.pid, signal.SIGTERM)
    box.agent.wait(15)
    proc = command(box, "ping", background=True)
    assert proc.stderr is not None
    cmd_id = proc.stderr.readline().split()[1].rstrip(":")  # "command <id>: ping -> <device>"
    assert box.system.wait_for(lambda: stored_result(box.system.db, box.device_id, cmd_id) is not None, 20)
    box.start()
    r = finished(proc)
    assert (r["status"], r["code"]) == ("ok", "pong")
    assert box.log.count(f"command {r['id']} (ping) started") == 1


def test_sigkill_mid_sync_time_is_not_run_again_with_a_stale_time(box: Box, cloud: Cloud) -> None:
    """After a crash the box cannot tell how old the cloud's time is: the command is reported
    interrupted (the cloud sends a fresh one) rather than setting a stale clock marked synced."""
    flag = box.state.parent / "settime.slow"
    flag.touch()
    before = len(box.calls("settime"))
    b = body(box, "sync_time", {"time": time.time()})
    try:
        cloud.publish(envelope(box, b))
        assert box.system.wait_for(lambda: len(box.calls("settime")) > before, 20)
        box.kill()  # the agent and its script, in the middle of the script
        flag.unlink()
        box.start()
        r, _ = cloud.result(lambda r: r.id == b["id"], timeout=30)
    finally:
        flag.unlink(missing_ok=True)
    assert (r.status, r.code) == ("failed", "interrupted")
    assert [c.split()[0] for c in box.calls("settime")[before:]] == ["start"]  # cut off, never run again


def test_an_idempotent_command_cut_off_by_a_crash_runs_once_more_and_reports_once(box: Box, cloud: Cloud) -> None:
    """The journal says started, the envelope is kept: what a SIGKILL mid-command leaves behind."""
    box.kill()
    b = body(box, "ping")
    (box.state / "commands" / "pending" / f"{b['id']}.cose").write_bytes(envelope(box, b))
    con = sqlite3.connect(box.state / "buffer.db")
    with con:
        con.execute(
            "INSERT INTO commands (id, type, received_at, state) VALUES (?, 'ping', ?, 'started')", (b["id"], time.time())
        )
    con.close()
    box.start()
    r, _ = cloud.result(lambda r: r.id == b["id"], timeout=30)
    assert (r.status, r.code) == ("ok", "pong")
    assert box.log.count(f"command {b['id']} (ping) is idempotent: running it once more") == 1


def test_a_renewal_whose_swap_finished_before_a_crash_is_reported_renewed(box: Box, cloud: Cloud) -> None:
    """Crash after the new key was swapped in but before the journal said done: the live key differs
    from the one recorded at the start, so the renewal is reported done, not failed."""
    box.kill()
    b = body(box, "renew_certificate")
    (box.state / "commands" / "pending" / f"{b['id']}.kid").write_text("00" * 16)  # "the key before" != live key
    con = sqlite3.connect(box.state / "buffer.db")
    with con:
        con.execute(
            "INSERT INTO commands (id, type, received_at, state) VALUES (?, 'renew_certificate', ?, 'started')",
            (b["id"], time.time()),
        )
    con.close()
    box.start()
    r, _ = cloud.result(lambda r: r.id == b["id"], timeout=30)
    assert (r.status, r.code) == ("ok", "renewed")


def test_a_command_acknowledged_to_the_broker_but_not_yet_journaled_survives_a_kill(box: Box, cloud: Cloud) -> None:
    """The PUBACK goes out only after the command is stored; one stored and then cut off by SIGKILL
    (before the worker journaled it) is handled at the next start, once."""
    box.kill()
    b = body(box, "ping")
    inbox = box.state / "commands" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / f"{time.time_ns():020d}.cose").write_bytes(envelope(box, b))  # exactly what submit() leaves behind
    box.start()
    r, _ = cloud.result(lambda r: r.id == b["id"], timeout=30)
    assert (r.status, r.code) == ("ok", "pong")
    assert box.log.count(f"command {b['id']} (ping) started") == 1
    assert not list(inbox.glob("*.cose"))


def test_sigkill_mid_reboot_is_not_repeated_and_reported_rebooted(box: Box, cloud: Cloud) -> None:
    flag = box.state.parent / "reboot.slow"
    flag.touch()
    before = len(box.calls("reboot"))
    b = body(box, "reboot")
    try:
        cloud.publish(envelope(box, b))
        assert box.system.wait_for(lambda: len(box.calls("reboot")) > before, 20)
        box.kill()
        flag.unlink()
        box.start()
        r, _ = cloud.result(lambda r: r.id == b["id"], timeout=30)
    finally:
        flag.unlink(missing_ok=True)
    assert (r.status, r.code) == ("ok", "rebooted")
    assert len(box.calls("reboot")) == before + 1  # never run a second time


def test_reboot_that_takes_the_agent_down_is_reported_after_restart(box: Box) -> None:
    flag = box.state.parent / "reboot.term"
    flag.touch()
    try:
        proc = command(box, "reboot", background=True)
        box.agent.wait(30)  # the script sent SIGTERM, as init would
    finally:
        flag.unlink()
    box.start()
    r = finished(proc)
    assert (r["status"], r["code"]) == ("ok", "rebooted")


def test_replay_is_answered_from_the_journal_without_running_again(box: Box, cloud: Cloud) -> None:
    before = len(box.calls("settime"))
    b = body(box, "sync_time", {"time": time.time()})
    env = envelope(box, b)
    cloud.publish(env)
    first, raw1 = cloud.result(lambda r: r.id == b["id"])
    cloud.publish(env)
    _again, raw2 = cloud.result(lambda r: r.id == b["id"])
    assert raw1 == raw2 and first.status == "ok"
    assert len(box.calls("settime")) == before + 2  # one run: start + end
    assert f"command {b['id']} (sync_time) replayed" in box.log


# --- refusals ---------------------------------------------------------------------------------------
def test_every_bad_input_is_refused_with_a_result_and_a_log_line(box: Box, cloud: Cloud) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    good = envelope(box, body(box, "ping"))
    tampered = bytearray(good)
    tampered[-1] ^= 1
    cases: list[tuple[str, bytes, str]] = [
        ("malformed CBOR", b"\xa1\x61", "malformed"),
        ("not COSE", cbor2.dumps(body(box, "ping")), "malformed"),
        ("oversize", b"\x00" * (17 * 1024), "oversize"),
        ("bad signature", bytes(tampered), "bad_signature"),
        ("missing signature", cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -8}), {}, cbor2.dumps(body(box, "ping")), b""])), "bad_signature"),
        ("another key", envelope(box, body(box, "ping"), other), "bad_signature"),
        ("unknown type", envelope(box, body(box, "self_destruct")), "unknown_type"),
        ("other device", envelope(box, body(box, "ping", dev="gd-000000000000")), "wrong_device"),
        ("expired", envelope(box, body(box, "ping", iat=now - 7200, exp=now - 3600)), "expired"),
        ("wrong arg type", envelope(box, body(box, "sync_time", {"time": "soon"})), "bad_args"),
        ("out of range", envelope(box, body(box, "resend", {"first": 0, "last": 5})), "bad_args"),
        ("unknown arg", envelope(box, body(box, "ping", {"now": True})), "bad_args"),
        ("bool for int", envelope(box, body(box, "diagnostics", {"lines": True})), "bad_args"),
    ]  # fmt: skip
    for what, payload, code in cases:
        digest = hashlib.sha256(payload).hexdigest()[:16]
        cloud.publish(payload)
        r, _ = cloud.result(lambda r, d=digest: r.status == "refused" and r.data.get("sha256") == d)
        assert r.code == code, (what, r)
        assert f"refused ({code})" in box.log, what
    assert box.agent.poll() is None
    assert finished(command(box, "ping"))["status"] == "ok"  # and still serving


# --- certificate renewal, then deprovision ------------------------------------------------------------
def test_renew_certificate_swaps_in_a_new_key_and_certificate(box: Box) -> None:
    old_key = (box.state / "device.key").read_bytes()
    old_cert = (box.state / "device.crt").read_bytes()
    r = finished(command(box, "renew_certificate"))
    assert (r["status"], r["code"]) == ("ok", "renewed"), r
    new_key, new_cert = (box.state / "device.key").read_bytes(), (box.state / "device.crt").read_bytes()
    assert new_key != old_key and new_cert != old_cert
    leaf = x509.load_pem_x509_certificate(new_cert)
    key = load_key(box.state / "device.key")
    assert cose.key_id(leaf.public_key()) == cose.key_id(key.public_key())  # type: ignore[arg-type]
    assert r["data"]["kid"] == cose.key_id(key.public_key()).hex()
    assert not (box.state / "renew").exists()
    box.restart()  # the new pair logs in, and results signed with the new key verify
    assert finished(command(box, "ping"))["status"] == "ok"
    assert box.system.db.records(device_id=box.device_id, kind="reading")  # old records still verify as stored


def test_renewal_csr_for_a_command_we_did_not_send_is_ignored(box: Box) -> None:
    from backend.commands import issue_renewal

    fake = Result("tnever-sent-1", box.device_id, "pending", "csr", "", {"csr": b"x"})
    keys = box.system.home.keys()
    assert issue_renewal(box.system.db, fake, sign_csr=keys.sign_csr, ca_pem=keys.ca_pem, command_key=keys.command_key) is None
    record_sent(box.system.db, box.device_id, "tsent-ping-01", "ping")
    fake = dataclasses.replace(fake, id="tsent-ping-01")
    assert issue_renewal(box.system.db, fake, sign_csr=keys.sign_csr, ca_pem=keys.ca_pem, command_key=keys.command_key) is None


def test_deprovision_refuses_unsent_readings_unless_forced(box: Box) -> None:
    system = box.system
    system.stop_backend()  # no acks: new readings stay unsent
    try:
        records = system.run / "meter2.json"
        records.write_text(dumps(random_records("onetouch-ultra2", 20, seed=6)))
        link = system.run / "ttyCMD"
        for proc in list(system.procs):
            if proc.args and "simulate" in proc.args:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                system.procs.remove(proc)
        system.start_simulator("onetouch-ultra2", link, records)
        assert finished(command(box, "read_now"))["status"] == "ok"

        def unsent() -> int:
            return int(finished(command(box, "diagnostics", "lines=1"))["data"]["health"]["buffer_depth"])

        assert system.wait_for(lambda: unsent() > 0, timeout=30), box.log[-2000:]
        r = finished(command(box, "deprovision"))
        assert (r["status"], r["code"]) == ("failed", "unsent_readings")
        assert (box.state / "device.key").exists()
        r = finished(command(box, "deprovision", "force=true"))
        assert (r["status"], r["code"]) == ("ok", "deprovisioned")
        assert box.agent.wait(30) == 0
        assert sorted(p.name for p in box.state.iterdir()) == ["factory"]
    finally:
        system.start_backend()
