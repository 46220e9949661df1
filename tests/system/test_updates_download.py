"""Issue 16, step 2 on real files and processes: a download killed with SIGKILL resumes where it was
recorded, and a disk that fills mid-download (a real small tmpfs) fails clearly and resumes once space is back."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.update.staging import PART_FILE, UPDATE_DIR, Staging, UpdateFailed
from agent.wire.release import CHUNK_BYTES, Chunk, Manifest

# The child downloads from a file, chunk by chunk, as the box does from the cloud; it prints each offset.
CHILD = """
import hashlib, sys, time
from pathlib import Path
from agent.update.staging import Staging
from agent.wire.release import Chunk, Manifest
state, source, pause = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), float(sys.argv[3])
m = Manifest("glucoagent", "0.2.0-1", "ipk", len(source), hashlib.sha256(source).digest(), "0", False, 1)
s = Staging.begin(state, m, reserve_bytes=0)
print("start", s.next, flush=True)
while not s.done:
    r = s.request()
    s.accept(Chunk(r.sha256, r.offset, source[r.offset : r.offset + r.length]))
    print("have", s.next, flush=True)
    time.sleep(pause)
s.verify()
print("verified", flush=True)
"""


def manifest(data: bytes) -> Manifest:
    return Manifest("glucoagent", "0.2.0-1", "ipk", len(data), hashlib.sha256(data).digest(), "0", False, 1)


def test_sigkill_during_download_resumes_at_the_recorded_offset(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK_BYTES + 17)
    source = tmp_path / "pkg.ipk"
    source.write_bytes(data)
    state = tmp_path / "state"
    state.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(source), "0.05"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    seen = 0
    for line in child.stdout:
        if line.startswith("have"):
            seen += 1
            if seen == 5:
                break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    again = subprocess.run(
        [sys.executable, "-c", CHILD, str(state), str(source), "0"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    start = int(again.stdout.splitlines()[0].split()[1])
    assert 5 * CHUNK_BYTES <= start < len(data)  # resumed, not restarted
    assert again.stdout.strip().endswith("verified")
    assert (state / UPDATE_DIR / PART_FILE).read_bytes() == data


@contextlib.contextmanager
def small_fs(tmp_path: Path, size: str) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_download_fails_clearly_then_resumes(tmp_path: Path) -> None:
    data = os.urandom(12 * CHUNK_BYTES)
    with small_fs(tmp_path, "1m") as mnt:
        too_big = manifest(os.urandom(2 * 1024 * 1024))
        with pytest.raises(UpdateFailed, match="do not fit") as exc:
            Staging.begin(mnt, too_big, reserve_bytes=0)  # refused before a byte is written
        assert exc.value.code == "no_space"

        staging = Staging.begin(mnt, manifest(data), reserve_bytes=0)
        for _ in range(3):
            r = staging.request()
            staging.accept(Chunk(r.sha256, r.offset, data[r.offset : r.offset + r.length]))
        filler = mnt / "filler"  # someone else takes the rest of the flash meanwhile
        with contextlib.suppress(OSError), filler.open("wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
        with pytest.raises(UpdateFailed) as exc:
            while not staging.done:
                r = staging.request()
                staging.accept(Chunk(r.sha256, r.offset, data[r.offset : r.offset + r.length]))
        assert exc.value.code == "no_space"
        stuck_at = staging.next
        assert 3 * CHUNK_BYTES <= stuck_at < len(data)

        filler.unlink()
        resumed = Staging.begin(mnt, manifest(data), reserve_bytes=0)
        assert resumed.next == stuck_at
        while not resumed.done:
            r = resumed.request()
            resumed.accept(Chunk(r.sha256, r.offset, data[r.offset : r.offset + r.length]))
        assert resumed.verify().read_bytes() == data
