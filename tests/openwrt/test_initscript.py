"""/etc/init.d/glucoagent run by busybox ash through OpenWrt's real rc.common, procd.sh and jshn.

procd itself cannot run here (it must be PID 1 with ubus), so ``ubus`` is a stub that records each call
and the JSON it is sent: that JSON is exactly what procd would receive. The instance is then checked
field by field against the init script's own ``procd_set_param`` lines and against procd's source
(``service/instance.c``: the attribute policy and the rlimit names), so a field procd would ignore or
misread fails here. The root holds the package's init script and config plus OpenWrt's shell library;
``IPKG_INSTROOT`` points rc.common and procd.sh at it. PATH: the ubus stub, then busybox's applets (as
on the box), then jshn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openwrt import hosttools
from openwrt.package import INIT, LAUNCHER, UCI_CONFIG, describe

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
UBUS_STUB = """#!/bin/sh
# ubus stand-in: one line per call, "<verb> <object> <method>" TAB "<json>"
printf '%s %s %s\\t%s\\n' "$1" "$2" "$3" "$4" >> "$UBUS_LOG"
"""


@dataclasses.dataclass(frozen=True)
class Box:
    root: Path
    env: dict[str, str]
    log: Path

    def rc(self, action: str) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, Any]]]:
        """``/etc/init.d/glucoagent <action>``: the result and the ubus calls it made."""
        before = self.log.read_text().splitlines() if self.log.exists() else []
        res = subprocess.run(
            [BUSYBOX, "ash", str(self.root / "etc/rc.common"), str(self.root / INIT.lstrip("/")), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        after = self.log.read_text().splitlines() if self.log.exists() else []
        calls = []
        for line in after[len(before) :]:
            verb, _, payload = line.partition("\t")
            calls.append((verb, json.loads(payload) if payload else None))
        return res, calls


@pytest.fixture
def box(openwrt_tools: hosttools.Tools, tmp_path: Path) -> Box:
    root = tmp_path / "root"
    shutil.copytree(openwrt_tools.openwrt_files.root, root, symlinks=True)
    pkg = describe()
    for path in (INIT, UCI_CONFIG):
        entry = pkg.file(path)
        assert entry.data is not None
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(entry.data)
        dest.chmod(entry.mode)
    for d in ("etc/rc.d", "var/lock"):
        (root / d).mkdir(parents=True)
    stub = tmp_path / "stub"
    applets = tmp_path / "busybox"
    stub.mkdir()
    applets.mkdir()
    (stub / "ubus").write_text(UBUS_STUB)
    (stub / "ubus").chmod(0o755)
    listed = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in listed:
        (applets / applet).symlink_to(BUSYBOX)
    log = tmp_path / "ubus.log"
    host_path = openwrt_tools.env["PATH"]
    env = {
        **openwrt_tools.env,
        "PATH": f"{stub}:{applets}:{host_path}",
        "IPKG_INSTROOT": str(root),
        "UBUS_LOG": str(log),
    }
    return Box(root, env, log)


def _start_service_params(script: str) -> dict[str, list[str]]:
    """``procd_set_param <name> <args…>`` lines of start_service, with the script's variables expanded."""
    variables = dict(re.findall(r"^([A-Z_]+)=(\S+)$", script, re.M))
    body = re.search(r"^start_service\(\) \{\n(.*?)^\}", script, re.M | re.S)
    assert body, "the init script defines start_service"
    params: dict[str, list[str]] = {}
    for line in body[1].splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["procd_set_param"]:
            # the script's top-level constants (PROG, CONFIG) are expanded; anything else stays "$x"
            expanded = [re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: variables.get(m[1], m[0]), w) for w in words[2:]]
            params[words[1]] = expanded
    return params


def _procd_policy(tools: hosttools.Tools) -> tuple[dict[str, str], set[str]]:
    """procd's instance attribute policy {name: BLOBMSG type} and its rlimit names, from instance.c."""
    src = (tools.procd_src / "service" / "instance.c").read_text()
    policy = dict(re.findall(r'\[INSTANCE_ATTR_\w+\] = \{ "(\w+)", BLOBMSG_TYPE_(\w+) \}', src))
    block = re.search(r"rlimit_names\[\] = \{(.*?)\};", src, re.S)
    assert policy and block
    return policy, set(re.findall(r'\{ "(\w+)", RLIMIT_', block[1]))


