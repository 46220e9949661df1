"""Our signed commands over AWS IoT Jobs (docs/clouds.md "AWS IoT Core"), on the uplink thread.

AWS keeps a persistent session one hour by default, so a command for a box that is offline longer
travels as a job: the job survives, the session need not. The box's part (developer guide "Jobs device
MQTT API", as aws-iot-device-client's ``source/jobs/JobsFeature.cpp`` does it): on every connection it
subscribes to its Jobs replies and asks ``start-next``; a ``notify-next`` naming another job asks again.
The execution ``start-next`` hands over carries our COSE command in its document
(``agent.wire.aws.command_of``); it goes to the executor exactly like a message on our commands topic
(stored before it counts as received, verified, run once by the journal). When the executor has put the
command's signed result into its outbox (it goes to the results topic as on our broker), the execution
is updated to SUCCEEDED, FAILED or REJECTED with ``expectedVersion``; then ``start-next`` again.

Exactly once across crashes and re-deliveries: a job handed over twice (a restart between the result and
the update, a second ``notify-next``) is a replay for the executor's journal: nothing runs again, the
stored result is sent again, and the update follows.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

import cbor2

from agent.errors import GlucoagentError
from agent.wire import aws, cose
from agent.wire.profiles import CloudProfile

log = logging.getLogger(__name__)

STATUS_OF_RESULT = {"ok": aws.SUCCEEDED, "failed": aws.FAILED, "refused": aws.REJECTED}
TRANSIENT = frozenset({aws.REQUEST_THROTTLED, aws.INTERNAL_ERROR})  # an update refused for now, not for good
RETRY_S = 30.0  # a transiently refused update goes again after this


class JobsLink(Protocol):
    """What the bridge needs of the MQTT link (agent.link.mqtt.MqttLink)."""

    def subscribe(self, topics: list[str]) -> list[int]: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int: ...


def _peek(signed: bytes, key: str) -> str | None:
    """A string field of a COSE_Sign1 payload map, read without verifying (for matching only: the executor
    verifies commands, and results are our own)."""
    try:
        body = cbor2.loads(cose.parse_sign1(signed)[3])
    except (GlucoagentError, ValueError, cbor2.CBORDecodeError, TypeError, IndexError):
        return None
    value = body.get(key) if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def result_status(result: bytes) -> str | None:
    """Our own signed result's status (ok, failed, refused, pending)."""
    return _peek(result, "status")


