"""AWS IoT Core codecs (agent/wire/aws.py): the field names and topics of the official SDK's models
(aws-iot-device-sdk-python-v2 awsiot/iotidentity.py and awsiot/iotjobs.py), round trips, limits."""

from __future__ import annotations

import json

import pytest

from agent.wire import aws
from agent.wire.topics import DeviceTopics

THING = "gd-0123456789ab"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_our_topics_and_the_jobs_topics_are_within_the_limits() -> None:
    dev = DeviceTopics("g" + "x" * 63)  # the longest device id
    jobs = aws.JobsTopics(THING)
    for topic in (dev.telemetry, dev.health, dev.results, dev.acks, dev.status, dev.time, jobs.notify_next,
                  jobs.start_next, jobs.update("j" * 64) + "/accepted", *jobs.subscriptions):  # fmt: skip
        assert aws.topic_problem(topic) is None, topic


def test_topic_limits() -> None:
    assert aws.topic_problem("a/b/c/d/e/f/g/h") is None  # 7 slashes
    assert "8 slashes" in (aws.topic_problem("a/b/c/d/e/f/g/h/i") or "")
    assert aws.topic_problem("$aws/rules/r1/a/b/c/d/e/f/g/h") is None  # Basic Ingest prefix not counted
    assert aws.topic_problem("x" * 256) is None
    assert "257 bytes" in (aws.topic_problem("x" * 257) or "")
    assert aws.topic_problem("") is not None


def test_fleet_provisioning_field_names_are_the_sdks() -> None:
    # iotidentity.py CreateCertificateFromCsrRequest.to_payload / RegisterThingRequest.to_payload
    assert json.loads(aws.encode_create_from_csr(b"CSR")) == {"certificateSigningRequest": "CSR"}
    assert json.loads(aws.encode_register_thing("own", {"Token": "T"})) == {
        "certificateOwnershipToken": "own",
        "parameters": {"Token": "T"},
    }
    assert aws.CREATE_FROM_CSR == "$aws/certificates/create-from-csr/json"
    assert (
        aws.accepted(aws.provision_topic("GlucoTemplate"))
        == "$aws/provisioning-templates/GlucoTemplate/provision/json/accepted"
    )
    with pytest.raises(ValueError):
        aws.provision_topic("bad/name")


def test_fleet_provisioning_round_trips() -> None:
    created = aws.CertificateCreated("cid", PEM.encode(), "own-token")
    assert aws.decode_certificate_created(aws.encode_certificate_created(created)) == created
    assert aws.decode_create_from_csr(aws.encode_create_from_csr(b"CSR")) == b"CSR"
    assert aws.decode_register_thing(aws.encode_register_thing("own", {"a": "b"})) == ("own", {"a": "b"})
    registered = aws.ThingRegistered(THING, {"CommandKey": "PEM"})
    assert aws.decode_thing_registered(aws.encode_thing_registered(registered)) == registered
    rejection = aws.ServiceRejection(403, "AccessDenied", "refused by the pre-provisioning hook")
    assert aws.decode_service_rejection(aws.encode_service_rejection(rejection)) == rejection


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"[1]",
        b'{"certificateId": "c"}',
        b'{"certificateId":"c","certificatePem":"x","certificateOwnershipToken":"t"}',
    ],
)
def test_malformed_certificate_replies_are_refused(payload: bytes) -> None:
    with pytest.raises(aws.AwsMessageError):
        aws.decode_certificate_created(payload)


def test_malformed_registrations_are_refused() -> None:
    with pytest.raises(aws.AwsMessageError):
        aws.decode_thing_registered(b'{"thingName": "a/b"}')
    with pytest.raises(aws.AwsMessageError):
        aws.decode_register_thing(b'{"certificateOwnershipToken": "t", "parameters": {"a": 1}}')


def test_jobs_topics_match_the_sdk() -> None:
    t = aws.JobsTopics(THING)
    # iotjobs.py: '$aws/things/{0.thing_name}/jobs/notify-next', '.../start-next', '.../{0.job_id}/update'
    assert t.notify_next == f"$aws/things/{THING}/jobs/notify-next"
    assert t.start_next == f"$aws/things/{THING}/jobs/start-next"
    assert t.update("cmd-1") == f"$aws/things/{THING}/jobs/cmd-1/update"
    assert t.classify(t.notify_next) == ("notify-next", "")
    assert t.classify(t.start_next + "/accepted") == ("start-next/accepted", "")
    assert t.classify(t.update("cmd-1") + "/rejected") == ("update/rejected", "cmd-1")
    assert t.classify("$aws/things/other/jobs/notify-next") is None
    assert t.classify(t.start_next) is None  # our own request, not a reply
    with pytest.raises(ValueError):
        t.update("a/b")


