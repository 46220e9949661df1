"""Pull a released package over MQTT, chunk by chunk, into the staging file (docs/updates.md "Delivery").

A side connection with the device certificate and client id ``<id>-update`` (the broker's auth plugin
allows that suffix, backend/broker_config.py), so the uplink keeps uploading readings meanwhile. The box
publishes a request for chunk *i* on ``…/fetch`` and the cloud answers on ``…/chunks``; the next request
is the acknowledgement of the last chunk, and the recorded offset (agent/update/staging.py) makes the
whole resumable after a link loss, an agent restart or SIGKILL.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

from agent.errors import GlucoagentError
from agent.link.mqtt import LinkSettings, MqttLink
from agent.update.staging import Staging, UpdateFailed
from agent.wire.release import Manifest, decode_chunk, encode_chunk_request
from agent.wire.topics import DeviceTopics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class FetchPolicy:
    chunk_timeout_s: float = 10.0  # no answer within this: ask again
    max_silence_s: float = 300.0  # no progress for this long: give up (the command's result says so)
    reserve_bytes: int = 1024 * 1024  # kept free in the state directory beyond the package


def download(
    state_dir: Path,
    settings: LinkSettings,
    topics: DeviceTopics,
    manifest: Manifest,
    policy: FetchPolicy,
    stopping: threading.Event,
) -> Path:
    """The verified package file (size and SHA-256 of the signed manifest). Raises UpdateFailed."""
    staging = Staging.begin(state_dir, manifest, reserve_bytes=policy.reserve_bytes)
    if staging.done:
        return staging.verify()
    try:
        side = settings.side("update")
    except GlucoagentError as exc:
        raise UpdateFailed("one_connection_only", str(exc)) from None
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def on_message(topic: str, payload: bytes) -> bool:
        if topic == topics.chunks:
            inbox.put(payload)
        return True

    link = MqttLink(side, on_message=on_message)
    last_progress = time.monotonic()
    try:
        while not staging.done:
            if stopping.is_set():
                raise UpdateFailed("interrupted", f"the agent stopped at byte {staging.next} of {manifest.size}")
            if time.monotonic() - last_progress > policy.max_silence_s:
                raise UpdateFailed(
                    "download_stalled", f"no chunk for {policy.max_silence_s:.0f}s at byte {staging.next}"
                )
            if not link.connected:
                try:
                    link.connect()
                    link.subscribe([topics.chunks])
                except GlucoagentError as exc:
                    log.warning("update: download link: %s; retrying", exc)
                    link.close()
                    stopping.wait(min(policy.chunk_timeout_s, 5.0))
                    continue
            if _fetch_one(link, topics, staging, policy.chunk_timeout_s, inbox):
                last_progress = time.monotonic()
    finally:
        link.disconnect()
    return staging.verify()


def _fetch_one(
    link: MqttLink, topics: DeviceTopics, staging: Staging, timeout_s: float, inbox: queue.SimpleQueue[bytes]
) -> bool:
    """Ask for the next chunk and take its answer; False when none came (asked again by the caller)."""
    req = staging.request()
    try:
        link.publish(topics.fetch, encode_chunk_request(req))
    except GlucoagentError as exc:
        log.warning("update: chunk request not sent: %s", exc)
        link.close()
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not link.loop(0.1):
            return False
        while True:
            try:
                payload = inbox.get_nowait()
            except queue.Empty:
                break
            try:
                chunk = decode_chunk(payload)
            except ValueError as exc:
                log.warning("update: unreadable chunk ignored: %s", exc)
                continue
            if chunk.offset != req.offset:  # a late answer to an earlier request: already taken
                log.debug("update: chunk at %d ignored, waiting for %d", chunk.offset, req.offset)
                continue
            staging.accept(chunk)  # a truncated or foreign chunk raises UpdateFailed(bad_chunk)
            return True
    return False
