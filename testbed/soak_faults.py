"""The soak's faults: the schedule (every kind in turn, reshuffled each round) and what each kind does."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.soak_devices import METER_CAP

if TYPE_CHECKING:
    from testbed.soak import Soak

log = logging.getLogger("soak")
FAULT_KINDS = (
    "agent_sigkill",
    "net_cut_rst",
    "broker_kill",
    "disk_full",
    "net_flap",
    "clock_jump",
    "net_black_hole",
    "broker_restart",
    "net_cut_fin",
    "net_refuse",
)
CLOCK_JUMPS_S = (3600, 2 * 86400, -120, -3600, 30 * 86400, 6 * 3600)


def hold(soak: Soak, lo: float, hi: float) -> None:
    soak.stop_all.wait(soak.rng.uniform(lo, hi))


def fault(soak: Soak, kind: str) -> None:
    assert soak.system is not None and soak.proxy is not None
    broker, proxy = soak.system.broker, soak.proxy
    if kind == "agent_sigkill":  # 1-3 kills; the later ones land in start-up, intake or upload
        for n in range(soak.rng.randint(1, 3)):
            if n:
                hold(soak, 0.3, 3.0)
            soak.kill_agent(signal.SIGKILL)
            soak.faults[kind] += 1
            hold(soak, 0.5, 2.0)
            soak.start_agent()
        return
    elif kind == "broker_kill":
        broker.kill()
        hold(soak, 2, 8)
        broker.start()
    elif kind == "broker_restart":
        broker.restart()
    elif kind in ("net_cut_rst", "net_cut_fin"):
        for _ in range(soak.rng.randint(1, 3)):
            proxy.cut(rst=kind == "net_cut_rst")
            hold(soak, 0.5, 4)
    elif kind == "net_black_hole":
        proxy.black_hole()
        hold(soak, 10, 25)  # longer than a keepalive: the agent must notice by itself
        proxy.forward()
    elif kind == "net_refuse":
        proxy.refuse()
        proxy.cut(rst=True)
        hold(soak, 5, 12)
        proxy.forward()
    elif kind == "net_flap":
        proxy.flap(soak.rng.uniform(0.7, 4.0), rst=soak.rng.random() < 0.5)
        hold(soak, 15, 30)
        proxy.steady()
    elif kind == "disk_full":
        ballast = soak.state / "ballast"
        fill(soak, ballast)
        with soak.grow_lock:  # a meter gains a reading while the disk is full
            m = soak.rng.choice(soak.meters)
            if m.held < min(METER_CAP, len(m.everything)):
                m.held += 1
                m.stop()
                m.start()
        hold(soak, 5, 12)
        if soak.rng.random() < 0.5:  # the box restarts while its flash is full
            soak.kill_agent(signal.SIGKILL)
            soak.faults["agent_sigkill"] += 1
            soak.start_agent()
        hold(soak, 10, 20)
        ballast.unlink(missing_ok=True)
    elif kind == "clock_jump":
        offset = soak.rng.choice(CLOCK_JUMPS_S)
        soak.clock_file.write_text(f"{offset}\n")
        log.info("clock jump: %+d s", offset)
        if soak.rng.random() < 0.5:  # reconnect under the wrong clock (TLS validity checks run now)
            hold(soak, 1, 3)
            proxy.cut(rst=True)
        if soak.rng.random() < 0.3:  # the agent starts under the wrong clock
            hold(soak, 1, 3)
            soak.kill_agent(signal.SIGKILL)
            soak.faults["agent_sigkill"] += 1
            soak.start_agent()
        hold(soak, 15, 30)
        soak.clock_file.write_text("0\n")
    else:  # pragma: no cover
        raise ValueError(kind)
    soak.faults[kind] += 1


def fill(soak: Soak, ballast: Path) -> None:
    """Take every free byte of the state tmpfs (unbuffered writes: the last one fails with ENOSPC)."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, max(1, shutil.disk_usage(soak.state).free))
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.lseek(fd, 0, os.SEEK_END)
                os.write(fd, chunk)
    finally:
        os.close(fd)
    log.info("disk full: %d bytes free", shutil.disk_usage(soak.state).free)


def available(soak: Soak, kind: str) -> bool:
    if kind == "disk_full":
        return soak.tmpfs
    if kind == "clock_jump":
        return soak.shim is not None
    return True


def fault_loop(soak: Soak, until: float) -> None:
    kinds = [k for k in FAULT_KINDS if available(soak, k)]
    i = 0
    while time.monotonic() < until and not soak.stop_all.is_set():
        if i % len(kinds) == 0 and i:
            soak.rng.shuffle(kinds)
        kind = kinds[i % len(kinds)]
        i += 1
        log.info("t=%4.0fs fault %s", soak.elapsed(), kind)
        fault(soak, kind)
        hold(soak, 3, 8)
