"""agent/devwatch.py: the inotify event parser (golden bytes) and a real inotify watch on a temporary
directory: what makes the descriptor readable (entries made, replaced, removed, chmod) and what does not
(a file's contents written), and a watched directory removed and made again."""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path

from agent.devwatch import IN_CREATE, IN_MOVED_TO, DirWatch, parse_events, watch_target


def _readable(watch: DirWatch, timeout: float = 2.0) -> bool:
    return bool(select.select([watch.fileno()], [], [], timeout)[0])


def test_parse_events_reads_each_record_and_its_padded_name() -> None:
    buf = struct.pack("iIII", 1, IN_CREATE, 0, 16) + b"ttyUSB0".ljust(16, b"\0")
    buf += struct.pack("iIII", 2, IN_MOVED_TO, 7, 0)
    assert parse_events(buf) == [(1, IN_CREATE, "ttyUSB0"), (2, IN_MOVED_TO, "")]
    assert parse_events(buf[:10]) == []  # a torn header is not an event


def test_watch_target_is_the_nearest_directory_that_exists(tmp_path: Path) -> None:
    assert watch_target(tmp_path / "ttyUSB0") == tmp_path
    assert watch_target(tmp_path / "serial" / "by-id" / "usb-meter") == tmp_path


def test_entries_wake_the_watch_file_contents_do_not(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text("x")
    watch = DirWatch.open()
    assert watch is not None, "inotify is part of every Linux kernel this runs on"
    try:
        assert watch.watch({tmp_path}) == (True, True)
        assert watch.watch({tmp_path}) == (True, False)
        with log.open("a") as f:  # a log growing beside a port wakes nobody
            f.write("more\n")
        assert not _readable(watch, 0.3)
        link = tmp_path / "ttyX"
        tmp = tmp_path / "ttyX.tmp"
        tmp.symlink_to("/dev/null")
        os.replace(tmp, link)  # how the simulators publish a pty
        assert _readable(watch) and watch.drain()
        assert not watch.drain()
        link.unlink()
        assert _readable(watch) and watch.drain()
        log.chmod(0o600)  # attributes: procd's chmod of a new node
        assert _readable(watch) and watch.drain()
    finally:
        watch.close()


def test_a_watched_directory_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    folder = tmp_path / "hotplug"
    folder.mkdir()
    watch = DirWatch.open()
    assert watch is not None
    try:
        assert watch.watch({folder}) == (True, True)
        folder.rmdir()
        assert _readable(watch) and watch.drain()  # IN_DELETE_SELF, IN_IGNORED: the watch is forgotten
        folder.mkdir()
        assert watch.watch({folder}) == (True, True)  # set again on the new directory
        (folder / "ttyUSB0").write_text("add\n")
        assert _readable(watch) and watch.drain()
    finally:
        watch.close()
