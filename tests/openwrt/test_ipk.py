"""Structure of the .ipk as opkg(-lede) reads it, checked on the real gzip and tar bytes."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import marshal
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from agent.config import SCHEMA, AgentSection, build_config
from agent.uci import parse_uci
from openwrt import build_ipk as B

REPO = Path(__file__).resolve().parents[2]
EXECUTABLES = {B.LAUNCHER, B.INIT, "/usr/libexec/glucoagent-update-watchdog"}
SDK_POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""


def _gz_header_ok(blob: bytes) -> None:
    assert blob[:3] == b"\x1f\x8b\x08"
    assert blob[3] & 0x08 == 0, "gzip header carries a file name"
    assert blob[4:8] == b"\0\0\0\0", "gzip header carries a time"


def _tar(blob: bytes) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    _gz_header_ok(blob)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        members = tf.getmembers()
        data = {m.name: tf.extractfile(m).read() for m in members if m.isfile()}  # type: ignore[union-attr]
    return members, data


@pytest.fixture(scope="module")
def outer(ipk: Path) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    return _tar(ipk.read_bytes())


@pytest.fixture(scope="module")
def control(outer: tuple) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    return _tar(outer[1]["./control.tar.gz"])


@pytest.fixture(scope="module")
def data(outer: tuple) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    return _tar(outer[1]["./data.tar.gz"])


@pytest.fixture(scope="module")
def fields(control: tuple) -> dict[str, str]:
    text = control[1]["./control"].decode()
    out: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith(" "):
            out[key] += "\n" + line[1:]
        else:
            key, _, value = line.partition(": ")
            out[key] = value
    return out


def _dev(name: str) -> str:
    """Device path of a member name (tarfile reads "./etc/" back as "./etc" and "./" as ".")."""
    return "/" if name in (".", "./") else "/" + name.removeprefix("./").rstrip("/")


def _paths(members: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    return {_dev(m.name): m for m in members}


def test_file_name_and_outer_members(ipk: Path, outer: tuple) -> None:
    assert ipk.name == f"glucoagent_{B.package_version()}_all.ipk"
    assert re.fullmatch(r"glucoagent_\d+\.\d+\.\d+-\d+_all\.ipk", ipk.name)
    members, blobs = outer
    assert [m.name for m in members] == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert blobs["./debian-binary"] == b"2.0\n"
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, "", "", 0o644)


def test_control_fields(fields: dict[str, str], control: tuple) -> None:
    keys = [line.split(":")[0] for line in control[1]["./control"].decode().splitlines() if not line.startswith(" ")]
    assert len(keys) == len(set(keys)), "a field given twice"
    required = ["Package", "Version", "Depends", "Source", "SourceName", "License", "Section", "Maintainer"]
    required += ["Architecture", "Installed-Size", "Description", "SourceDateEpoch"]
    for key in required:
        assert fields.get(key), key
    assert fields["Package"] == "glucoagent"
    assert re.fullmatch(r"[a-zA-Z0-9_.+-]+", fields["Package"])
    assert fields["Version"] == B.package_version()
    assert fields["Architecture"] == "all"
    deps = [d.split(" ")[0] for d in fields["Depends"].split(", ")]
    assert deps[:2] == ["libc", "python3-light"]
    for needed in ("python3-cryptography", "python3-pyserial", "python3-sqlite3", "python3-openssl", "python3-logging"):
        assert needed in deps
    assert "python3-paho-mqtt" not in deps  # 1.6.1 on 23.05/24.10; paho 2.x is vendored
    desc = fields["Description"].split("\n")
    assert len(desc) >= 2 and all(desc)


def test_installed_size_is_the_uncompressed_data_tar(outer: tuple, fields: dict[str, str]) -> None:
    assert int(fields["Installed-Size"]) == len(gzip.decompress(outer[1]["./data.tar.gz"]))


def test_control_members_conffiles_and_scripts(control: tuple, data: tuple) -> None:
    members, blobs = control
    assert [m.name for m in members] == [".", "./conffiles", "./control", "./postinst", "./postinst-pkg", "./prerm"]
    modes = {m.name: m.mode for m in members}
    assert modes["./postinst"] == modes["./prerm"] == 0o755
    assert modes["./control"] == modes["./conffiles"] == modes["./postinst-pkg"] == 0o644
    assert all((m.uid, m.gid) == (0, 0) for m in members)
    assert blobs["./postinst"].decode() == SDK_POSTINST
    assert "default_prerm $0 $@" in blobs["./prerm"].decode()
    conffiles = blobs["./conffiles"].decode().splitlines()
    assert conffiles == ["/etc/config/glucoagent"]
    shipped = _paths(data[0])
    for path in conffiles:
        assert shipped[path].isfile()


def test_scripts_are_valid_posix_sh(control: tuple, data: tuple, tmp_path: Path) -> None:
    scripts = {
        "postinst": control[1]["./postinst"],
        "prerm": control[1]["./prerm"],
        "postinst-pkg": control[1]["./postinst-pkg"],
        "init": data[1]["./etc/init.d/glucoagent"],
        "hotplug": data[1]["./etc/hotplug.d/tty/50-glucoagent"],
        "functions.sh": (REPO / "openwrt" / "emul" / "functions.sh").read_bytes(),
    }
    for name, body in scripts.items():
        path = tmp_path / name
        path.write_bytes(body)
        proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, (name, proc.stderr)


def test_data_owners_modes_times_and_order(data: tuple) -> None:
    members, _ = data
    epoch = B.source_date_epoch()
    names = [m.name for m in members]
    assert names[0] == "."
    keys = [PurePosixPath(_dev(n)).parts for n in names]
    assert keys == sorted(keys)
    seen: set[str] = set()
    for m in members:
        path = _dev(m.name)
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", ""), path
        assert m.mtime == epoch, path
        if path != "/":
            assert str(PurePosixPath(path).parent) in seen, f"{path} before its directory"
        seen.add(path)
        if m.isdir():
            assert m.mode == 0o755, path
        else:
            assert m.isfile(), path  # no links, devices or fifos
            assert m.mode == (0o755 if path in EXECUTABLES else 0o644), path


def _shipped_sources() -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for pkg in B.PACKAGES
        for p in (REPO / pkg).rglob("*")
        if p.is_file() and p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    }


def test_every_needed_file_and_no_stray_file(data: tuple) -> None:
    files = {p for p, m in _paths(data[0]).items() if m.isfile()}
    prefix = str(B.PREFIX)
    vendor = str(B.VENDOR_DIR)
    expected = {B.LAUNCHER, B.INIT, B.UCI_CONFIG, B.HOTPLUG, B.KEEP}
    expected |= {f"{prefix}/{rel}" for rel in _shipped_sources()}
    assert expected <= files, sorted(expected - files)
    for must in ("cbor2/__init__.py", "cbor2/_decoder.py", "tenacity/__init__.py", "paho/mqtt/client.py"):
        assert f"{vendor}/{must}" in files
    licences = {f for f in files if "/licenses/" in f}
    for dist in ("cbor2", "tenacity", "paho_mqtt"):
        assert any(f.startswith(f"{vendor}/{dist}-") for f in licences), dist
    assert f"{prefix}/agent/uci.py" in files
    for path in files:
        p = PurePosixPath(path)
        assert not path.startswith((f"{prefix}/backend", f"{prefix}/tests", f"{prefix}/bench")), path
        assert p.suffix not in (".so", ".pyd", ".orig", ".rej", ".swp"), path
        if path.startswith(prefix):
            assert p.suffix in (".py", ".pyc", ".typed") or "dist-info" in path, path
        if p.suffix == ".pyc":
            assert p.parent.name == "__pycache__", path
            source = p.parent.parent / (p.name.split(".")[0] + ".py")
            assert str(source) in files, f"stray bytecode {path}"
            assert p.name.endswith(f".{B.PYC_TAG}.pyc"), path
        elif p.suffix == ".py":
            assert str(p.parent / "__pycache__" / f"{p.stem}.{B.PYC_TAG}.pyc") in files, f"no bytecode for {path}"
        else:
            assert "__pycache__" not in p.parts, path
    outside = {f for f in files if not f.startswith(prefix + "/")}
    assert outside == {B.LAUNCHER, B.INIT, B.UCI_CONFIG, B.HOTPLUG, B.KEEP, "/usr/libexec/glucoagent-update-watchdog"}


def test_bytecode_is_unchecked_hash_for_311_with_device_paths(data: tuple) -> None:
    blobs = data[1]
    pycs = [n for n in blobs if n.endswith(".pyc")]
    assert len(pycs) > 40
    for name in pycs:
        pyc = blobs[name]
        path = PurePosixPath("/" + name.removeprefix("./"))
        source_path = path.parent.parent / (path.name.split(".")[0] + ".py")
        source = blobs["." + str(source_path)]
        assert pyc[:4] == importlib.util.MAGIC_NUMBER, name
        assert int.from_bytes(pyc[4:8], "little") == 0b01, name  # hash-based, check_source off
        assert pyc[8:16] == importlib.util.source_hash(source), name
        code = marshal.loads(pyc[16:])
        assert code.co_filename == str(source_path), name


def _imports(tree: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_depends_cover_the_stdlib_modules_openwrt_splits_out(data: tuple) -> None:
    needed: dict[str, set[str]] = {}
    for name, blob in data[1].items():
        if name.endswith(".py"):
            for mod in _imports(ast.parse(blob)):
                if mod in B.STDLIB_SPLIT and mod in sys.stdlib_module_names | {"_ssl", "_hashlib", "_decimal"}:
                    needed.setdefault(B.STDLIB_SPLIT[mod], set()).add(name)
    deps = {d.split(" ")[0] for d in B.DEPENDS}
    missing = {pkg: sorted(files)[:3] for pkg, files in needed.items() if pkg not in deps}
    assert not missing, f"Depends lacks {missing}"
    assert "python3-sqlite3" in needed and "python3-openssl" in needed  # the scan sees the agent's imports


def test_default_config_is_valid_and_documents_every_option(data: tuple) -> None:
    text = data[1]["./etc/config/glucoagent"].decode()
    cfg = build_config(parse_uci(text, source=B.UCI_CONFIG), B.UCI_CONFIG)
    # the box's file keeps the code's defaults, except where the box differs on purpose
    overrides = {("agent", "run_dir"): "/var/run/glucoagent"}
    for section in ("agent", "mqtt", "buffer", "alerts"):
        got, default = getattr(cfg, section), type(getattr(cfg, section))()
        for f in dataclasses.fields(got):
            want = overrides.get((section, f.name), getattr(default, f.name))
            assert getattr(got, f.name) == want, f"{section}.{f.name}"
    assert (cfg.mqtt.keepalive, cfg.mqtt.protocol) == (30, "mqttv5")
    assert (cfg.alerts.hypo_mgdl, cfg.alerts.severe_hypo_mgdl, cfg.alerts.hyper_mgdl) == (70, 54, 250)
    assert [(p.port, p.protocol) for p in cfg.ports] == [("/dev/ttyUSB0", "auto")]
    for section, options in SCHEMA.items():
        assert re.search(rf"^config {section} '{section}'$", text, re.M), section
        for option in options:
            assert re.search(rf"^\s*#?option {option} ", text, re.M), f"{section}.{option} undocumented"
    for line in text.splitlines():
        assert not line.startswith(" "), "indent with tabs like uci export"


def test_init_script_is_procd_with_respawn_reload_and_term_timeout(data: tuple) -> None:
    init = data[1]["./etc/init.d/glucoagent"].decode()
    assert init.startswith("#!/bin/sh /etc/rc.common\n")
    assert re.search(r"^USE_PROCD=1$", init, re.M)
    assert re.search(r"^START=\d\d$", init, re.M) and re.search(r"^STOP=\d\d$", init, re.M)
    assert 'procd_set_param command "$PROG" run --config "$CONFIG"' in init
    assert re.search(r"^PROG=/usr/bin/glucoagent$", init, re.M)
    assert re.search(r"^CONFIG=/etc/config/glucoagent$", init, re.M)
    assert re.search(r"procd_set_param respawn \d+ \d+ \d+", init)
    timeout = re.search(r"procd_set_param term_timeout (\d+)", init)
    assert timeout and 5 < int(timeout[1]) <= 30
    assert 'procd_add_reload_trigger "glucoagent"' in init
    assert "procd_set_param stdout 1" in init and "procd_set_param stderr 1" in init
    assert 'procd_set_param file "$CONFIG"' in init


def test_keep_d_keeps_state_dir_and_config(data: tuple) -> None:
    keep = [
        line
        for line in data[1]["./lib/upgrade/keep.d/glucoagent"].decode().splitlines()
        if line and not line.startswith("#")
    ]
    assert f"{AgentSection().state_dir}/" in keep
    assert B.UCI_CONFIG in keep


def test_launcher_puts_the_package_and_vendor_first(data: tuple) -> None:
    launcher = data[1]["./usr/bin/glucoagent"].decode()
    assert launcher.startswith("#!/usr/bin/python3\n")
    assert 'sys.path[:0] = ["/usr/lib/glucoagent", "/usr/lib/glucoagent/vendor"]' in launcher
    assert "from agent.cli import main" in launcher


# The hotplug script itself is run for real in test_hotplug_script.py.


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    # a different output dir and a touched source (new mtime) must not matter
    first = B.build_ipk(tmp_path / "a")
    os.utime(REPO / "agent" / "uci.py")
    again = B.build_ipk(tmp_path / "b")
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(first.read_bytes()).hexdigest()


def test_source_date_epoch_sets_every_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    built = B.build_ipk(tmp_path)
    members, blobs = _tar(built.read_bytes())
    assert {m.mtime for m in members} == {1700000000}
    data_members, _ = _tar(blobs["./data.tar.gz"])
    assert {m.mtime for m in data_members} == {1700000000}
    assert b"SourceDateEpoch: 1700000000\n" in _tar(blobs["./control.tar.gz"])[1]["./control"]


def test_sdk_makefile_agrees_with_the_host_build(tmp_path: Path) -> None:
    mk = (REPO / "openwrt" / "Makefile").read_text()
    version, release = B.package_version().split("-")
    assert re.search(rf"^PKG_VERSION:={re.escape(version)}$", mk, re.M)
    assert re.search(rf"^PKG_RELEASE:={release}$", mk, re.M)
    depends_block = re.search(r"^\s*DEPENDS:=((?:.*\\\n)*.*)$", mk, re.M)  # with its continuation lines
    assert depends_block
    sdk = {d.lstrip("+") for d in depends_block[1].replace("\\", " ").split()}
    host = {d.split(" ")[0] for d in B.DEPENDS} - {"libc"}  # the SDK adds libc itself
    assert sdk == host
    extra = re.search(r"^\s*EXTRA_DEPENDS:=(\S+) \((\S+)\)$", mk, re.M)  # e.g. python3-light (>=3.11)
    constrained = {d.split(" ")[0]: d.split(" ", 1)[1].strip("()").replace(" ", "") for d in B.DEPENDS if "(" in d}
    assert extra and {extra[1]: extra[2]} == constrained
    conffiles = re.search(r"define Package/glucoagent/conffiles\n(.*?)endef", mk, re.S)
    assert conffiles and conffiles[1].split() == list(B.CONFFILES)
    postinst = (REPO / "openwrt" / "files" / "glucoagent.postinst-pkg").read_text()
    for line in postinst.splitlines():
        if line and not line.startswith("#"):
            assert line.replace("${", "$${") in mk
    # --stage (what the SDK installs) is the same tree as data.tar.gz
    staged = B.stage(tmp_path / "stage")
    files = {"/" + p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert files == {e.path for e in B.data_entries() if e.data is not None}
    assert (staged / "usr/bin/glucoagent").stat().st_mode & 0o777 == 0o755


def test_bytecode_does_not_depend_on_the_building_process() -> None:
    """A build inside this test process (hundreds of modules imported) equals one in a fresh interpreter.

    marshal's output depends on the compiling process's reference counts and hash seed; compiling in the
    build process once made the same source give different .pyc bytes after other imports.
    """
    here = {e.path: hashlib.sha256(e.data).hexdigest() for e in B.data_entries() if e.path.endswith(".pyc") and e.data}
    code = (
        "import hashlib, json; from openwrt.package import data_entries; "
        "print(json.dumps({e.path: hashlib.sha256(e.data).hexdigest() for e in data_entries() "
        "if e.path.endswith('.pyc') and e.data}))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(fresh.stdout) == here


def test_sdk_build_compile_recipe_runs_from_anywhere(tmp_path: Path) -> None:
    """The Build/Compile recipe of openwrt/Makefile, run as the SDK would (from its own directory)."""
    mk = (REPO / "openwrt" / "Makefile").read_text()
    block = re.search(r"define Build/Compile\n(.*?)\nendef", mk, re.S)
    assert block
    recipe = block[1].replace("\\\n", " ")
    values = {
        "PKG_BUILD_DIR": str(tmp_path / "build"),
        "GLUCOAGENT_SRC": str(REPO),
        "GLUCOAGENT_PYTHON": sys.executable,
        "SOURCE_DATE_EPOCH": "1700000000",
    }
    for line in recipe.splitlines():
        cmd = re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], line.strip())
        subprocess.run(["bash", "-ec", cmd], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    staged = tmp_path / "build" / "stage"
    files = {"/" + p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert files == {e.path for e in B.data_entries() if e.data is not None}
