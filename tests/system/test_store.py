"""The buffer on real SQLite files: sequence numbers, ledger, capacity, acks, bad conditions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer.intake import Intake
from agent.buffer.store import CLINICAL, HEALTH, PRIO_ALERT, PRIO_HEALTH, PRIO_RECORD, Store, open_store
from agent.errors import BufferFull, StorageUnavailable
from agent.fsutil import atomic_write


def rec(key: str | None, prio: int = PRIO_RECORD, kind: str = "reading") -> Intake:
    return Intake(kind, prio, lambda seq: f"{kind}:{key}:{seq}".encode(), key)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "buffer.db", max_records=100, retention_s=0)
    yield s
    s.close()


def test_durability_settings_are_in_force(store: Store) -> None:
    assert store._read("PRAGMA journal_mode")[0][0] == "wal"
    assert store._read("PRAGMA locking_mode")[0][0] == "exclusive"  # WAL index in heap: no -shm mmap (JFFS2)
    assert store._read("PRAGMA synchronous")[0][0] == 2  # FULL
    assert not store.path.with_name(store.path.name + "-shm").exists()
    assert oct(os.stat(store.path).st_mode & 0o777) == oct(0o600)


def test_sequence_numbers_are_gap_free_and_ledger_dedupes(store: Store) -> None:
    assert store.accept([rec("a"), rec("b")], source="m1") == [1, 2]
    assert store.accept([rec("a"), rec("b"), rec("c")], source="m1") == [3]
    assert store.accept([rec("a")], source="m2") == [4]  # the ledger is per meter
    assert store.accept([rec("x"), rec("x")], source="m1") == [5]  # the same key twice in one batch
    assert [r.seq for r in store.pending(10)] == [1, 2, 3, 4, 5]


def test_signing_sees_its_own_sequence_number(store: Store) -> None:
    store.accept([rec("a"), rec("b")], source="m")
    assert [r.cose for r in store.pending(10)] == [b"reading:a:1", b"reading:b:2"]


def test_failed_batch_leaves_nothing_and_burns_no_number(store: Store) -> None:
    def boom(_seq: int) -> bytes:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        store.accept([rec("a"), Intake("reading", PRIO_RECORD, boom, "b")], source="m")
    assert store.pending(10) == []
    assert store.known_keys("m", ["a", "b"]) == set()
    assert store.accept([rec("a")], source="m") == [1]


def test_ack_removes_only_acknowledged_rows(store: Store) -> None:
    store.accept([rec(k) for k in "abcd"], source="m")
    assert store.ack(CLINICAL, [2, 4, 99]) == 2
    assert store.ack(CLINICAL, [2]) == 0  # a second ack of the same row changes nothing
    assert [r.seq for r in store.pending(10)] == [1, 3]


def test_alerts_jump_the_queue_and_health_goes_last(store: Store) -> None:
    store.accept([rec(None, PRIO_HEALTH, "health")])
    store.accept([rec("a"), rec("b")], source="m")
    store.accept([rec(None, PRIO_ALERT, "alert")])
    assert [r.kind for r in store.pending(10)] == ["alert", "reading", "reading", "health"]
    assert [(r.stream, r.seq) for r in store.pending(10)] == [(CLINICAL, 3), (CLINICAL, 1), (CLINICAL, 2), (HEALTH, 1)]


def test_pending_is_bounded_and_honours_exclusions(store: Store) -> None:
    store.accept([rec(str(i)) for i in range(50)], source="m")
    first = store.pending(10)
    assert len(first) == 10
    second = store.pending(10, exclude={r.id for r in first})
    assert {r.id for r in first}.isdisjoint({r.id for r in second})


def test_full_buffer_drops_health_first_then_refuses_intake(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", max_records=10, retention_s=0)
    s.accept([rec(None, PRIO_HEALTH, "health") for _ in range(4)])
    s.accept([rec(str(i)) for i in range(6)], source="m")
    s.accept([rec("6"), rec("7")], source="m")  # evicts two health samples
    assert sum(r.kind == "health" for r in s.pending(20)) == 2
    with pytest.raises(BufferFull):
        s.accept([rec(str(i)) for i in range(8, 13)], source="m")
    # nothing of the refused batch was written, and the ledger did not advance
    assert s.known_keys("m", [str(i) for i in range(8, 13)]) == set()
    # a refused batch changes nothing: the health samples it could not fit beside stay too
    assert sum(r.kind == "health" for r in s.pending(20)) == 2
    assert len([r for r in s.pending(20) if r.kind == "reading"]) == 8
    s.accept([rec("8"), rec("9")], source="m")  # what fits once health samples go is taken
    assert all(r.kind != "health" for r in s.pending(20))
    s.accept([rec(None, PRIO_ALERT, "alert")])  # the buffer_full alert itself still fits


def test_retained_rows_serve_resend_and_make_room_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", max_records=5, retention_s=3600)
    s.accept([rec(k) for k in "abcde"], source="m")
    s.ack(CLINICAL, [1, 2, 3])
    assert [r.seq for r in s.retained(CLINICAL, 1, 3, 10)] == [1, 2, 3]
    assert [r.seq for r in s.pending(10)] == [4, 5]
    s.accept([rec("f"), rec("g")], source="m")  # room comes from delivered rows
    assert [r.seq for r in s.pending(10)] == [4, 5, 6, 7]
    assert s.purge_acked(now=10**10) == 1


def test_complete_read_prunes_ledger_to_what_the_meter_still_holds(store: Store) -> None:
    store.accept([rec(k) for k in "abc"], source="m")
    store.accept([rec("c"), rec("d")], source="m", complete_keys=["c", "d"])
    assert store.known_keys("m", list("abcd")) == {"c", "d"}


def test_numbers_survive_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db")
    s.accept([rec("a"), rec("b")], source="m")
    s.close()
    s = Store(tmp_path / "b.db")
    assert s.accept([rec("c")], source="m") == [3]


def test_corrupt_file_is_kept_aside_and_numbers_are_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    s = Store(path, max_records=1000)
    s.accept([rec(str(i)) for i in range(200)], source="m")
    s.close()
    with path.open("r+b") as f:  # scribble over the middle of the file
        f.seek(4096)
        f.write(os.urandom(8192))
    store, aside = open_store(path, max_records=1000, retention_s=0)
    assert aside is not None and Path(aside).exists()
    assert store.integrity_check() == "ok"
    (seq,) = store.accept([rec("new")], source="m")
    assert seq > 200  # continues above every number the lost file may have used
    store.close()


def test_garbage_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    store, aside = open_store(path, max_records=10, retention_s=0)
    assert aside and Path(aside).read_bytes().startswith(b"this is not")
    assert store.accept([rec("a")], source="m") == [1]


@contextlib.contextmanager
def small_fs(tmp_path: Path, size: str, *, inodes: int | None = None) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    with small_fs(tmp_path, "256k") as mnt:
        s = Store(mnt / "b.db", max_records=10**6)
        accepted = 0
        with pytest.raises(StorageUnavailable, match="full"):
            for i in range(10_000):
                s.accept([rec(f"{i}-{j}") for j in range(20)], source="m")
                accepted += 20
        assert accepted > 0
        assert s.integrity_check() == "ok"
        assert len(s.pending(10**6)) == accepted
        s.close()
        reopened = Store(mnt / "b.db", max_records=10**6)
        assert len(reopened.pending(10**6)) == accepted
        reopened.close()


def test_read_only_file_system_is_a_clear_error(tmp_path: Path) -> None:
    with small_fs(tmp_path, "1m") as mnt:
        s = Store(mnt / "b.db")
        s.accept([rec("a")], source="m")
        s.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StorageUnavailable, match="opening"):
            Store(mnt / "b.db")  # refused clearly (the daemon logs it and retries), nothing touched
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        s = Store(mnt / "b.db")
        assert [r.seq for r in s.pending(10)] == [1]
        assert s.accept([rec("b")], source="m") == [2]
        s.close()


def test_full_disk_at_the_sequence_side_file_is_a_storage_error(tmp_path: Path) -> None:
    """The side file ``b.db.seq`` is rewritten when a sequence number reaches its reserved bound; on a
    full disk that write must fail as the storage error (the daemon and intake handle StoreError),
    with nothing stored and nothing lost. Full here = no inode left, so the database and its WAL
    keep working while the side file's temp file cannot be created."""
    with small_fs(tmp_path, "1m", inodes=16) as mnt:
        s = Store(mnt / "b.db")
        assert s.accept([rec("a")], source="m") == [1]
        s.close()
        (mnt / "b.db.seq").write_text("2 1\n")  # the bound a box reaches every SEQ_BLOCK numbers
        s = Store(mnt / "b.db")
        with contextlib.suppress(OSError):
            for i in range(100):
                (mnt / f"ballast{i}").touch()
        with pytest.raises(StorageUnavailable, match=r"b\.db\.seq: No space left on device"):
            s.accept([rec("b")], source="m")
        assert [r.seq for r in s.pending(10)] == [1] and s.known_keys("m", ["b"]) == set()
        for ballast in mnt.glob("ballast*"):
            ballast.unlink()
        assert s.accept([rec("b")], source="m") == [2]  # room again: the same number, nothing skipped
        s.close()


