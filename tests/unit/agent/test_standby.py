"""agent/standby.py: what `run` does before the daemon can start, on real files and a real clock."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from agent.config import Config, load_config, with_state_dir
from agent.standby import CREDENTIAL_FILES, fingerprint, wait_until_ready, watched_paths

POLL = 0.02


def _later(delay: float, action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()  # type: ignore[operator]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_fingerprint_sees_create_replace_and_remove(tmp_path: Path) -> None:
    f = tmp_path / "x"
    empty = fingerprint([f])
    f.write_text("1")
    one = fingerprint([f])
    new = tmp_path / ".x.new"
    new.write_text("1")
    new.rename(f)  # same size, replaced by rename: a new inode
    assert len({empty, one, fingerprint([f])}) == 3
    f.unlink()
    assert fingerprint([f]) == empty


def test_watches_config_state_dir_and_every_credential(tmp_path: Path) -> None:
    paths = watched_paths(tmp_path / "cfg", tmp_path / "state")
    assert paths[:2] == [tmp_path / "cfg", tmp_path / "state"]
    assert {p.name for p in paths[2:]} == set(CREDENTIAL_FILES)
    assert watched_paths(None, tmp_path)[0] == tmp_path


def test_stop_ends_the_wait(tmp_path: Path) -> None:
    stop = threading.Event()
    _later(0.2, stop.set)
    started = time.monotonic()
    got = wait_until_ready(None, Config, stop, default_state_dir=tmp_path, poll_s=POLL)
    assert got is None
    assert time.monotonic() - started < 5


def test_bad_config_is_retried_only_after_the_file_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg_path = tmp_path / "glucoagent"
    cfg_path.write_text("config agent 'agent'\n\toption log_level 'loud'\n")
    calls: list[int] = []

    def load() -> Config:
        calls.append(1)
        return load_config(cfg_path)

    stop = threading.Event()
    result: list[Config | None] = []
    caplog.set_level(logging.DEBUG, logger="agent.standby")
    t = threading.Thread(target=lambda: result.append(wait_until_ready(cfg_path, load, stop, default_state_dir=tmp_path, poll_s=POLL)))
    t.start()
    time.sleep(0.5)  # ~25 checks
    assert len(calls) == 1  # nothing changed: not tried again
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"cannot start: {cfg_path}:2: agent.log_level" in errors[0].getMessage()
    cfg_path.write_text(f"config agent 'agent'\n\toption state_dir '{tmp_path / 'state'}'\n")
    time.sleep(0.5)
    assert len(calls) == 2  # tried again, now "not provisioned" in the new state dir
    assert any("not provisioned" in r.getMessage() for r in caplog.records)
    stop.set()
    t.join(5)
    assert result == [None]


def test_unreadable_credentials_wait_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for name in CREDENTIAL_FILES:
        (state / name).write_text("garbage")
    stop = threading.Event()
    _later(0.3, stop.set)
    got = wait_until_ready(None, lambda: with_state_dir(Config(), state), stop, default_state_dir=state, poll_s=POLL)
    assert got is None
    assert any("cannot start" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
