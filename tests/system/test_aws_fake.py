"""The fake AWS IoT Core (testbed/clouds/aws_fake.py) holds AWS's documented contract: driven here by plain
MQTT 5 clients shaped like the AWS SDK samples, against the real mosquitto, TLS and our backend's hook."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.aws_client import AwsTestClient, provision_thing, tls_hello_without_sni

from agent.wire import aws
from testbed.clouds.aws_fake import TEMPLATE, AwsSystem


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsSystem]:
    with AwsSystem(tmp_path_factory.mktemp("aws")) as sys_:
        yield sys_


@pytest.fixture(scope="module")
def thing(system: AwsSystem, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    token = system.token("patient-aws")
    params = {"EnrolmentToken": token, "PatientRef": "patient-aws", "SerialNumber": "s-1"}
    assert system.gate is not None
    creds, reply = provision_thing(
        system.home.pki.claim, system.gate.port, TEMPLATE, params, tmp_path_factory.mktemp("box")
    )
    assert creds is not None, reply
    registered = aws.decode_thing_registered(reply)
    return registered.thing_name, creds


def port(system: AwsSystem) -> int:
    assert system.gate is not None
    return system.gate.port


def test_fleet_provisioning_enrols_through_the_hook(system: AwsSystem, thing: tuple[str, object]) -> None:
    name, _creds = thing
    assert name.startswith("gd-")
    event = system.aws.hook_calls[-1]
    assert set(event) >= {"claimCertificateId", "certificateId", "certificatePem", "templateArn", "parameters"}
    assert "EnrolmentToken" in event["parameters"]
    with system.db.tx() as db:  # our backend enrolled the device in the hook, bound to the patient
        assert db.execute("SELECT 1 FROM devices WHERE device_id = ?", (name,)).fetchone()


def test_a_refused_token_is_a_403_from_the_hook(system: AwsSystem, tmp_path: Path) -> None:
    params = {"EnrolmentToken": "NOSUCHTOKEN23456", "PatientRef": "patient-aws", "SerialNumber": "s-2"}
    creds, reply = provision_thing(system.home.pki.claim, port(system), TEMPLATE, params, tmp_path)
    assert creds is None
    assert aws.decode_service_rejection(reply) == aws.ServiceRejection(
        403, "AccessDenied", "the pre-provisioning hook did not allow provisioning"
    )


def test_the_claim_certificate_reaches_only_the_provisioning_topics(system: AwsSystem) -> None:
    claim = AwsTestClient(system.home.pki.claim, "claim-outside", port(system))
    try:
        mid = claim.publish("gluco/v1/dev/gd-000000000000/telemetry", b"x")
        assert claim.puback(mid) == 0x87  # not authorised (MQTT 5 PUBACK reason code)
        mid = claim.publish("$aws/things/gd-000000000000/jobs/start-next", b"{}")
        assert claim.puback(mid) == 0x87
    finally:
        claim.close()


def test_a_connection_without_sni_is_refused(system: AwsSystem) -> None:
    assert system.gate is not None
    before = len(system.gate.refused_sni)
    assert not tls_hello_without_sni(port(system))
    assert system.gate.refused_sni[before:] == [None]


def test_a_job_queued_while_the_thing_is_offline_runs_once(system: AwsSystem, thing: tuple[str, object]) -> None:
    name, creds = thing
    jobs = aws.JobsTopics(name)
    system.aws.create_job(name, "cmd-offline-1", aws.command_document(b"signed-command"))
    with pytest.raises(ValueError, match="ResourceAlreadyExists"):
        system.aws.create_job(name, "cmd-offline-1", aws.command_document(b"again"))
    box = AwsTestClient(creds, name, port(system))  # type: ignore[arg-type]
    try:
        box.subscribe(*jobs.subscriptions)
        box.publish(jobs.start_next, aws.encode_start_next("t1"))
        execution, token = aws.decode_start_next_accepted(box.expect(jobs.start_next + "/accepted"))
        assert token == "t1" and execution is not None
        assert (execution.job_id, execution.status, execution.version_number) == ("cmd-offline-1", aws.IN_PROGRESS, 2)
        assert aws.command_of(execution.document) == b"signed-command"
        # a second start-next (a restart) hands back the same execution in progress, not a new one
        box.publish(jobs.start_next, aws.encode_start_next("t2"))
        again, _ = aws.decode_start_next_accepted(box.expect(jobs.start_next + "/accepted"))
        assert again is not None and again.job_id == "cmd-offline-1" and again.version_number == 2
        # a stale expectedVersion is refused with the execution's state
        box.publish(jobs.update("cmd-offline-1"), aws.encode_update(aws.SUCCEEDED, 1, {}, "t3"))
        refused = aws.decode_jobs_rejection(box.expect(jobs.update("cmd-offline-1") + "/rejected"))
        assert (refused.code, refused.status, refused.version_number) == (aws.VERSION_MISMATCH, aws.IN_PROGRESS, 2)
        box.publish(jobs.update("cmd-offline-1"), aws.encode_update(aws.SUCCEEDED, 2, {"result": "ok"}, "t4"))
        assert aws.decode_update_accepted(box.expect(jobs.update("cmd-offline-1") + "/accepted")) == (
            aws.SUCCEEDED,
            3,
            "t4",
        )
        assert aws.decode_next_changed(box.expect(jobs.notify_next)) is None  # nothing pending any more
        # a terminal execution stays terminal
        box.publish(jobs.update("cmd-offline-1"), aws.encode_update(aws.SUCCEEDED, None, {}, "t5"))
        assert (
            aws.decode_jobs_rejection(box.expect(jobs.update("cmd-offline-1") + "/rejected")).code
            == aws.INVALID_STATE_TRANSITION
        )
        # a new job while connected: notify-next carries it
        system.aws.create_job(name, "cmd-online-2", aws.command_document(b"second"))
        nxt = aws.decode_next_changed(box.expect(jobs.notify_next))
        assert nxt is not None and nxt.job_id == "cmd-online-2" and nxt.status == aws.QUEUED
    finally:
        box.close()
    assert json.loads((system.run / "aws" / "jobs.json").read_text())[name][0]["status"] == aws.SUCCEEDED


def test_limits_are_refused_as_aws_refuses_them(system: AwsSystem, thing: tuple[str, object]) -> None:
    name, creds = thing
    box = AwsTestClient(creds, name, port(system))  # type: ignore[arg-type]
    tap = AwsTestClient(system.home.pki.backend, "backend-tap", port(system))
    try:
        tap.subscribe("gluco/v1/dev/+/health")
        assert box.connack[1].MaximumQoS == 0x01  # "MQTT 5 supported features": Maximum QoS 1
        topic = f"gluco/v1/dev/{name}/health"
        big = box.publish(topic, b"x" * (aws.MAX_PAYLOAD_BYTES + 1))
        assert box.puback(big) == 0x87
        fits = box.publish(topic, b"y" * aws.MAX_PAYLOAD_BYTES)
        assert box.puback(fits) == 0
        assert tap.expect(topic) == b"y" * aws.MAX_PAYLOAD_BYTES
        deep = box.publish(f"gluco/v1/dev/{name}/health/a/b/c/d", b"z")  # 8 slashes
        assert box.puback(deep) == 0x87
        # 100 publishes per second per connection: a burst of 150 within one second is cut
        time.sleep(1.0 - time.time() % 1.0 + 0.05)
        mids = [box.publish(topic, b"r%d" % i) for i in range(150)]
        codes = [box.puback(m) for m in mids]
        assert codes.count(0x87) >= 30 and codes.count(0) >= 80, codes
        # QoS 2 is not supported: the broker ends the connection
        box.client.publish(topic, b"q2", qos=2)
        deadline = time.monotonic() + 10
        while box.disconnected is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.disconnected is not None and box.disconnected.value == 0x9B  # QoS not supported
        assert "publish rate exceeded" in system.broker.log_text()
    finally:
        box.close()
        tap.close()
