"""Enrolment of a fresh box on the fake AWS IoT Core (agent/identity/provisioning.py with the aws profile's
exchange, agent/identity/aws_provisioning.py): fleet provisioning by CSR, our token checked by the
pre-provisioning hook, one clear refusal when the hook says no."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import MqttSection
from agent.errors import ProvisioningError, TokenRejected
from agent.identity.credentials import load_identity, load_or_create_key
from agent.identity.provisioning import KeyTypeRefused, provision
from agent.wire import aws
from testbed.clouds.aws_fake import AwsSystem
from testbed.harness import GLUCOAGENT

AWS = MqttSection(profile="aws")


def provision_aws(state: Path, endpoint: str, token: str, patient: str, out: Callable[[str], None]) -> str:
    return provision(state, endpoint, token, patient, mqtt=AWS, out=out)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsSystem]:
    with AwsSystem(tmp_path_factory.mktemp("aws-prov")) as sys_:
        yield sys_


def test_a_fresh_box_enrols_with_one_call(system: AwsSystem) -> None:
    state = system.device_dir("fresh")
    lines: list[str] = []
    token = system.token("p-1")
    thing = provision_aws(state, system.endpoint, token, "p-1", out=lines.append)
    assert [line.rsplit(" ... ", 1)[1].split(" ")[0] for line in lines] == ["ok"] * 6, lines
    assert lines[3].endswith(f"(device id {thing})")
    ident = load_identity(state)
    assert ident.device_id == thing
    assert ident.command_key is not None
    for name in ("device.key", "device.crt", "command.pub", "device.json"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    with system.db.tx() as db:  # enrolled by the hook, bound to the patient
        assert db.execute("SELECT patient_ref FROM devices WHERE device_id = ?", (thing,)).fetchone() == ("p-1",)
    # re-running with the same token from the same box is safe (the hook accepts the box that used it)
    assert provision_aws(state, system.endpoint, token, "p-1", out=lambda _l: None) == thing


def test_a_refused_token_ends_in_one_clear_error(system: AwsSystem) -> None:
    state = system.device_dir("refused")
    lines: list[str] = []
    with pytest.raises(TokenRejected, match="provisioning hook") as err:
        provision_aws(state, system.endpoint, "NOSUCHTOKEN23456", "p-2", out=lines.append)
    assert err.value.exit_code == 51
    assert lines[-1].endswith("... failed") and lines[-1].startswith("[4/6]")
    assert not (state / "device.json").exists()


def test_a_kept_ed25519_key_is_refused_before_any_network(system: AwsSystem) -> None:
    state = system.device_dir("ed-kept")
    load_or_create_key(state, "ed25519")  # a box enrolled on our broker before: its key stays Ed25519
    lines: list[str] = []
    with pytest.raises(KeyTypeRefused, match="deprovision"):
        provision_aws(state, "mqtts://nowhere.invalid:8883", "T", "p-3", out=lines.append)
    assert lines[-1].startswith("[2/6]") and lines[-1].endswith("failed")  # before any network


def test_a_thing_not_named_after_the_box_key_is_refused_before_anything_is_saved(system: AwsSystem) -> None:
    # The thing name is the box's device id from then on (client id, topics), and our backend knows the box by
    # the id its key yields: a template that names the thing otherwise (or a reply meant for another box)
    # must end enrolment with one clear error, not leave credentials under a foreign id
    state = system.device_dir("misnamed")
    hook = system.aws.hook
    system.aws.hook = lambda event: {**hook(event), "parameterOverrides": {aws.THING_PARAM: "someone-else"}}
    try:
        with pytest.raises(ProvisioningError, match="someone-else") as err:
            provision_aws(state, system.endpoint, system.token("p-9"), "p-9", out=lambda _l: None)
    finally:
        system.aws.hook = hook
    assert "device id" in str(err.value)
    assert not (state / "device.json").exists()


def test_an_ed25519_key_asked_for_under_aws_is_refused_not_swapped(tmp_path: Path) -> None:
    """Under the aws profile the box makes a P-256 key; a technician who asks for Ed25519 is told, before
    anything is made or sent (exit 54), rather than getting another key type than the one asked for."""
    state = tmp_path / "state"
    config = tmp_path / "glucoagent"
    config.write_text(f"config agent 'agent'\n\toption state_dir '{state}'\n\nconfig mqtt 'mqtt'\n\toption profile 'aws'\n")
    argv = [GLUCOAGENT, "--config", str(config), "provision", "--endpoint", "mqtts://nowhere.invalid:8883",
            "--token", "T", "--patient", "p-4", "--key-type", "ed25519"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 54, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "glucoagent: error: AWS IoT Core takes no Ed25519 device certificate: leave out --key-type "
        "(the box makes a P-256 key)"
    ]
    assert not state.exists() or not any(state.rglob("*.key"))