def test_jobs_round_trips() -> None:
    execution = aws.JobExecution("cmd-1", aws.QUEUED, 1, 1, aws.command_document(b"\xd2\x84signed"))
    got = aws.decode_next_changed(aws.encode_next_changed(execution, THING, 10))
    assert got == execution
    assert aws.command_of(got.document) == b"\xd2\x84signed"
    assert aws.decode_next_changed(aws.encode_next_changed(None, THING, 10)) is None
    assert aws.decode_start_next(aws.encode_start_next("tok")) == ("tok", {})
    assert aws.decode_start_next_accepted(aws.encode_start_next_accepted(execution, THING, "tok", 1)) == (
        execution,
        "tok",
    )
    assert aws.decode_start_next_accepted(aws.encode_start_next_accepted(None, THING, "tok", 1)) == (None, "tok")
    update = aws.decode_update(aws.encode_update(aws.SUCCEEDED, 2, {"result": "ok"}, "tok"))
    assert update == aws.JobUpdate(aws.SUCCEEDED, 2, {"result": "ok"}, "tok")
    assert aws.decode_update_accepted(aws.encode_update_accepted(aws.SUCCEEDED, 3, {}, "tok", 1)) == (
        aws.SUCCEEDED,
        3,
        "tok",
    )
    rejection = aws.JobsRejection(aws.VERSION_MISMATCH, "expected version 1, is 2", "tok", aws.IN_PROGRESS, 2)
    assert aws.decode_jobs_rejection(aws.encode_jobs_rejection(rejection, 1)) == rejection


def test_update_field_names_are_the_sdks() -> None:
    # iotjobs.py UpdateJobExecutionRequest.to_payload: status, expectedVersion, statusDetails, clientToken
    body = json.loads(aws.encode_update(aws.IN_PROGRESS, 1, {}, "tok"))
    assert body == {"status": "IN_PROGRESS", "expectedVersion": 1, "statusDetails": {}, "clientToken": "tok"}
    with pytest.raises(ValueError):
        aws.encode_update(aws.QUEUED, 1, {}, "tok")  # the device may not queue a job


@pytest.mark.parametrize(
    "document",
    [{}, {"glucoagent": {"v": 2, "command": ""}}, {"glucoagent": {"v": 1, "command": "***"}}, {"glucoagent": "x"}],
)
def test_documents_without_our_command_are_refused(document: dict[str, object]) -> None:
    with pytest.raises(aws.AwsMessageError):
        aws.command_of(document)


def test_the_aws_profile_keeps_the_agent_inside_aws_limits() -> None:
    from agent.wire import profiles

    p = profiles.make_profile("aws", {})
    assert isinstance(p, aws.AwsProfile) and p.enrolment == "aws-fleet" and p.key_type == "p256"
    assert p.protocol("mqttv311") == "mqttv5"
    assert (p.keepalive(5), p.keepalive(60), p.keepalive(5000)) == (30, 60, 1200)  # AWS: 30..1200 s
    assert p.payload_limit(profiles.TELEMETRY) == aws.MAX_PAYLOAD_BYTES  # the uplink takes the smallest limit
    assert p.max_publish_rate is not None and p.max_publish_rate <= aws.MAX_PUBLISH_PER_S
    subs = p.subscriptions(THING)
    assert len(subs) <= aws.MAX_SUBSCRIPTIONS_PER_SUBSCRIBE
    for kind in profiles.OUTGOING:  # QoS 1 only (AWS refuses QoS 2), topics within 7 slashes and 256 bytes
        msg = p.outgoing(THING, kind, b"")
        assert msg.qos == 1 and aws.topic_problem(msg.topic) is None
    assert all(aws.topic_problem(t) is None for t in subs)
    assert p.classify(THING, DeviceTopics(THING).acks, b"a").kind == profiles.ACK
    assert p.classify(THING, DeviceTopics(THING).commands, b"c").kind == profiles.UNKNOWN  # commands are jobs here
    with pytest.raises(ValueError, match="aws_template"):
        profiles.make_profile("aws", {"aws_template": "no/slashes"})
