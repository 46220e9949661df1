"""The Jobs bridge (agent/link/aws_jobs.py) against recorded AWS replies: one run per job, whatever arrives twice."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.link import aws_jobs
from agent.link.aws_jobs import JobsBridge, result_status
from agent.wire import aws, cose
from agent.wire.command import encode_command
from agent.wire.result import encode_result

THING = "gd-0123456789ab"
KEY = ec.generate_private_key(ec.SECP256R1())


class Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    def subscribe(self, topics: list[str]) -> list[int]:
        return [1] * len(topics)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        self.sent.append((topic, json.loads(payload)))
        return len(self.sent)


def result(cmd_id: str, status: str) -> bytes:
    return cose.sign1(KEY, encode_result(cmd_id, THING, status, "done", ""))


def execution(job_id: str, version: int = 2) -> aws.JobExecution:
    return aws.JobExecution(job_id, aws.IN_PROGRESS, version, 1, aws.command_document(job_id.encode()))


def accepted(bridge: JobsBridge, link: Link, ex: aws.JobExecution | None) -> bool | None:
    token = link.sent[-1][1]["clientToken"]
    assert isinstance(token, str)
    return bridge.on_message(
        bridge.topics.start_next + "/accepted", aws.encode_start_next_accepted(ex, THING, token, 1)
    )


def test_result_status_reads_our_signed_result() -> None:
    assert result_status(result("cmd-00000001", "ok")) == "ok"
    assert result_status(b"garbage") is None


def test_a_job_runs_once_and_is_reported() -> None:
    submitted: list[bytes] = []
    bridge, link = JobsBridge(THING, lambda b: submitted.append(b) or True), Link()
    bridge.on_connect()
    bridge.tick(link)
    assert link.sent[-1][0] == bridge.topics.start_next
    assert accepted(bridge, link, execution("cmd-00000001")) is True
    assert submitted == [b"cmd-00000001"]
    bridge.tick(link)  # running: neither an update nor another start-next
    assert len(link.sent) == 1
    # a notify-next for the same job while it runs changes nothing
    bridge.on_message(bridge.topics.notify_next, aws.encode_next_changed(execution("cmd-00000001"), THING, 1))
    bridge.tick(link)
    assert len(link.sent) == 1
    bridge.on_result("cmd-00000001", result("cmd-00000001", "ok"))
    bridge.tick(link)
    topic, body = link.sent[-1]
    assert topic == bridge.topics.update("cmd-00000001")
    assert (body["status"], body["expectedVersion"], body["statusDetails"]) == (aws.SUCCEEDED, 2, {"result": "ok"})
    update = bridge.topics.update("cmd-00000001")
    bridge.on_message(update + "/accepted", aws.encode_update_accepted(aws.SUCCEEDED, 3, {}, "", 1))
    bridge.tick(link)
    assert link.sent[-1][0] == bridge.topics.start_next  # the next one
    assert accepted(bridge, link, None) is True
    assert submitted == [b"cmd-00000001"]


def test_after_a_restart_the_job_in_progress_is_handed_over_again_and_reported() -> None:
    # the executor's journal makes the second hand-over a replay: its stored result comes back at once
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000002"))
    bridge.on_result("cmd-00000002", result("cmd-00000002", "failed"))
    bridge.tick(link)
    assert link.sent[-1][1]["status"] == aws.FAILED
    # the connection drops before the update's answer: on the next one the update goes again
    bridge.on_connect()
    bridge.tick(link)
    assert link.sent[-1][0] == bridge.topics.update("cmd-00000002")


def test_a_stale_version_is_retried_with_the_services_version() -> None:
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000003"))
    bridge.on_result("cmd-00000003", result("cmd-00000003", "refused"))
    bridge.tick(link)
    assert link.sent[-1][1]["status"] == aws.REJECTED
    update = bridge.topics.update("cmd-00000003")
    rejection = aws.JobsRejection(aws.VERSION_MISMATCH, "stale", "", aws.IN_PROGRESS, 5)
    bridge.on_message(update + "/rejected", aws.encode_jobs_rejection(rejection, 1))
    bridge.tick(link)
    assert link.sent[-1][0] == update and link.sent[-1][1]["expectedVersion"] == 5


def test_a_job_not_stored_is_left_unacknowledged() -> None:
    bridge, link = JobsBridge(THING, lambda b: False), Link()
    bridge.on_connect()
    bridge.tick(link)
    assert accepted(bridge, link, execution("cmd-00000004")) is False


def test_other_topics_are_not_the_bridges() -> None:
    assert JobsBridge(THING, lambda b: True).on_message("gluco/v1/dev/x/acks", b"") is None


def reported(link: Link, bridge: JobsBridge, job_id: str) -> int:
    return sum(1 for topic, _ in link.sent if topic == bridge.topics.update(job_id))


def test_an_update_refused_for_good_is_not_sent_again() -> None:
    # a job deleted in the cloud (ResourceNotFound, no execution state): another update would be refused the
    # same way, round trip after round trip; the bridge lets the job go and asks for the next one
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000005"))
    bridge.on_result("cmd-00000005", result("cmd-00000005", "ok"))
    bridge.tick(link)
    update = bridge.topics.update("cmd-00000005")
    gone = aws.JobsRejection(aws.RESOURCE_NOT_FOUND, "job cmd-00000005 not found")
    bridge.on_message(update + "/rejected", aws.encode_jobs_rejection(gone, 1))
    for _ in range(3):
        bridge.tick(link)
    assert reported(link, bridge, "cmd-00000005") == 1
    assert link.sent[-1][0] == bridge.topics.start_next


def test_a_stale_version_without_the_services_version_asks_start_next_for_it() -> None:
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000006"))
    bridge.on_result("cmd-00000006", result("cmd-00000006", "ok"))
    bridge.tick(link)
    update = bridge.topics.update("cmd-00000006")
    stale = aws.JobsRejection(aws.VERSION_MISMATCH, "stale")
    bridge.on_message(update + "/rejected", aws.encode_jobs_rejection(stale, 1))
    bridge.tick(link)
    bridge.tick(link)
    assert reported(link, bridge, "cmd-00000006") == 1  # not the same stale version again
    assert link.sent[-1][0] == bridge.topics.start_next
    assert accepted(bridge, link, execution("cmd-00000006", version=7)) is True
    bridge.tick(link)
    assert link.sent[-1][0] == update and link.sent[-1][1]["expectedVersion"] == 7


def test_a_throttled_update_is_sent_again_later_not_at_once_and_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # RequestThrottled / InternalError (iotjobs.py RejectedErrorCode) pass: the update goes again after a pause
    now = [1000.0]
    monkeypatch.setattr(aws_jobs.time, "monotonic", lambda: now[0])
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000007"))
    bridge.on_result("cmd-00000007", result("cmd-00000007", "ok"))
    bridge.tick(link)
    update = bridge.topics.update("cmd-00000007")
    throttled = aws.JobsRejection(aws.REQUEST_THROTTLED, "slow down")
    bridge.on_message(update + "/rejected", aws.encode_jobs_rejection(throttled, 1))
    bridge.tick(link)
    assert reported(link, bridge, "cmd-00000007") == 1  # not at once
    now[0] += aws_jobs.RETRY_S
    bridge.tick(link)
    assert reported(link, bridge, "cmd-00000007") == 2
    assert link.sent[-1][1]["status"] == aws.SUCCEEDED


def test_a_job_whose_update_is_refused_for_good_is_not_run_again_when_handed_back() -> None:
    # InvalidRequest leaves the execution IN_PROGRESS, so start-next hands it back: replaying it would send the
    # stored result and the refused update again, round after round
    submitted: list[bytes] = []
    bridge, link = JobsBridge(THING, lambda b: submitted.append(b) or True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, execution("cmd-00000008"))
    bridge.on_result("cmd-00000008", result("cmd-00000008", "ok"))
    bridge.tick(link)
    update = bridge.topics.update("cmd-00000008")
    refused = aws.JobsRejection(aws.INVALID_REQUEST, "bad request", "", aws.IN_PROGRESS, 2)
    bridge.on_message(update + "/rejected", aws.encode_jobs_rejection(refused, 1))
    bridge.tick(link)
    assert link.sent[-1][0] == bridge.topics.start_next
    assert accepted(bridge, link, execution("cmd-00000008")) is True
    for _ in range(3):
        bridge.tick(link)
    assert submitted == [b"cmd-00000008"] and reported(link, bridge, "cmd-00000008") == 1
    assert link.sent[-1][0] == bridge.topics.start_next  # nothing more until the cloud says something new
    # another job queued behind it: notify-next names it, and it is asked for
    bridge.on_message(bridge.topics.notify_next, aws.encode_next_changed(execution("cmd-00000009"), THING, 1))
    bridge.tick(link)
    assert sum(1 for topic, _ in link.sent if topic == bridge.topics.start_next) == 3


def test_a_job_named_otherwise_than_its_command_is_still_reported() -> None:
    # CreateJob's jobId is the command id when our backend sends it (backend/aws.py); a job named otherwise by
    # other tooling must not hold the bridge forever: its result is matched by the command's own id
    key = ed25519.Ed25519PrivateKey.generate()
    command = encode_command(key, "cmd-00000010", THING, "ping", {}, issued_at=1, expires_at=2)
    job = aws.JobExecution("clinic-job-7", aws.IN_PROGRESS, 2, 1, aws.command_document(command))
    bridge, link = JobsBridge(THING, lambda b: True), Link()
    bridge.on_connect()
    bridge.tick(link)
    accepted(bridge, link, job)
    bridge.on_result("cmd-00000010", result("cmd-00000010", "ok"))
    bridge.tick(link)
    assert link.sent[-1][0] == bridge.topics.update("clinic-job-7") and link.sent[-1][1]["status"] == aws.SUCCEEDED
    bridge.on_result("cmd-00000099", result("cmd-00000099", "failed"))  # another command's result: not this job's
    bridge.tick(link)
    assert reported(link, bridge, "clinic-job-7") == 1
