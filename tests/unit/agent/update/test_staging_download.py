"""The resumable download (agent/update/staging.py) and the chunk codec, on real files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.update.staging import PART_FILE, PROGRESS_FILE, UPDATE_DIR, Staging, UpdateFailed
from agent.wire import release
from agent.wire.release import CHUNK_BYTES, Chunk, ChunkRequest, Manifest

DATA = os.urandom(2 * CHUNK_BYTES + 1234)


def manifest(data: bytes = DATA) -> Manifest:
    return Manifest("glucoagent", "0.2.0-1", "ipk", len(data), hashlib.sha256(data).digest(), "0", False, 1)


def answer(req: ChunkRequest, data: bytes = DATA) -> Chunk:
    return Chunk(req.sha256, req.offset, data[req.offset : req.offset + req.length])


def download(staging: Staging, data: bytes = DATA, stop_after: int | None = None) -> None:
    n = 0
    while not staging.done and (stop_after is None or n < stop_after):
        staging.accept(answer(staging.request(), data))
        n += 1


def test_whole_download_verifies(tmp_path: Path) -> None:
    staging = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    download(staging)
    assert staging.verify().read_bytes() == DATA
    assert (tmp_path / UPDATE_DIR / PART_FILE).stat().st_mode & 0o777 == 0o600


def test_resumes_at_the_recorded_offset_and_cuts_torn_bytes(tmp_path: Path) -> None:
    staging = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    download(staging, stop_after=1)
    part = tmp_path / UPDATE_DIR / PART_FILE
    with part.open("ab") as fh:  # a chunk written but its offset never recorded (a crash between the two)
        fh.write(b"torn")
    again = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    assert again.next == CHUNK_BYTES and part.stat().st_size == CHUNK_BYTES
    assert again.request().offset == CHUNK_BYTES
    download(again)
    assert again.verify().read_bytes() == DATA


def test_another_manifest_discards_the_old_download(tmp_path: Path) -> None:
    download(Staging.begin(tmp_path, manifest(), reserve_bytes=0), stop_after=1)
    other = os.urandom(500)
    staging = Staging.begin(tmp_path, manifest(other), reserve_bytes=0)
    assert staging.next == 0 and (tmp_path / UPDATE_DIR / PART_FILE).stat().st_size == 0
    download(staging, other)
    assert staging.verify().read_bytes() == other


def test_reordered_truncated_and_foreign_chunks_are_refused(tmp_path: Path) -> None:
    staging = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    req = staging.request()
    later = Chunk(req.sha256, CHUNK_BYTES, DATA[CHUNK_BYTES : 2 * CHUNK_BYTES])
    short = Chunk(req.sha256, 0, DATA[: CHUNK_BYTES - 1])
    foreign = Chunk(b"\x00" * 32, 0, DATA[:CHUNK_BYTES])
    for bad, text in ((later, "expected 0"), (short, "bytes at 0"), (foreign, "another package")):
        with pytest.raises(UpdateFailed, match=text) as exc:
            staging.accept(bad)
        assert exc.value.code == "bad_chunk"
    assert staging.next == 0  # nothing taken from a refused chunk
    download(staging)
    assert staging.verify().read_bytes() == DATA


def test_wrong_sha256_is_caught_and_the_download_discarded(tmp_path: Path) -> None:
    evil = bytes(b ^ 1 for b in DATA)  # same size, other bytes, as a cloud serving the wrong file
    staging = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    download(staging, evil)
    with pytest.raises(UpdateFailed) as exc:
        staging.verify()
    assert exc.value.code == "sha256_mismatch"
    assert not (tmp_path / UPDATE_DIR / PART_FILE).exists()
    assert not (tmp_path / UPDATE_DIR / PROGRESS_FILE).exists()


def test_refused_up_front_when_it_cannot_fit(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UpdateFailed, match="do not fit") as exc:
        Staging.begin(tmp_path, manifest(), reserve_bytes=free)
    assert exc.value.code == "no_space"
    assert not (tmp_path / UPDATE_DIR / PART_FILE).exists()


def test_progress_records_the_next_offset(tmp_path: Path) -> None:
    staging = Staging.begin(tmp_path, manifest(), reserve_bytes=0)
    download(staging, stop_after=2)
    progress = json.loads((tmp_path / UPDATE_DIR / PROGRESS_FILE).read_text())
    assert progress == {
        "sha256": manifest().sha256.hex(),
        "version": "0.2.0-1",
        "size": len(DATA),
        "next": 2 * CHUNK_BYTES,
    }


def test_chunk_codec_round_trip() -> None:
    req = ChunkRequest(bytes(32), 65536, CHUNK_BYTES)
    assert release.decode_chunk_request(release.encode_chunk_request(req)) == req
    chunk = Chunk(bytes(32), 7, b"abc")
    assert release.decode_chunk(release.encode_chunk(chunk)) == chunk


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_chunk_garbage_raises_value_error_only(data: bytes) -> None:
    for decode in (release.decode_chunk, release.decode_chunk_request):
        with contextlib.suppress(ValueError):  # anything else (TypeError, KeyError...) fails the test
            decode(data)
