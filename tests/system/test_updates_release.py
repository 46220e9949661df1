"""Issue 16, step 1: a release is signed apart from commands, and the box pins the release key at provisioning.

Through the real parts: `glucoagent-backend init`/`release` as the operator runs them, a box provisioned
by `glucoagent provision` against the real broker and backend.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.errors import CommandRejected
from agent.update.keys import RELEASE_KEY_FILE, load_release_key
from agent.wire import release
from testbed.harness import GLUCOAGENT, LocalSystem

BACKEND = str(Path(GLUCOAGENT).with_name("glucoagent-backend"))


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with LocalSystem(tmp_path_factory.mktemp("updrel")) as s:
        yield s


def backend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKEND, *args], capture_output=True, text=True, timeout=60, check=False)


def package(tmp: Path, name: str, data: bytes = b"not really a package, signed all the same\n") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def test_init_makes_a_release_key_apart_from_the_command_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = backend("init", "--home", str(home))
    assert out.returncode == 0, out.stderr
    release_key, command_key = home / "release.key", home / "command.key"
    assert stat.S_IMODE(release_key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in release_key.read_bytes()
    assert release_key.read_bytes() != command_key.read_bytes()
    again = backend("init", "--home", str(home))  # a second init keeps the key: boxes pinned it
    assert again.returncode == 0
    assert (home / "release.key").read_bytes() == release_key.read_bytes()


def test_release_signs_a_manifest_the_box_verifies_with_the_pinned_key(system: LocalSystem, tmp_path: Path) -> None:
    state = system.device_dir("pinned")
    out = system.provision(state)
    assert out.returncode == 0, out.stdout + out.stderr
    pinned = state / RELEASE_KEY_FILE
    assert stat.S_IMODE(pinned.stat().st_mode) == 0o600
    expected = system.home.release_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pinned.read_bytes() == expected

    data = b"\x1f\x8b" + bytes(range(256)) * 40
    pkg = package(tmp_path, "glucoagent_0.2.0-1_all.ipk", data)
    out = backend("release", str(pkg), "--home", str(system.home.root), "--min-from", "0.1.0")
    assert out.returncode == 0, out.stderr
    manifest_file = tmp_path / "glucoagent_0.2.0-1_all.ipk.manifest"
    assert str(manifest_file) in out.stdout and "downgrade refused" in out.stdout
    signed = manifest_file.read_bytes()

    m = release.decode_manifest(signed, load_release_key(state))
    assert (m.name, m.version, m.format, m.size, m.min_from, m.downgrade) == (
        "glucoagent", "0.2.0-1", "ipk", len(data), "0.1.0", False
    )  # fmt: skip
    import hashlib

    assert m.sha256 == hashlib.sha256(data).digest()
    # The command key the same box pinned does not verify a release: the two jobs have two keys.
    command_key = serialization.load_pem_public_key((state / "command.pub").read_bytes())
    with pytest.raises(CommandRejected) as exc:
        release.decode_manifest(signed, command_key)  # type: ignore[arg-type]
    assert exc.value.code == "bad_signature"


def test_recall_release_of_an_apk(system: LocalSystem, tmp_path: Path) -> None:
    pkg = package(tmp_path, "glucoagent-0.1.0-r1.apk")
    out = backend("release", str(pkg), "--home", str(system.home.root), "--allow-downgrade")
    assert out.returncode == 0, out.stderr
    m = release.decode_manifest(
        pkg.with_name(pkg.name + ".manifest").read_bytes(), system.home.release_key.public_key()
    )
    assert (m.name, m.version, m.format, m.downgrade) == ("glucoagent", "0.1.0-r1", "apk", True)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("glucoagent.tar.gz", (), "not NAME_VERSION_ARCH.ipk nor NAME-VERSION.apk"),
        ("glucoagent_0.2.0-1_all.ipk", ("--min-from", "yesterday"), "bad min_from"),
        ("missing_0.2.0-1_all.ipk", (), "cannot read"),
    ],
)
def test_release_refusals_are_one_error_line(
    system: LocalSystem, tmp_path: Path, name: str, args: tuple[str, ...], message: str
) -> None:
    pkg = tmp_path / name
    if not name.startswith("missing"):
        package(tmp_path, name)
    out = backend("release", str(pkg), "--home", str(system.home.root), *args)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glucoagent-backend: error: ") and message in lines[0], out.stderr
    assert not list(tmp_path.glob("*.manifest"))


def test_a_box_provisioned_before_releases_refuses_updates_clearly(system: LocalSystem, tmp_path: Path) -> None:
    state = system.device_dir("old-box")
    assert system.provision(state).returncode == 0
    (state / RELEASE_KEY_FILE).unlink()  # what a box provisioned by a cloud without release keys has
    with pytest.raises(CommandRejected) as exc:
        load_release_key(state)
    assert exc.value.code == "no_release_key" and "re-provision" in str(exc.value)
    shutil.rmtree(state)
