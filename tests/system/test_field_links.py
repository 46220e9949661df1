"""Networks that allow only 443, and HTTP proxies: real mosquitto (its websockets listener beside the TLS
one, same PKI, plugin and ACLs), real tinyproxy 1.11, real `glucoagent run` and `check` processes.

What must hold: every reading once over WebSockets/TLS and through the proxy on both transports; the
plugin's client-id binding and the ACL on the websockets listener as on 8883; a proxy that refuses (403),
asks for credentials (407) or is not there gives one clear line and its exit code in `check`; a proxy
killed mid-upload loses nothing; falling back from 8883 to 443 when the proxy refuses 8883; the link
faults of tests/test_link_faults.py (black hole noticed within 1.5 x keepalive, RST, flapping) on these
paths too; the proxy password never appears in a log or in `check`'s output.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import TcpProxy

from agent.errors import NotAuthorized
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from backend.pki import ClientCreds, FleetPki, generate_key, make_csr
from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config, stop_process
from testbed.httpproxy import Tinyproxy

KEEPALIVE_S = 5
MQTT = {
    "keepalive": str(KEEPALIVE_S),
    "backoff_min_s": "0.5",
    "backoff_cap_s": "3",
    "stable_s": "6",
    "ack_timeout_s": "5",
    "connect_timeout_s": "3",
    "batch_records": "5",
    "inflight": "1",
}
USER, PASSWORD = "tech", "s3cret-Pa55"
CONNECTED = "uplink: connected to"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    s = LocalSystem(tmp_path_factory.mktemp("field"))
    s.broker.websockets = True  # the second listener: MQTT over WebSockets with TLS
    with s:
        yield s


def ws_url(port: int) -> str:
    return f"wss://localhost:{port}/mqtt"


@dataclasses.dataclass
class Box:
    system: LocalSystem
    state: Path
    device_id: str
    n: int
    meter: list[tuple[str, int]]
    agent: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")

    def connects(self) -> int:
        return self.log().count(CONNECTED)

    def readings(self) -> int:
        rows = self.system.db.query(
            "SELECT count(*) FROM records WHERE device_id = ? AND kind = 'reading'", (self.device_id,)
        )
        return int(rows[0][0])

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not self.system.wait_for(predicate, timeout, poll=0.05):
            pytest.fail(f"{what}: not within {timeout}s\n--- agent.log (tail) ---\n{self.log()[-3000:]}")

    def assert_every_reading_exactly_once(self) -> None:
        stored = self.system.db.records(device_id=self.device_id, kind="reading")
        got = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in stored]
        assert sorted(got) == sorted(self.meter)
        clinical = [r.seq for r in self.system.db.records(device_id=self.device_id) if r.stream == "c"]
        assert clinical == list(range(1, len(clinical) + 1))

    def check(self, **mqtt: str) -> subprocess.CompletedProcess[str]:
        config = device_config(self.state / "check.uci", [], mqtt={**MQTT, **mqtt})
        return self.system.glucoagent(self.state, "check", config=config)


def write_password(state: Path) -> None:
    secret = state / "proxy_password"
    secret.touch(0o600)
    secret.write_text(PASSWORD + "\n")


@pytest.fixture
def boxes(system: LocalSystem, tmp_path: Path) -> Iterator[Callable[..., Box]]:
    """``boxes(n, **mqtt)``: a provisioned box with a simulated Ultra 2 holding ``n`` readings; ``run=False``:
    not started (for `check`)."""

    def make(n: int, *, run: bool = True, seed: int = 11, password_file: bool = True, **mqtt: str) -> Box:
        name = f"box-{len(list(system.run.glob('box-*')))}"
        state = system.device_dir(name)
        prov = system.provision(state)
        assert prov.returncode == 0, prov.stdout + prov.stderr
        device_id = prov.stdout.split()[-1]
        if password_file:
            write_password(state)
        readings = random_records("onetouch-ultra2", n, seed=seed)
        box = Box(system, state, device_id, n, [(r.meter_time.isoformat(), r.value_mgdl) for r in readings])
        if run:
            records = tmp_path / f"{name}.json"
            records.write_text(dumps(readings))
            link = tmp_path / f"tty-{name}"
            system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
            config = device_config(state / "glucoagent.uci", [(str(link), "onetouch-ultra2")], mqtt={**MQTT, **mqtt})
            box.agent = system.start_agent(state, config)
        return box

    yield make
    for proc in list(system.procs):
        stop_process(proc)
        system.procs.remove(proc)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    started: list[Tinyproxy] = []

    def make(**kwargs: object) -> Tinyproxy:
        p = Tinyproxy(tmp_path / f"tinyproxy-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(p)
        p.start()
        return p

    yield make
    for p in started:
        p.stop()


def _ws_link(pki: FleetPki, creds: ClientCreds, port: int, client_id: str) -> MqttLink:
    settings = LinkSettings(
        "localhost", port, client_id, TlsFiles(pki.ca_path, creds.cert, creds.key), transport="websockets", clean_start=True
    )
    return MqttLink(settings)


def _outcome(link: MqttLink, mid: int) -> bool | None:
    deadline = time.monotonic() + 10
    while (done := link.acked(mid)) is None and time.monotonic() < deadline:
        link.loop(0.1)
    return done


# --- the websockets listener --------------------------------------------------------------------


def test_websockets_listener_binds_client_id_to_certificate_and_applies_acls(system: LocalSystem) -> None:
    pki = system.home.pki
    port = system.broker.ws_port
    key = generate_key("ed25519")
    mine = pki.write_device_creds("dev-ws-1", key, pki.sign_device_csr(make_csr(key), "dev-ws-1", 30))
    link = _ws_link(pki, mine, port, "dev-ws-1")
    link.connect()  # paho 2.x, transport="websockets", TLS, client certificate
    try:
        assert link.connected
        own = link.publish("gluco/v1/dev/dev-ws-1/health", b"y")
        other = link.publish("gluco/v1/dev/dev-ws-2/health", b"y")  # another device's topic
        assert _outcome(link, own) is True
        assert _outcome(link, other) is False  # MQTT 5 PUBACK 0x87 Not authorized: the ACL holds
    finally:
        link.disconnect()
    with pytest.raises(NotAuthorized):  # the plugin reads the certificate on this listener too
        _ws_link(pki, mine, port, "dev-ws-2").connect()
    assert "refused client id dev-ws-2 for certificate dev-ws-1" in system.broker.log_text()


def test_websockets_listener_requires_a_client_certificate(system: LocalSystem) -> None:
    ctx = ssl.create_default_context(cafile=str(system.home.pki.ca_path))  # no client certificate
    raw = socket.create_connection(("127.0.0.1", system.broker.ws_port), timeout=5)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)), ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if not tls.recv(1):
                raise ConnectionResetError("closed without a certificate")
    finally:
        raw.close()


# --- every reading once ----------------------------------------------------------------------------


def test_every_reading_once_over_websockets(system: LocalSystem, boxes: Callable[..., Box]) -> None:
    box = boxes(30, transport="websockets", ws_endpoint=system.broker.ws_endpoint)
    box.wait(lambda: box.readings() == box.n, 60, "all readings over websockets")
    box.assert_every_reading_exactly_once()
    assert f"{CONNECTED} {system.broker.ws_endpoint} as {box.device_id}" in box.log()


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_every_reading_once_through_an_authenticating_proxy(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy], transport: str
) -> None:
    proxy = tinyproxy(connect_ports=(system.broker.port, system.broker.ws_port), basic_auth=(USER, PASSWORD))
    box = boxes(30, transport=transport, ws_endpoint=system.broker.ws_endpoint, proxy=proxy.url)
    box.wait(lambda: box.readings() == box.n, 60, f"all readings through the proxy ({transport})")
    box.assert_every_reading_exactly_once()
    assert f"via proxy {proxy.url}" in box.log()
    assert "CONNECT localhost" in proxy.log_path.read_text()  # it really went through tinyproxy
    assert PASSWORD not in box.log()


def test_check_names_the_way_and_each_proxy_failure(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy]
) -> None:
    box = boxes(0, run=False)
    authp = tinyproxy(connect_ports=(system.broker.port, system.broker.ws_port), basic_auth=(USER, PASSWORD))
    port_only = authp.url.rsplit(":", 1)[1]

    ok = box.check(proxy=authp.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"MQTT login: as {box.device_id} over mqtts://localhost:{system.broker.port} via proxy {authp.url}" in ok.stdout
    assert PASSWORD not in ok.stdout + ok.stderr

    no_creds = box.check(proxy=f"http://127.0.0.1:{port_only}")
    assert no_creds.returncode == 48, no_creds.stdout
    assert "asks for credentials (407" in no_creds.stdout
    assert "none are configured" in no_creds.stdout

    (box.state / "wrong").write_text("not-it")
    (box.state / "wrong").chmod(0o600)
    wrong = box.check(proxy=authp.url, proxy_password_file=str(box.state / "wrong"))
    assert wrong.returncode == 48, wrong.stdout
    assert "the configured user or password was refused" in wrong.stdout

    strict = tinyproxy(connect_ports=(443,))  # a proxy that tunnels only to 443
    refused = box.check(proxy=strict.url)
    assert refused.returncode == 47, refused.stdout
    assert f"refused the tunnel to localhost:{system.broker.port} (403" in refused.stdout

    dead = box.check(proxy="http://127.0.0.1:9")  # nothing listens there
    assert dead.returncode == 41, dead.stdout
    assert "proxy http://127.0.0.1:9 refused the connection" in dead.stdout

    (box.state / "proxy_password").chmod(0o644)
    loose = box.check(proxy=authp.url)
    assert loose.returncode == 10, loose.stdout
    assert "chmod 600" in loose.stdout
    (box.state / "proxy_password").chmod(0o600)


def test_missing_proxy_password_is_retried_until_the_file_is_there(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy]
) -> None:
    proxy = tinyproxy(connect_ports=(system.broker.port,), basic_auth=(USER, PASSWORD))
    box = boxes(5, proxy=proxy.url, password_file=False)
    missing = f"mqtt.proxy_password_file: {box.state / 'proxy_password'} not found; retrying"
    box.wait(lambda: missing in box.log(), 20, "the error")
    assert box.agent is not None and box.agent.poll() is None  # waiting for a fix, not exiting into a respawn loop
    write_password(box.state)  # the technician's fix: no restart needed
    box.wait(lambda: box.readings() == box.n, 60, "all readings once the password file is there")
    box.assert_every_reading_exactly_once()
    assert PASSWORD not in box.log()


def test_falls_back_to_443_when_the_proxy_refuses_8883(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy]
) -> None:
    proxy = tinyproxy(connect_ports=(system.broker.ws_port,))  # the "443 only" network
    ws = system.broker.ws_endpoint
    box = boxes(20, transport="auto", ws_endpoint=ws, proxy=proxy.url)
    box.wait(lambda: box.readings() == box.n, 60, "all readings after falling back")
    box.assert_every_reading_exactly_once()
    assert f"now connecting by {ws} via proxy {proxy.url}" in box.log()
    checked = box.check(transport="auto", ws_endpoint=ws, proxy=proxy.url)
    assert checked.returncode == 0, checked.stdout
    assert f"warn   mqtts://localhost:{system.broker.port} via proxy {proxy.url} did not work" in checked.stdout
    assert f"over {ws} via proxy" in checked.stdout


def test_proxy_killed_mid_upload_loses_nothing(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy]
) -> None:
    proxy = tinyproxy(connect_ports=(system.broker.port,), basic_auth=(USER, PASSWORD))
    fault = TcpProxy(proxy.port, latency_s=0.05).start()  # slows the upload so the kill lands in the middle
    try:
        box = boxes(150, seed=12, proxy=f"http://{USER}@127.0.0.1:{fault.port}")
        box.wait(lambda: box.readings() >= 10, 60, "upload started")
        proxy.kill()  # every tunnel breaks at once
        at_kill = box.readings()
        assert at_kill < box.n
        time.sleep(1.0)
        proxy.start()  # same port
        box.wait(lambda: box.readings() == box.n, 90, "all readings after the proxy came back")
        assert box.connects() >= 2
        box.assert_every_reading_exactly_once()
        print(f"proxy killed at {at_kill} of {box.n} readings; {box.connects()} connections")
    finally:
        fault.close()


# --- the link faults on these paths ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["websockets", "proxy-tcp", "proxy-websockets", "beyond-proxy-tcp", "beyond-proxy-websockets"])
def test_black_hole_rst_and_flapping_on_field_paths(
    system: LocalSystem, boxes: Callable[..., Box], tinyproxy: Callable[..., Tinyproxy], path: str
) -> None:
    """The fault proxy sits where the network misbehaves: before the websockets listener, between the box
    and the HTTP proxy, or beyond the HTTP proxy (its tunnel to the broker dies while the box's own TCP
    connection to the proxy stays up: only the box's keepalive can tell)."""
    if path == "websockets":
        fault = TcpProxy(system.broker.ws_port).start()
        mqtt = {"transport": "websockets", "ws_endpoint": ws_url(fault.port)}
    elif path.startswith("beyond-proxy-"):
        transport = path.removeprefix("beyond-proxy-")
        fault = TcpProxy(system.broker.ws_port if transport == "websockets" else system.broker.port).start()
        hp = tinyproxy(connect_ports=(fault.port,))
        mqtt = {"transport": transport, "proxy": hp.url}
        if transport == "websockets":
            mqtt["ws_endpoint"] = ws_url(fault.port)
        else:
            mqtt["endpoint"] = f"mqtts://localhost:{fault.port}"
    else:
        hp = tinyproxy(connect_ports=(system.broker.port, system.broker.ws_port))
        fault = TcpProxy(hp.port).start()
        transport = path.removeprefix("proxy-")
        mqtt = {"transport": transport, "ws_endpoint": system.broker.ws_endpoint, "proxy": f"http://127.0.0.1:{fault.port}"}
    try:
        box = boxes(120, seed=13, **mqtt)
        box.wait(lambda: box.readings() >= 5 and box.connects() == 1, 60, "first upload")

        start = time.monotonic()
        fault.black_hole()
        box.wait(lambda: any(t > start for t in fault.client_closed_at), 3 * KEEPALIVE_S, "agent closing the dead link")
        detected = min(t for t in fault.client_closed_at if t > start) - start
        print(f"{path}: dead link detected after {detected:.2f}s (keepalive {KEEPALIVE_S}s)")
        assert detected <= 1.5 * KEEPALIVE_S
        fault.forward()
        box.wait(lambda: box.connects() >= 2, 2 * KEEPALIVE_S + 10, "reconnect after the black hole")

        fault.cut(rst=True)
        box.wait(lambda: box.connects() >= 3, 15, "reconnect after RST")
        cuts = fault.cuts
        fault.flap(1.5)
        box.wait(lambda: fault.cuts >= cuts + 3, 30, "three flaps while connected")
        fault.steady()
        box.wait(lambda: box.readings() == box.n, 90, "all readings after the faults")
        box.assert_every_reading_exactly_once()
        assert box.agent is not None and box.agent.poll() is None
    finally:
        fault.close()


# --- the technician's enrolment on such a network -------------------------------------------------


def test_provisioning_takes_the_configured_proxy_and_falls_back_to_443(
    system: LocalSystem, tinyproxy: Callable[..., Tinyproxy]
) -> None:
    """A network where only the proxy leads out and the proxy tunnels only to 443: `glucoagent provision`
    with the box's config goes through the proxy, falls back to WebSockets, enrols and confirms."""
    proxy = tinyproxy(connect_ports=(system.broker.ws_port,), basic_auth=(USER, PASSWORD))
    state = system.device_dir("box-enrol-proxy")
    write_password(state)
    config = device_config(
        state / "glucoagent.uci", [], mqtt={**MQTT, "proxy": proxy.url, "ws_endpoint": ws_url(system.broker.ws_port)}
    )
    token = system.token("patient-proxy")
    prov = system.glucoagent(
        state, "provision", "--endpoint", system.broker.endpoint, f"--token={token}", "--patient=patient-proxy",
        config=config,
    )  # fmt: skip
    assert prov.returncode == 0, prov.stdout + prov.stderr
    assert "wss://" in prov.stdout and f"via proxy {proxy.url}" in prov.stdout, prov.stdout
    assert PASSWORD not in prov.stdout + prov.stderr
    log = proxy.log_path.read_text(errors="replace")
    assert f"Refused CONNECT method on port {system.broker.port}" in log, log[-2000:]  # 8883's way tried first
    assert f"CONNECT localhost:{system.broker.ws_port}" in log, log[-2000:]  # then 443's, which enrolled
    assert (state / "device.json").exists()
