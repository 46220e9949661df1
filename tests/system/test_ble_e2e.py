"""BLE meters end to end: simulated GLS meter and BLS cuff on bumble virtual controllers (ptys), paired with
`glucoagent pair` and the passkey they show, read by the running agent, signed, buffered and uploaded over
real mosquitto with mutual TLS to the reference backend; every record verified there, exactly once.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ble_source import DEVICES, KEYSTORE
from drivers.simulators import ble_bp, ble_glucose
from testbed.harness import LocalSystem, device_config

GLS, BP = ble_glucose.DEFAULT_ADDRESS, ble_bp.DEFAULT_ADDRESS


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("ble-e2e")) as s:
        yield s


def ble_config(path: Path, radios: dict[str, Path]) -> Path:
    device_config(path, [])
    lines = [f"config ble '{name}'\n\toption port '{link}'\n\toption scan_s '1'\n\toption connect_s '3'\n"
             for name, link in radios.items()]  # fmt: skip
    path.write_text(path.read_text() + "\n" + "\n".join(lines))
    return path


def snapshot(state: Path) -> dict[str, object]:
    try:
        data = json.loads((state / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    assert isinstance(data, dict)
    return data


def last_seen(state: Path) -> dict[str, float]:
    meters = snapshot(state).get("meters") or []
    assert isinstance(meters, list)
    return {m["source"]: m["last_seen"] for m in meters if m["source"].startswith("ble-")}


def test_pair_read_exactly_once_nothing_new_then_only_the_new(system: LocalSystem) -> None:
    gls_link, bp_link = system.run / "ttyBLEgls", system.run / "ttyBLEbp"
    # The meter runs in this process (serve_in_thread) so that it can take new records while bonded; the agent
    # opens its controller's pty exactly as it opens a real UART.
    meter = ble_glucose.GlucoseMeter(ble_glucose.demo_records(300))
    thread, stop = ble_glucose.serve_in_thread(meter, str(gls_link))
    try:
        assert system.wait_for(gls_link.exists, timeout=15)
        _pair_and_read(system, meter, gls_link, bp_link)
    finally:
        stop.set()
        thread.join(10)


def _pair_and_read(system: LocalSystem, meter: ble_glucose.GlucoseMeter, gls_link: Path, bp_link: Path) -> None:
    system.start_simulator("ble-bp", bp_link, None, "--count", "40")
    state = system.device_dir("ble-device")
    prov = system.provision(state, "patient-ble")
    assert prov.returncode == 0, prov.stdout + prov.stderr
    device_id = prov.stdout.strip().rsplit(" ", 1)[-1]
    config = ble_config(state / "glucoagent.uci", {"gls": gls_link, "cuff": bp_link})

    # The technician's job: a wrong passkey is its own error; then the right one bonds.
    wrong = system.glucoagent(state, "pair", "--radio", "gls", GLS, "--passkey", "111111", config=config)
    assert wrong.returncode == 25 and wrong.stderr.startswith("glucoagent: error: "), wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    ok = system.glucoagent(
        state, "pair", "--radio", "gls", "--passkey", str(ble_glucose.DEFAULT_PASSKEY), config=config
    )
    assert ok.returncode == 0, ok.stderr
    assert GLS in ok.stdout and "glucose" in ok.stdout and "dBm" in ok.stdout  # the list it chose from
    ok = system.glucoagent(
        state, "pair", "--radio", "cuff", BP, "--passkey", str(ble_bp.DEFAULT_PASSKEY), config=config
    )
    assert ok.returncode == 0, ok.stderr
    assert stat.S_IMODE((state / KEYSTORE).stat().st_mode) == 0o600
    devices = json.loads((state / DEVICES).read_text())
    assert devices[GLS]["kind"] == "glucose" and devices[BP]["kind"] == "blood-pressure"

    agent = system.start_agent(state, config)
    log = state / "agent.log"

    def count(kind: str) -> int:
        return len(system.db.records(device_id=device_id, kind=kind))

    assert system.wait_for(lambda: count("reading") >= 300 and count("bp") >= 40, timeout=180), log.read_text()[-3000:]
    readings = system.db.records(device_id=device_id, kind="reading")
    want = {f"gls:{r.sequence}:{r.time.isoformat()}": r.mgdl for r in ble_glucose.demo_records(300)}
    assert {r.fields["glu:key"]: r.fields["glu:mgdl"] for r in readings} == want
    assert len(readings) == 300  # exactly once
    assert all(r.fields["glu:meter"] == GLS for r in readings)
    bps = system.db.records(device_id=device_id, kind="bp")
    assert len(bps) == 40 and len({r.fields["bp:key"] for r in bps}) == 40
    assert all(r.fields["bp:device"] == BP and "bp:150021" in r.fields and "bp:150022" in r.fields for r in bps)
    assert snapshot(state).get("ble_loaded") is True

    # More rounds (scan_s 1): the meter's "report >= 300" returns only the record already held; the cuff sends
    # its 40 again and the ledger drops them.
    clinical = len([r for r in system.db.records(device_id=device_id) if r.stream == "c"])
    assert system.wait_for(lambda: snapshot(state).get("next_seq") == clinical + 1, timeout=20)  # a fresh snapshot
    next_seq = snapshot(state)["next_seq"]
    for _ in range(2):
        since = time.time()
        assert system.wait_for(lambda t=since: min(last_seen(state).values(), default=0) > t, timeout=60)
    assert snapshot(state)["next_seq"] == next_seq  # nothing new accepted into the buffer
    assert (count("reading"), count("bp")) == (300, 40)

    # The meter takes 10 more: only those are uploaded.
    meter.add_records(ble_glucose.demo_records(310)[300:])
    assert system.wait_for(lambda: count("reading") >= 310, timeout=90), log.read_text()[-3000:]
    time.sleep(3)
    readings = system.db.records(device_id=device_id, kind="reading")
    assert len(readings) == 310 and len({r.fields["glu:key"] for r in readings}) == 310
    assert agent.poll() is None

    status = system.glucoagent(state, "status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    sources = {m["source"]: m for m in json.loads(status.stdout)["meters"]}
    assert sources[f"ble-glucose:{GLS}"]["last_seen"] > 0 and sources[f"ble-bp:{BP}"]["last_seen"] > 0
    bonded = {d["address"]: d for d in json.loads(status.stdout)["ble_devices"]}
    assert (
        bonded[GLS]["kind"] == "glucose" and bonded[GLS]["last_contact"] == sources[f"ble-glucose:{GLS}"]["last_seen"]
    )
    assert bonded[BP]["kind"] == "blood-pressure" and bonded[BP]["radio"] == "cuff"
    text = system.glucoagent(state, "status", config=config).stdout
    assert f"bonded:         {GLS}" in text and "last contact 20" in text
    text = log.read_text()
    assert str(ble_glucose.DEFAULT_PASSKEY) not in text and str(ble_bp.DEFAULT_PASSKEY) not in text


def test_a_box_without_ble_never_loads_the_ble_stack(system: LocalSystem) -> None:
    state = system.device_dir("no-ble-device")
    prov = system.provision(state, "patient-no-ble")
    assert prov.returncode == 0, prov.stdout + prov.stderr
    config = device_config(state / "glucoagent.uci", [])
    agent = system.start_agent(state, config)
    assert system.wait_for(lambda: "ble_loaded" in snapshot(state), timeout=30), (state / "agent.log").read_text()
    assert snapshot(state)["ble_loaded"] is False  # sys.modules of the running agent holds no drivers.ble.central
    assert agent.poll() is None
    out = system.glucoagent(state, "pair", config=config)
    assert out.returncode != 0 and out.stderr.startswith("glucoagent: error: no BLE controller configured")
