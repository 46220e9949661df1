"""The certificate exchange as the executor runs it: for the ``renew_certificate`` command, and for the
renewals and re-enrolments the box starts by itself (agent/identity/renewal.py ``RenewalSchedule``).

The key in use when a renewal starts is written to ``pending/<id>.kid`` (command) or
``pending/<id>.selfrenew`` (the box's own): after a crash, a different live key proves the swap
happened, and the next start reports ``renewed``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.commands.ports import Host, Link, Outcome
from agent.config import Endpoint
from agent.errors import GlucoagentError
from agent.fsutil import atomic_write
from agent.identity import recovery, renewal
from agent.identity.credentials import KEY_FILE, DeviceIdentity, load_key
from agent.identity.signer import Signer
from agent.wire import cose
from agent.wire.command import Command
from agent.wire.inbound import Inbound
from agent.wire.renewal import REQUEST_CODE, Delivery

log = logging.getLogger(__name__)

SELF_RENEWAL_MARK = ".selfrenew"  # pending/<request id>.selfrenew: the kid in use when the box started a renewal
KID_MARK = ".kid"  # pending/<command id>.kid: the same for the renew_certificate command
RENEW_TIMEOUT_S = 60.0  # for the certificate delivery


@dataclasses.dataclass(slots=True)
class _Waiting:
    request_id: str
    event: threading.Event = dataclasses.field(default_factory=threading.Event)
    delivery: Delivery | None = None


class Renewer:
    def __init__(
        self,
        *,
        host: Host,
        link: Link,
        identity: DeviceIdentity,
        pending_dir: Path,
        schedule: renewal.RenewalSchedule,
        stopping: threading.Event,
        report: Callable[[str, Outcome], None],
        results_waiting: Callable[[], int],
    ) -> None:
        self.host, self.link, self.identity = host, link, identity
        self.state = identity.state_dir
        self.pending_dir = pending_dir
        self.schedule = schedule
        self.stopping = stopping
        self.report = report
        self.results_waiting = results_waiting
        self._waiting: _Waiting | None = None
        self._asked: str | None = None  # "renew" | "recover", asked for by the daemon's RenewalSchedule
        self._relink = False
        link.add_tick(self._relink_after_renewal)

    # --- deliveries (uplink thread) --------------------------------------------------------------
    def take_delivery(self, inbound: Inbound) -> bool:
        """True when ``inbound`` is the certificate a running exchange waits for (handed over to it)."""
        waiting = self._waiting
        if waiting is None or not isinstance(inbound, Delivery) or inbound.renewal != waiting.request_id:
            return False
        waiting.delivery = inbound
        waiting.event.set()
        return True

    # --- the command -------------------------------------------------------------------------------
    def renew_command(self, cmd: Command) -> Outcome:
        atomic_write(self.pending_dir / f"{cmd.id}{KID_MARK}", self.host.signer.kid.hex().encode())
        try:
            leaf = self._exchange(cmd.id, "csr", "new key made; waiting for its certificate", {})
        except renewal.RenewalError as exc:
            return Outcome("failed", exc.code, f"{exc}; the old credentials stay in use")
        summary = renewal.certificate_summary(leaf)
        self.schedule.succeeded(float(summary["not_after"]), time.time(), time.monotonic())  # the next due date
        return Outcome("ok", "renewed", "new key and certificate in place (the link moves to them now)", summary)

    def key_changed_since(self, request_id: str, mark: Path | None = None) -> bool:
        """True when the live device key is not the one recorded when renewal ``request_id`` started."""
        try:
            before = (mark or self.pending_dir / f"{request_id}{KID_MARK}").read_text().strip()
            live = cose.key_id(load_key(self.state / KEY_FILE).public_key()).hex()
        except (OSError, GlucoagentError):
            return False
        return before != live

    def forget_marks(self) -> None:
        """Start-up, after the interrupted commands were settled: report self-renewals a crash cut off
        after their swap, then drop every mark (only needed for that)."""
        for mark in self.pending_dir.glob(f"*{SELF_RENEWAL_MARK}"):
            request_id = mark.name.removesuffix(SELF_RENEWAL_MARK)
            if self.key_changed_since(request_id, mark):
                log.warning("renewal %s was swapped in before the agent stopped: reporting it", request_id)
                self.report(request_id, Outcome("ok", "renewed", "new key and certificate in place"))
            mark.unlink(missing_ok=True)
        for kid_file in self.pending_dir.glob(f"*{KID_MARK}"):
            kid_file.unlink(missing_ok=True)

    def _exchange(self, request_id: str, code: str, message: str, data: dict[str, Any]) -> Any:
        """Stage a key, send its CSR in a pending result signed with the current key, take the delivered
        certificate, log in with it, swap. Returns the new leaf; raises RenewalError (old pair kept)."""
        if self.host.cfg.mqtt.cloud().enrolment == "dps":  # Azure: a new certificate comes from DPS
            return self._renew_by_dps()
        if self.host.cfg.mqtt.cloud().enrolment == "aws-fleet":  # AWS: from fleet provisioning's MQTT API
            return self._renew_on_aws(expired=False)
        if not self.link.settings.side_connections:  # the trial login would drop the agent's own connection
            raise renewal.RenewalError(
                "one_connection_only",
                "this cloud allows one connection per device: a new certificate means enrolling again (docs/clouds.md)",
            )
        key, csr = renewal.stage_key(self.state, self.host.cfg.agent.key_type)
        waiting = _Waiting(request_id)
        self._waiting = waiting
        try:
            self.report(request_id, Outcome("pending", code, message, {**data, "csr": csr}))
            delivery = self._await_delivery(waiting)
            ca_pem = self.identity.ca_path.read_bytes()
            leaf = renewal.check_certificate(delivery.cert_pem, key, self.identity.device_id, ca_pem)
            renewal.try_login(self.state, self.link.settings, delivery.cert_pem)
            renewal.commit(self.state)
        except renewal.RenewalError:
            renewal.discard(self.state)
            raise
        finally:
            self._waiting = None
        self._use_key(key)
        return leaf

    def _renew_by_dps(self) -> Any:
        """Azure (one connection per device): hold the link down, register again with DPS with the new key's
        CSR, try the new pair as the device, swap (agent/identity/dps.py ``renew_by_dps``), let the link come
        back with it. Also the re-enrolment of an expired box there. Returns the new leaf; raises RenewalError."""
        from agent.identity.dps import renew_by_dps  # Azure only

        cfg = self.host.cfg
        self.link.hold()
        try:
            deadline = time.monotonic() + RENEW_TIMEOUT_S
            while not self.link.parked.wait(0.1):
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise renewal.RenewalError("renewal_timeout", "the link did not go down for the renewal")
            log.info("certificate renewal: registering again with DPS (the link is down meanwhile)")
            hub = Endpoint.parse(cfg.mqtt.endpoint or self.identity.endpoint)
            leaf = renew_by_dps(
                self.state, cfg.mqtt, hub, self.link.settings, self.identity.device_id, self.host.signer.key,
                cfg.agent.key_type,
            )  # fmt: skip
        finally:
            self.link.release()
        self._use_key(load_key(self.state / KEY_FILE), relink=False)  # the link comes back with the new pair
        return leaf

    def _renew_on_aws(self, *, expired: bool) -> Any:
        """AWS IoT Core: CreateCertificateFromCsr and RegisterThing again (agent/identity/aws_renewal.py), on a
        side connection (or, ``expired``, the claim connection). Returns the new leaf; raises RenewalError."""
        from agent.identity.aws_renewal import renew_on_aws  # AWS only
        from agent.wire.aws import DEFAULT_TEMPLATE, AwsProfile

        profile = self.host.cfg.mqtt.cloud()
        template = profile.aws_template if isinstance(profile, AwsProfile) else DEFAULT_TEMPLATE
        leaf = renew_on_aws(
            self.state, self.link.settings, self.identity.device_id, self.host.signer.key, template,
            expired=expired, stop=self.stopping.is_set,
        )  # fmt: skip
        self._use_key(load_key(self.state / KEY_FILE), relink=not expired)  # expired: the link is down already
        return leaf

    def _await_delivery(self, waiting: _Waiting) -> Delivery:
        """Publish the CSR (via the outbox) and wait for the certificate delivery routed here."""
        deadline = time.monotonic() + RENEW_TIMEOUT_S
        self.link.wake()
        while not waiting.event.wait(0.1):
            if time.monotonic() > deadline or self.stopping.is_set():
                raise renewal.RenewalError("renewal_timeout", f"no certificate within {RENEW_TIMEOUT_S:.0f}s")
        if waiting.delivery is None:
            raise renewal.RenewalError("renewal_timeout", "woken without a certificate")
        return waiting.delivery

    def _use_key(self, key: cose.PrivateKey, *, relink: bool = True) -> None:
        """The swapped-in key signs from now on, and a running link reconnects with the new certificate."""
        self.host.swap_signer(
            Signer(self.identity.device_id, key, cose.key_id(key.public_key()), self.host.signer.clock)
        )
        self._relink = relink

    def _relink_after_renewal(self) -> None:
        """Uplink thread: once the signed results are out, drop the link; it comes back with the new pair,
        so the old certificate (which the cloud revokes now) is no longer in use anywhere."""
        link = self.link.link
        if self._relink and not self.results_waiting() and link is not None and link.connected:
            self._relink = False
            log.info("certificate renewed: reconnecting with the new certificate")
            link.close()

    # --- renewals the box starts by itself ---------------------------------------------------------
    def ask(self, kind: str) -> None:
        """Daemon thread: have the worker renew (``renew``) or re-enrol over the claim path (``recover``)."""
        self._asked = kind

    def run_asked(self) -> None:
        """Worker thread: the renewal the daemon asked for, if any."""
        kind, self._asked = self._asked, None
        if kind is None:
            return
        schedule = self.schedule
        request_id = renewal.new_request_id()
        mark = self.pending_dir / f"{request_id}{SELF_RENEWAL_MARK}"
        atomic_write(
            mark, self.host.signer.kid.hex().encode()
        )  # as for the command: a crash after the swap is reported
        days = (schedule.not_after - time.time()) / 86_400
        settled, code = False, ""
        try:
            if kind == "recover" and self.host.cfg.mqtt.cloud().enrolment == "dps":
                log.warning("the device certificate expired %.1f days ago: registering again with DPS", -days)
                leaf = self._renew_by_dps()
                code = "recovered"
            elif kind == "recover" and self.host.cfg.mqtt.cloud().enrolment == "aws-fleet":
                log.warning("the device certificate expired %.1f days ago: renewing over the claim connection", -days)
                leaf = self._renew_on_aws(expired=True)
                code = "recovered"
            elif kind == "recover":
                log.warning(
                    "the device certificate expired %.1f days ago (the box was offline): re-enrolling over the "
                    "claim path with proof of the old key; device id, patient and unsent readings are kept",
                    -days,
                )
                leaf = recovery.recover(
                    self.state, self.link.settings, self.identity.device_id, self.host.signer.key,
                    self.host.cfg.agent.key_type, stop=self.stopping.is_set,
                )  # fmt: skip
                self._use_key(load_key(self.state / KEY_FILE), relink=False)  # the link is down: no relink
                code = "recovered"
            else:
                log.info("the device certificate expires in %.1f days: asking the cloud for a new one", days)
                leaf = self._exchange(
                    request_id, REQUEST_CODE, f"certificate expires in {days:.1f} days",
                    {"not_after": int(schedule.not_after)},
                )  # fmt: skip
                code = "renewed"
            summary = renewal.certificate_summary(leaf)
            self.report(request_id, Outcome("ok", code, "new key and certificate in place", summary))
            mark.unlink(missing_ok=True)
            schedule.succeeded(float(summary["not_after"]), time.time(), time.monotonic())
            settled = True
            log.info("certificate %s: serial %s, valid until %s", code, summary["serial"], summary["not_after"])
        except (GlucoagentError, OSError) as exc:  # RenewalError and the rest: the old pair stays in use
            code = str(getattr(exc, "code", type(exc).__name__))
            if kind == "recover" and code in renewal.RECOVERY_REFUSALS:
                log.error("the cloud refused to re-enrol this box (%s): %s; it needs a technician", code, exc)
            else:
                log.warning("certificate %s failed (%s): %s", kind, code, exc)
        finally:
            if not settled:  # never left busy, whatever went wrong: the schedule tries again later
                mark.unlink(missing_ok=True)
                quick = kind == "recover" and code not in renewal.RECOVERY_REFUSALS  # e.g. broker still unreachable
                cap = renewal.RECOVER_RETRY_MAX_S if quick else renewal.RETRY_MAX_S
                log.info("next certificate %s attempt in %.0f s", kind, schedule.failed(time.monotonic(), cap))
