"""Issue 16, step 2 through the real broker (TLS, ACLs, the client-id plugin) and the reference cloud:
a released package is pulled chunk by chunk on the box's ``<id>-update`` side connection, survives a
broker restart mid-way, and no other device can read or ask for it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Endpoint
from agent.identity.credentials import load_identity
from agent.link.mqtt import LinkSettings, MqttLink, TlsFiles
from agent.update.fetch import FetchPolicy, download
from agent.update.keys import load_release_key
from agent.update.staging import PROGRESS_FILE, UPDATE_DIR, UpdateFailed
from agent.wire import release
from agent.wire.release import CHUNK_BYTES, ChunkRequest, encode_chunk_request
from agent.wire.topics import DeviceTopics
from testbed.harness import GLUCOAGENT, LocalSystem

BACKEND = str(Path(GLUCOAGENT).with_name("glucoagent-backend"))


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("upddel")) as s:
        yield s


def box(system: LocalSystem, name: str) -> tuple[Path, LinkSettings, DeviceTopics]:
    state = system.device_dir(name)
    out = system.provision(state, patient=f"patient-{name}")
    assert out.returncode == 0, out.stdout + out.stderr
    ident = load_identity(state)
    ep = Endpoint.parse(ident.endpoint)
    settings = LinkSettings(
        host=ep.host,
        port=ep.port,
        client_id=ident.device_id,
        tls=TlsFiles(ca=ident.ca_path, cert=ident.cert_path, key=ident.key_path),
        connect_timeout_s=5.0,
    )
    return state, settings, DeviceTopics(ident.device_id)


def released(system: LocalSystem, tmp: Path, data: bytes, name: str = "glucoagent_0.2.0-1_all.ipk") -> bytes:
    pkg = tmp / name
    pkg.write_bytes(data)
    out = subprocess.run(
        [BACKEND, "release", str(pkg), "--home", str(system.home.root)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return pkg.with_name(pkg.name + ".manifest").read_bytes()


def test_a_released_package_arrives_whole_and_verified(system: LocalSystem, tmp_path: Path) -> None:
    state, settings, topics = box(system, "good")
    data = os.urandom(5 * CHUNK_BYTES + 999)
    manifest = release.decode_manifest(released(system, tmp_path, data), load_release_key(state))
    path = download(state, settings, topics, manifest, FetchPolicy(chunk_timeout_s=5), threading.Event())
    assert path.read_bytes() == data
    assert hashlib.sha256(path.read_bytes()).digest() == manifest.sha256


def test_download_resumes_across_a_broker_restart(system: LocalSystem, tmp_path: Path) -> None:
    state, settings, topics = box(system, "resume")
    data = os.urandom(60 * CHUNK_BYTES)
    manifest = release.decode_manifest(released(system, tmp_path, data, "glucoagent_0.3.0-1_all.ipk"), load_release_key(state))
    progress = state / UPDATE_DIR / PROGRESS_FILE
    restarted: list[int] = []

    def restart_midway() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if progress.exists() and b'"next": 0' not in progress.read_bytes():
                restarted.append(int(progress.read_text().split('"next": ')[1].split(",")[0].rstrip("}")))
                system.broker.restart()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=restart_midway)
    killer.start()
    path = download(state, settings, topics, manifest, FetchPolicy(chunk_timeout_s=3), threading.Event())
    killer.join()
    assert restarted and 0 < restarted[0] < len(data)
    assert path.read_bytes() == data


def test_unreleased_package_stalls_with_a_clear_code(system: LocalSystem, tmp_path: Path) -> None:
    state, settings, topics = box(system, "unreleased")
    data = os.urandom(1000)
    manifest = release.decode_manifest(released(system, tmp_path, data), load_release_key(state))
    other = release.Manifest(
        manifest.name, manifest.version, "ipk", 1000, hashlib.sha256(b"never released").digest(), "0", False, 1
    )
    with pytest.raises(UpdateFailed) as exc:
        download(state, settings, topics, other, FetchPolicy(chunk_timeout_s=0.5, max_silence_s=2), threading.Event())
    assert exc.value.code == "download_stalled"


def test_another_device_can_neither_read_nor_ask_for_a_boxs_chunks(system: LocalSystem, tmp_path: Path) -> None:
    state, settings, topics = box(system, "victim")
    _, spy_settings, _ = box(system, "spy")
    data = os.urandom(3 * CHUNK_BYTES)
    manifest = release.decode_manifest(released(system, tmp_path, data, "glucoagent_0.4.0-1_all.ipk"), load_release_key(state))
    seen: list[str] = []
    spy = MqttLink(spy_settings, on_message=lambda t, _p: bool(seen.append(t)) or True)
    spy.connect()
    try:
        spy.subscribe([topics.chunks, f"{topics.chunks.rsplit('/', 2)[0]}/+/chunks"])
        # Asking in the victim's name is refused by the ACL: the cloud never sees it, so never answers it.
        mid = spy.publish(topics.fetch, encode_chunk_request(ChunkRequest(manifest.sha256, 0, CHUNK_BYTES)))
        deadline = time.monotonic() + 5
        while spy.acked(mid) is None and time.monotonic() < deadline and spy.loop(0.05):
            pass
        path = download(state, settings, topics, manifest, FetchPolicy(chunk_timeout_s=5), threading.Event())
        assert path.read_bytes() == data
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            spy.loop(0.1)
    finally:
        spy.disconnect()
    assert seen == []