def test_corrupt_buffer_on_a_read_only_file_system_is_a_storage_error(tmp_path: Path) -> None:
    """Setting a corrupt file aside needs a rename; on a read-only file system that is the storage
    error (the daemon retries it), not a stray OSError, and the file stays where it was."""
    with small_fs(tmp_path, "1m") as mnt:
        (mnt / "b.db").write_bytes(b"this is not a database" * 100)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StorageUnavailable, match="cannot be set aside"):
            open_store(mnt / "b.db", max_records=10, retention_s=0)
        assert sorted(p.name for p in mnt.iterdir()) == ["b.db"]


def test_durable_write_into_a_missing_directory_on_a_read_only_file_system_is_a_storage_error(tmp_path: Path) -> None:
    with small_fs(tmp_path, "1m") as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StorageUnavailable, match="cannot write"):
            atomic_write(mnt / "commands" / "x", b"data")


def test_a_second_process_is_locked_out_with_a_clear_error(store: Store) -> None:
    import subprocess
    import sys

    store.accept([rec("a")], source="m")
    code = (
        "import sys; from pathlib import Path; from agent.buffer.store import Store; from agent.errors import StoreError\n"
        f"try:\n    Store(Path({str(store.path)!r})).stats()\nexcept StoreError as e:\n    print(e); sys.exit(3)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "in use by another process" in out.stdout


def test_sqlite_errors_never_escape_untranslated(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db")
    s._db.close()
    with pytest.raises(Exception) as info:
        s.stats()
    assert not isinstance(info.value, sqlite3.Error)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=8), max_size=12))
