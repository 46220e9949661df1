"""Signed commands under mqtt.profile azure: sent as C2D messages while the box is offline, executed once
when it comes back; past the C2D time to live the hub drops them and nothing runs."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from testbed.clouds.azure_fake import AzureSystem
from testbed.harness import BIN, device_config, stop_process

BACKEND_CLI = str(BIN / "glucoagent-backend")
SETTIME = '#!/bin/sh\necho "$1" >> "{calls}"\nexit 0\n'


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureSystem]:
    with AzureSystem(tmp_path_factory.mktemp("azure-cmd")) as s:
        yield s


class Box:
    def __init__(self, hub: AzureSystem) -> None:
        self.hub = hub
        self.state = hub.device_dir("cmd-box")
        self.device_id = hub.enrol(self.state)
        self.calls = self.state.parent / "settime.calls"
        script = self.state.parent / "settime.sh"
        script.write_text(SETTIME.format(calls=self.calls))
        script.chmod(0o755)
        self.config = device_config(
            self.state / "glucoagent.uci",
            [],
            agent={"settime_command": f"{script} {{epoch}}", "health_interval_s": "3600"},
            mqtt=hub.mqtt_options(backoff_min_s="0.1", backoff_cap_s="1"),
        )
        self.agent: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")

    def start(self) -> None:
        mark = self.log().count("uplink: connected to") if (self.state / "agent.log").exists() else 0
        self.agent = self.hub.start_agent(self.state, self.config)
        assert self.hub.wait_for(lambda: self.log().count("uplink: connected to") > mark, 20), self.log()[-2000:]

    def stop(self) -> None:
        assert self.agent is not None
        stop_process(self.agent)
        self.hub.procs.remove(self.agent)
        self.agent = None

    def runs(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def sync_time(self, *, ttl: float, timeout: float) -> subprocess.Popen[str]:
        argv = [BACKEND_CLI, "command", self.device_id, "sync_time", f"time={time.time():.0f}", "--cloud", "azure", "--home", str(self.hub.home.root),
                "--port", str(self.hub.broker.port), "--ttl", str(ttl), "--timeout", str(timeout)]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def box(hub: AzureSystem) -> Box:
    b = Box(hub)
    b.start()  # the session (and its C2D subscription) exists from now on
    b.stop()
    return b


def test_command_sent_while_offline_runs_once_when_the_box_returns(box: Box) -> None:
    assert box.runs() == 0
    proc = box.sync_time(ttl=600, timeout=60)
    time.sleep(3)  # the box is offline: the hub keeps the C2D message in the device's queue
    assert box.runs() == 0
    box.start()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "ok", result
    assert box.runs() == 1
    box.stop()
    box.start()  # a reconnect redelivers nothing that already ran
    time.sleep(3)
    assert box.runs() == 1
    box.stop()


def test_a_command_past_its_c2d_ttl_never_reaches_the_box(box: Box) -> None:
    before = box.runs()
    proc = box.sync_time(ttl=2, timeout=8)
    time.sleep(4)  # past the time to live while offline: the hub drops the message
    box.start()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "no result from" in err
    time.sleep(2)
    assert box.runs() == before
    assert "(sync_time) started" not in box.log().split("uplink: connected to")[-1]
    box.stop()


def test_a_command_as_a_direct_method_is_answered_after_it_is_stored(box: Box) -> None:
    """The direct method `command` (JSON {"cose": base64}) from the service side; the box answers on
    $iothub/methods/res/200/?$rid=... once the command is stored, then runs it once."""
    import queue

    from agent.wire.azure import command_method_payload
    from backend.commands import sign_command
    from backend.mqtt_client import BackendLink, link_settings

    got: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    service = BackendLink(
        link_settings("localhost", box.hub.broker.port, box.hub.home.backend_tls()), on_message=lambda t, p: got.put((t, p))
    )
    service.connect()
    try:
        service.subscribe(["$iothub/methods/res/#"])
        box.start()
        before = box.runs()
        _cmd_id, envelope = sign_command(box.hub.home.command_key, box.device_id, "sync_time", {"time": time.time()}, ttl_s=60)
        service.publish("$iothub/methods/POST/command/?$rid=77", command_method_payload(envelope))
        deadline = time.monotonic() + 20
        answer: tuple[str, bytes] | None = None
        while answer is None and time.monotonic() < deadline:
            service.loop(0.1)
            while not got.empty():
                answer = got.get_nowait()
        assert answer is not None, box.log()[-2000:]
        assert answer[0] == "$iothub/methods/res/200/?$rid=77"
        assert json.loads(answer[1]) == {"stored": True}
        assert box.hub.wait_for(lambda: box.runs() == before + 1, 20), box.log()[-2000:]
        box.stop()
    finally:
        service.disconnect()