class JobsBridge:
    """One thing's job executions in, our commands out to ``submit``, outcomes back as execution updates."""

    def __init__(self, thing: str, submit: Callable[[bytes], bool]) -> None:
        self.topics = aws.JobsTopics(thing)
        self.submit = submit  # the executor's: True once the command is stored durably
        self._lock = threading.Lock()
        self._current: aws.JobExecution | None = None  # handed to the executor, not yet updated to terminal
        self._cmd_id = ""  # the id of the command ``_current`` carries (its results are the job's)
        self._outcome: tuple[str, str, str] | None = None  # (job id, status, result code) to report
        self._ask = False  # ask start-next at the next tick
        self._asked_token = ""  # the start-next whose answer we wait for
        self._update_sent = False
        self._retry_at = 0.0  # monotonic time before which a transiently refused update is not sent again
        self._given_up: set[str] = set()  # jobs whose update the service refused for good, left to the cloud
        self.started = 0  # executions handed to the executor (a replay counts too)

    @property
    def subscriptions(self) -> list[str]:
        return list(self.topics.subscriptions)

    def on_connect(self) -> None:
        """A new connection: whatever we were waiting for is asked again."""
        with self._lock:
            self._ask, self._asked_token, self._update_sent = True, "", False

    def on_result(self, cmd_id: str, result: bytes) -> None:
        """Executor thread: a signed result went into the outbox."""
        status = result_status(result)
        if status not in STATUS_OF_RESULT:
            return  # "pending" progress of a renewal, or unreadable: not the end of the job
        with self._lock:
            current = self._current
            if current is not None and cmd_id in (self._cmd_id or current.job_id, ""):
                self._outcome = (current.job_id, STATUS_OF_RESULT[status], status)
                self._update_sent = False

    def on_message(self, topic: str, payload: bytes) -> bool | None:
        """A message on a Jobs topic: handled (True, or False to leave it unacknowledged); None: not ours."""
        kind = self.topics.classify(topic)
        if kind is None:
            return None
        what, job_id = kind
        try:
            if what == "notify-next":
                execution = aws.decode_next_changed(payload)
                with self._lock:
                    if execution is not None and (self._current is None or self._current.job_id != execution.job_id):
                        self._ask = True
            elif what == "start-next/accepted":
                execution, token = aws.decode_start_next_accepted(payload)
                return self._take(execution, token)
            elif what == "start-next/rejected":
                rejection = aws.decode_jobs_rejection(payload)
                log.warning("jobs: start-next refused (%s): %s", rejection.code, rejection.message)
                with self._lock:
                    self._asked_token = ""
            else:
                self._updated(what, job_id, payload)
        except aws.AwsMessageError as exc:
            log.error("jobs: %s", exc)
        return True

    def _take(self, execution: aws.JobExecution | None, token: str) -> bool:
        with self._lock:
            if token != self._asked_token:
                return True  # an answer to an earlier connection's question: ours is on its way
            self._asked_token = ""
            if execution is None:
                self._current = None
                return True
            if execution.job_id in self._given_up:  # handed back still IN_PROGRESS: replaying it changes nothing
                log.debug("jobs: job %s was given up; waiting for the cloud to end it", execution.job_id)
                self._current = None
                return True
        try:
            command = aws.command_of(execution.document)
        except aws.AwsMessageError as exc:
            log.error("jobs: job %s carries no command of ours (%s); reported FAILED", execution.job_id, exc)
            with self._lock:
                self._current, self._outcome = execution, (execution.job_id, aws.FAILED, "no_command")
                self._cmd_id = ""
            return True
        with self._lock:
            if self._current is not None and self._current.job_id == execution.job_id and self._outcome:
                self._current = execution  # handed over again (version may have moved): report what we have
                self._update_sent = False
                return True
            self._current, self._outcome, self._update_sent = execution, None, False
            self._cmd_id = _peek(command, "id") or execution.job_id  # = the job id when our backend sent it
        if not self.submit(command):
            with self._lock:
                self._current = None
            return False  # not durable: asked again on the next connection
        self.started += 1
        log.info("jobs: job %s (execution %d) handed to the executor", execution.job_id, execution.execution_number)
        return True

    def _updated(self, what: str, job_id: str, payload: bytes) -> None:
        with self._lock:
            current = self._current
        if current is None or current.job_id != job_id:
            return
        version: int | None
        if what == "update/accepted":
            status, version, _token = aws.decode_update_accepted(payload)
            done, given_up = status in aws.TERMINAL, False
        else:
            rejection = aws.decode_jobs_rejection(payload)
            log.warning("jobs: update of %s refused (%s): %s", job_id, rejection.code, rejection.message)
            # A stale version is worth another update at once, a throttled one later; anything else (the job
            # deleted, ended by the cloud, a request it refuses) would be refused again, round trip after round
            # trip. Our signed result went to the results topic anyway: nothing left to say.
            transient = rejection.code in TRANSIENT and rejection.status not in aws.TERMINAL
            done = not transient and (rejection.status in aws.TERMINAL or rejection.code != aws.VERSION_MISMATCH)
            given_up = done and rejection.status not in aws.TERMINAL  # still IN_PROGRESS: the cloud must end it
            version = rejection.version_number
            if transient:
                with self._lock:
                    self._update_sent, self._retry_at = False, time.monotonic() + RETRY_S
                return
        with self._lock:
            if given_up:
                log.error("jobs: job %s is left for the cloud to end: its update is refused for good", job_id)
                self._given_up.add(job_id)
            if done:
                log.info("jobs: job %s ended", job_id)
                self._current, self._outcome, self._ask = None, None, True
            elif version is not None and version != current.version_number:  # retried with the service's version
                self._update_sent = False
                self._current = aws.JobExecution(
                    job_id, current.status, version, current.execution_number, current.document
                )
            else:  # stale without the service's version: start-next hands the execution back with it (_take)
                self._ask = True

    def tick(self, link: JobsLink) -> None:
        """Uplink thread, every pass: report an outcome, or ask for the next job."""
        with self._lock:
            current, outcome = self._current, self._outcome
            report = current is not None and outcome is not None and not self._update_sent
            report = report and time.monotonic() >= self._retry_at
            ask = self._ask and not self._asked_token and not report and (current is None or outcome is not None)
            if report:
                self._update_sent = True
            if ask:
                self._ask, self._asked_token = False, secrets.token_hex(8)
            token = self._asked_token
        if report:
            assert current is not None and outcome is not None
            details = {"result": outcome[2]}
            link.publish(
                self.topics.update(current.job_id),
                aws.encode_update(outcome[1], current.version_number, details, token or secrets.token_hex(8)),
            )
        elif ask:
            link.publish(self.topics.start_next, aws.encode_start_next(token))


def jobs_bridge(profile: CloudProfile, device_id: str, submit: Callable[[bytes], bool]) -> JobsBridge | None:
    """The bridge where the profile carries commands as AWS IoT Jobs (the ``aws`` profile); None elsewhere."""
    return JobsBridge(device_id, submit) if isinstance(profile, aws.AwsProfile) else None