def test_any_sequence_of_reads_stores_each_key_once(tmp_path_factory: pytest.TempPathFactory, reads: list[list[str]]) -> None:
    s = Store(tmp_path_factory.mktemp("h") / "b.db")
    for keys in reads:
        s.accept([rec(k) for k in keys], source="m")
    stored = [r.cose.decode().split(":")[1] for r in s.pending(100)]
    assert sorted(stored) == sorted({k for keys in reads for k in keys})
    assert [r.seq for r in s.pending(100)] == list(range(1, len(stored) + 1))
    s.close()


def test_partial_intake_takes_what_fits_and_the_ledger_only_what_was_stored(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", max_records=10, retention_s=0)
    s.accept([rec(str(i)) for i in range(6)], source="m")
    with pytest.raises(BufferFull) as info:
        s.accept([rec(str(i)) for i in range(6, 12)], source="m", partial=True, complete_keys=[str(i) for i in range(12)])
    assert info.value.accepted == [7, 8, 9, 10]
    assert s.known_keys("m", [str(i) for i in range(12)]) == {str(i) for i in range(10)}
    s.ack(CLINICAL, range(1, 11))  # the uplink drains the buffer...
    assert s.accept([rec(str(i)) for i in range(12)], source="m") == [11, 12]  # ...and the next read takes the rest


def test_partial_intake_keeps_a_stored_readings_alerts_with_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db", max_records=3, retention_s=0)
    s.accept([rec("x"), rec("y")], source="m")
    batch = [rec("a"), rec(None, PRIO_ALERT, "alert"), rec("b"), rec(None, PRIO_ALERT, "alert")]
    with pytest.raises(BufferFull) as info:
        s.accept(batch, source="m", partial=True)
    assert info.value.accepted == [3, 4]  # reading a and its alert, together
    assert [r.kind for r in s.pending(10)][:1] == ["alert"]
    assert s.known_keys("m", ["a", "b"]) == {"a"}