JSON_TYPE = {"ARRAY": list, "TABLE": dict, "INT32": int, "BOOL": bool, "STRING": str}


def test_start_sends_procd_the_instance_of_the_script(openwrt_tools: hosttools.Tools, box: Box) -> None:
    res, calls = box.rc("start")
    assert (res.returncode, res.stderr) == (0, "")
    assert [verb for verb, _ in calls] == ["call service set"]
    msg = calls[0][1]
    print("procd JSON of start:", json.dumps(msg, indent=1))  # shown with -s; quoted in docs/openwrt.md
    assert msg["name"] == "glucoagent"
    assert msg["script"] == str(box.root / INIT.lstrip("/"))
    (instance,) = msg["instances"].values()

    script = (box.root / INIT.lstrip("/")).read_text()
    params = _start_service_params(script)
    policy, rlimits = _procd_policy(openwrt_tools)
    # every field is one procd knows, with the type its policy wants (else procd drops it silently)
    for key, value in instance.items():
        assert key in policy, f"procd has no instance attribute {key!r}"
        assert isinstance(value, JSON_TYPE[policy[key]]), (key, value, policy[key])
    # and exactly what the script asked for (values computed at run time are compared where they are used)
    assert set(instance) == set(params)
    for key, words in params.items():
        if not any("$" in w for w in words) and isinstance(instance[key], list):
            assert instance[key] == words, key

    assert instance["command"] == [LAUNCHER, "run", "--config", UCI_CONFIG] == params["command"]
    assert instance["file"] == [UCI_CONFIG] == params["file"]  # procd md5s it: reload restarts only on change
    assert instance["stdout"] is True and instance["stderr"] is True
    assert instance["term_timeout"] == int(params["term_timeout"][0]) and instance["term_timeout"] >= 10
    limits = dict(kv.split("=", 1) for kv in params["limits"])
    assert instance["limits"] == limits == {"core": "0 0"}
    assert set(limits) <= rlimits
    env = dict(kv.split("=", 1) for kv in params["env"])
    assert instance["env"] == env
    assert env["PYTHONUNBUFFERED"] == "1"

    # respawn: procd atoi()s up to three strings, threshold, timeout, retry (instance.c; retry 0 = never
    # give up). The values are the init script's: whatever policy it sets is what procd gets.
    assert all(v.isdigit() for v in instance["respawn"]) and len(instance["respawn"]) == 3
    assert instance["respawn"] == params["respawn"]

    # the reload trigger: a config.change of package glucoagent runs "/etc/init.d/glucoagent reload"
    assert msg["triggers"] == [
        ["config.change", ["if", ["eq", "package", "glucoagent"], ["run_script", INIT, "reload"]], 1000]
    ]


def test_reload_stop_enable_disable(box: Box) -> None:
    _, first = box.rc("start")
    res, calls = box.rc("reload")  # no reload_service: rc.common sends the same service again
    assert (res.returncode, res.stderr) == (0, "")
    assert calls == first
    res, calls = box.rc("stop")
    assert (res.returncode, res.stderr) == (0, "")
    assert calls == [("call service delete", {"name": "glucoagent"})]

    rc_d = box.root / "etc" / "rc.d"
    res, calls = box.rc("enable")
    assert (res.returncode, res.stderr, calls) == (0, "", [])
    links = {p.name: os.readlink(p) for p in rc_d.iterdir()}
    start = re.search(r"^START=(\d+)$", (box.root / INIT.lstrip("/")).read_text(), re.M)
    stop = re.search(r"^STOP=(\d+)$", (box.root / INIT.lstrip("/")).read_text(), re.M)
    assert start and stop
    assert links == {f"S{start[1]}glucoagent": "../init.d/glucoagent", f"K{stop[1]}glucoagent": "../init.d/glucoagent"}
    res, _ = box.rc("enabled")
    assert res.returncode == 0
    res, calls = box.rc("disable")
    assert (res.returncode, res.stderr, calls) == (0, "", [])
    assert list(rc_d.iterdir()) == []
    res, _ = box.rc("enabled")
    assert res.returncode == 1
