"""`glucoagent run`: wires store, recorder, meter watcher and uplink, and runs until signalled."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.buffer.intake import Recorder
from agent.buffer.store import Store, open_store
from agent.clock import Anchor, Clock
from agent.commands.executor import CommandExecutor
from agent.config import Config
from agent.errors import GlucoagentError, StorageUnavailable
from agent.identity import renewal
from agent.identity.credentials import DeviceIdentity, load_identity
from agent.identity.signer import Signer
from agent.link.uplink import Uplink
from agent.meters import MeterWatcher
from agent.snapshot import clear_snapshot, write_snapshot
from agent.status import SNAPSHOT_EVERY_S, store_state
from agent.update.outcome import VersionProbe
from agent.update.outcome import health_fields as update_health
from agent.update.pkgdb import PackageManager
from agent.wire.clocksync import anchor_sample

if TYPE_CHECKING:
    from agent.link.aws_jobs import JobsBridge

log = logging.getLogger(__name__)
APPLY_WAIT_S = 10.0  # a configuration change the daemon's loop must take within this
PURGE_EVERY_S = 3600.0  # delivered records past buffer.retention_s go at most this late
_START = time.monotonic()


def open_buffer(cfg: Config) -> tuple[Store, str | None]:
    """Open the buffer, retrying while storage is unavailable (never a crash loop)."""
    delay = 1.0
    while True:
        try:
            return open_store(cfg.buffer_path, max_records=cfg.buffer.max_records, retention_s=cfg.buffer.retention_s)
        except StorageUnavailable as exc:
            log.error("buffer unavailable: %s; retrying in %.0fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)


def memory_rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Daemon:
    def __init__(self, cfg: Config, identity: DeviceIdentity | None = None) -> None:
        self.cfg = cfg
        renewed = renewal.complete_swap(cfg.agent.state_dir)  # a certificate swap a crash cut short
        # Earlier versions left hotplug notices on flash; they live in run_dir (RAM) now.
        shutil.rmtree(cfg.agent.state_dir / "hotplug", ignore_errors=True)
        self.identity = identity or load_identity(cfg.agent.state_dir)
        self.clock = Clock()
        self.store, set_aside = open_buffer(cfg)
        self.signer = Signer(self.identity.device_id, self.identity.key, self.identity.kid, self.clock)
        self.recorder = Recorder(self.store, self.signer, cfg.alerts)
        if set_aside:
            self.recorder.raise_condition("store_corrupt", f"buffer file was corrupt; kept aside as {set_aside}")
        profile = cfg.mqtt.cloud()
        jobs: JobsBridge | None = None
        if profile.name == "aws":  # AWS IoT Jobs: its module loads on that profile only (docs/field.md)
            from agent.link.aws_jobs import jobs_bridge

            jobs = jobs_bridge(profile, self.identity.device_id, self.on_command)
        self.uplink = Uplink(
            cfg,
            self.identity,
            self.store,
            on_command=self.on_command,
            raise_condition=self.recorder.raise_condition,
            clock=self.clock,
            on_time=self.on_time,
            commands_idle=self.commands_idle,
            peer=jobs,
        )
        self.recorder.on_stored = lambda urgent: self.uplink.wake(urgent=urgent)
        self.watcher = MeterWatcher(cfg, self.recorder, self.clock, on_stored=self.on_stored)
        self.ble: list[Any] = []  # agent.ble_source.BleSource per controller, imported only when one is configured
        if cfg.ble:
            from agent.ble_source import BleSource

            self.ble = [BleSource(r, cfg.agent.state_dir, self.recorder, on_stored=self.on_stored) for r in cfg.ble]
        schedule = renewal.RenewalSchedule(
            renewal.cert_not_after(self.identity.cert_path), cfg.agent.renew_before_days * 86_400.0
        )
        self._stop = threading.Event()
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()  # run on the daemon's own thread
        self._poke = threading.Event()  # a call is waiting, or stop
        # the package database the box has (empty status_file: apk's when it exists, else opkg's)
        pm = PackageManager.parse(cfg.update.install_command, cfg.update.status_file)
        self.version_probe = VersionProbe(pm.status_file, cfg.update.package)
        self._fresh = threading.Event()  # a reader stored records: publish the status snapshot now
        self.commands = CommandExecutor(
            self, self.uplink, self.store, self.clock, self.identity, schedule, renewed=renewed
        )
        if jobs is not None:  # AWS: a command's result ends its job execution
            self.commands.outbox.on_put = jobs.on_result

    def on_stored(self) -> None:
        """Reader threads: new records (and their source) are in the buffer: upload them, show them in status."""
        self.uplink.wake()
        self._fresh.set()
        self._poke.set()

    def on_command(self, payload: bytes) -> bool:
        """Uplink thread: hand the message to the command worker (agent/commands/executor.py); False = not stored."""
        return self.commands.submit(payload)

    def commands_idle(self) -> bool:
        """Uplink thread (duty mode): no command stored but not yet run, no result waiting to be sent."""
        commands = getattr(self, "commands", None)  # the uplink may ask before the executor exists
        return commands is None or (not commands.inbox.leftover() and len(commands.outbox) == 0)

    def on_time(self, anchor: Anchor) -> None:
        """Uplink thread: the cloud's signed time was learnt; report the anchor that corrects this boot's records."""
        sample = {**self.health_sample(), **anchor_sample(anchor.true, anchor.boot_id, anchor.monotonic, anchor.offset_s)}
        try:
            self.recorder.health(sample)
        except GlucoagentError as exc:
            log.error("clock anchor not recorded: %s", exc)

    def health_sample(self) -> dict[str, str | int | float | bool]:
        stats = self.store.stats()
        try:
            free = shutil.disk_usage(self.cfg.buffer_path.parent).free
        except OSError:
            free = -1
        up = self.uplink.counters
        return {
            "uptime_s": round(time.monotonic() - _START, 1),
            "buffer_depth": stats.pending_clinical,
            "oldest_unsent_age_s": round(time.time() - stats.oldest_pending_at, 1) if stats.oldest_pending_at else 0,
            "uploaded": up.uploaded,
            "acked": up.acked,
            "reconnects": up.reconnects,
            "connect_failures": up.connect_failures,
            "too_large_records": up.too_large,
            "serial_errors": self.watcher.serial_errors,
            "free_storage_bytes": free,
            "rss_kib": memory_rss_kib(),
            "ble_loaded": "drivers.ble.central" in sys.modules,
            "clock": self.clock.quality().value,
            **update_health(self.cfg.agent.state_dir, self.version_probe),  # running version, last update
        }

    def stop(self, *_: Any) -> None:
        self._stop.set()
        self._poke.set()

    # --- what the command executor may ask of the daemon (agent/commands/ports.py Host) -------------
    def request_stop(self) -> None:
        self.stop()

    def apply_config(self, cfg: Config) -> None:
        """Worker thread: hand the new configuration to the daemon's thread and wait until it runs with it."""
        done = threading.Event()

        def apply() -> None:
            self.cfg = self.uplink.cfg = self.watcher.cfg = cfg
            self.watcher.nudge()  # its wait may have been set by the old port_scan_s or reread_s
            self.uplink.wake(urgent=False)  # a link switched to duty mode goes down at its next pass
            self.recorder.limits = cfg.alerts
            self.store.max_records = cfg.buffer.max_records
            self.store.retention_s = cfg.buffer.retention_s
            logging.getLogger().setLevel(cfg.agent.log_level.upper())
            done.set()

        self._calls.put(apply)
        self._poke.set()
        deadline = time.monotonic() + APPLY_WAIT_S
        while not done.wait(0.1):
            if self._stop.is_set() or time.monotonic() > deadline:
                raise GlucoagentError("the daemon did not take the new configuration: it is stopping")

    def swap_signer(self, signer: Signer) -> None:
        """One reference swap each: key and kid change together for records and results."""
        self.signer = self.recorder.signer = signer

    def read_meters_now(self) -> int:
        self.watcher.read_now()
        for b in self.ble:
            b.read_now()
        return sum(1 for s in self.watcher.ports.values() if s.present)

    def meter_ports(self) -> list[dict[str, Any]]:
        return [
            {"port": s.port.port, "present": s.present, "failures": s.failures} for s in self.watcher.ports.values()
        ]

    def _run_calls(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def purge_delivered(self) -> None:
        """Delivered records are kept buffer.retention_s for `resend`, then deleted."""
        try:
            purged = self.store.purge_acked()
        except GlucoagentError as exc:
            log.warning("could not purge delivered records: %s", exc)
            return
        if purged:
            log.info("purged %d delivered records older than %d s", purged, self.cfg.buffer.retention_s)

    def publish_snapshot(self) -> None:
        """State for `glucoagent status`, which cannot open the exclusively locked buffer."""
        try:
            state = store_state(self.store)
            if "buffer_full" in state["conditions"] and self.store.stats().total_rows < self.cfg.buffer.max_records:
                self.store.clear_condition("buffer_full")  # uploads made room; the meter's rest comes next read
                log.info("buffer has room again")
                state = store_state(self.store)
            write_snapshot(
                self.cfg.run_path,
                {"connected": self.uplink.connected, "ble_loaded": "drivers.ble.central" in sys.modules, **state},
            )
        except (OSError, GlucoagentError) as exc:
            log.warning("status snapshot not written: %s", exc)

    def check_renewal(self) -> None:
        """Start a renewal (or, expired and refused by the broker, a re-enrolment) when the certificate is due.

        One comparison per tick: the deadline is computed from notAfter once (agent/identity/renewal.py)."""
        action = self.commands.schedule.action(time.time(), time.monotonic(), self.uplink.connected)
        if action is not None:
            self.commands.start_renewal(action)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        threads = [
            threading.Thread(target=self.uplink.run, name="uplink", daemon=True),
            threading.Thread(target=self.watcher.run, name="meters", daemon=True),
            threading.Thread(target=self.commands.run, name="commands", daemon=True),  # recovers first
        ]
        threads += [threading.Thread(target=b.run, name=f"ble-{b.radio.name}", daemon=True) for b in self.ble]
        for t in threads:
            t.start()
        log.info("glucoagent running as %s (pid %d)", self.identity.device_id, os.getpid())
        next_health = time.monotonic() + min(5.0, self.cfg.agent.health_interval_s)
        next_snapshot = 0.0
        next_purge = 0.0
        while not self._stop.is_set():
            # Sleep until the next scheduled job (a call, a signal or stop pokes it sooner): no fixed tick.
            self._poke.wait(max(0.0, min(next_purge, next_snapshot, next_health) - time.monotonic()))
            self._poke.clear()
            if self._stop.is_set():
                break
            self._run_calls()
            if self._fresh.is_set():
                self._fresh.clear()
                next_snapshot = 0.0
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_EVERY_S
                self.purge_delivered()
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + SNAPSHOT_EVERY_S
                self.publish_snapshot()
            self.check_renewal()
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + self.cfg.agent.health_interval_s
                try:
                    self.recorder.health(self.health_sample())  # wakes the uplink (not urgent: duty mode waits)
                except GlucoagentError as exc:
                    log.warning("health sample not recorded: %s", exc)
        log.info("stopping")
        self.commands.stop()
        self.watcher.stop()
        for b in self.ble:
            b.stop()
        self.uplink.stop()
        for t in threads:
            t.join(timeout=8)
        self.store.close()
        clear_snapshot(self.cfg.run_path)
        self.commands.after_stop()  # a deprovision wipes the box once nothing uses it any more
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        self.stop()
