"""agent/uci.py against OpenWrt's own ``uci`` (built from ../shared/openwrt-tools): same file, same result.

Each case writes a file into a private config directory and reads it twice: with the real ``uci -c DIR
export`` (strict, as on the box) and with ``agent.uci.parse_uci``. Either both refuse it (the agent's
message names the file and the line uci names), or both read the same sections: type, name (or
anonymous), options and lists, in the same order. The corpora:

* every UCI file the project ships or writes: the shipped /etc/config/glucoagent, the harness's
  device configs, ``set_option`` edits (the cloud's set_config) and ``dump_uci`` output;
* files written by the real ``uci`` itself (``uci batch``: set, add, add_list, delete of options and
  sections) from hypothesis-generated values with quotes, spaces, ``#``, ``;``, backslashes,
  newlines and UTF-8;
* hypothesis-generated hand-written text: every quoting style, ``;`` and ``#`` in every position,
  line joins, short verbs, merged sections, and raw junk; plus hand-written edge cases.

A module-wide tally is printed at the end: files compared, refused by both, disagreements (0, or a
test failed).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.uci_text import encode_word

from agent.errors import ConfigError
from agent.uci import UciSection, dump_uci, parse_uci, quote, set_option
from openwrt import hosttools
from testbed.harness import device_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "openwrt" / "files" / "glucoagent.config"
PKG = "glucoagent"

Normal = list[tuple[str, str | None, dict[str, str], dict[str, tuple[str, ...]]]]


@dataclasses.dataclass
class Tally:
    compared: int = 0
    refused: int = 0
    disagreements: int = 0


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = (
        f"UCI conformance with the real uci: {TALLY.compared} files compared "
        f"({TALLY.refused} refused by both), {TALLY.disagreements} disagreements"
    )
    if reporter is not None:
        reporter.write_line(line)


# --- the real uci ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Refused:
    line: int
    reason: str


def read_export(out: str) -> Normal:
    """Sections from ``uci export`` output (uci_export_package's format, read without agent.uci)."""
    assert out.startswith(f"package {PKG}\n"), out
    i = len(f"package {PKG}\n")
    secs: Normal = []
    while i < len(out):
        if out[i] == "\n":
            i += 1
        elif out.startswith("config ", i):
            end = out.index("\n", i)
            head = out[i + len("config ") : end]
            stype, _, name = head.partition(" ")  # a type has no blanks; the name is 'quoted'
            secs.append((stype.replace("'\\''", "'"), name[1:-1] if name else None, {}, {}))
            i = end + 1
        else:
            m = re.compile(r"\t(option|list) ([A-Za-z0-9_]+) '").match(out, i)
            assert m, out[i:]
            i = m.end()
            value: list[str] = []
            while True:  # uci_escape: ' is written '\'' and the closing quote is followed by a newline
                j = out.index("'", i)
                value.append(out[i:j])
                if out.startswith("'\\''", j):
                    value.append("'")
                    i = j + 4
                else:
                    assert out[j + 1] == "\n", out[j:]
                    i = j + 2
                    break
            _, _, options, lists = secs[-1]
            if m[1] == "option":
                options[m[2]] = "".join(value)
            else:
                lists[m[2]] = (*lists.get(m[2], ()), "".join(value))
    return secs


def uci(tools: hosttools.Tools, work: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    conf, save = work / "config", work / "save"
    conf.mkdir(exist_ok=True)
    save.mkdir(exist_ok=True)
    return subprocess.run(
        [str(tools.uci), "-c", str(conf), "-t", str(save), *args],
        input=stdin,
        capture_output=True,
        env=tools.env,
        timeout=30,
        check=False,
    )


def real_read(tools: hosttools.Tools, work: Path, data: bytes) -> Normal | Refused:
    (work / "config").mkdir(exist_ok=True)
    (work / "config" / PKG).write_bytes(data)
    proc = uci(tools, work, "export", PKG)
    if proc.returncode == 0:
        return read_export(proc.stdout.decode())
    m = re.search(rb"Parse error \((.*)\) at line (\d+), byte \d+", proc.stderr)
    assert m, proc.stderr
    return Refused(int(m[2]), m[1].decode())


def normal(secs: list[UciSection]) -> Normal:
    return [(s.type, s.name, dict(s.options), dict(s.lists)) for s in secs]


def compare(tools: hosttools.Tools, work: Path, text: str) -> Normal | Refused:
    """Both readers on ``text``; fails on any disagreement. Returns what they agreed on."""
    TALLY.compared += 1
    want = real_read(tools, work, text.encode())
    src = str(work / "config" / PKG)
    try:
        got: Normal | ConfigError = normal(parse_uci(text, source=src))
    except ConfigError as exc:
        got = exc
    if isinstance(want, Refused):
        ok = isinstance(got, ConfigError)
        if ok:
            message = str(got)
            m = re.match(rf"{re.escape(src)}:(\d+): ", message)
            # libuci counts finished lines only: on a last line without a newline it says one less
            ok = m is not None and int(m[1]) in (want.line, want.line + (not text.endswith("\n")))
            ok = ok and want.reason in message
        if not ok:
            TALLY.disagreements += 1
            pytest.fail(f"uci refuses {text!r} at line {want.line} ({want.reason}); the agent: {got}")
        TALLY.refused += 1
    elif got != want:
        TALLY.disagreements += 1
        pytest.fail(f"{text!r}: uci reads {want}, the agent {got}")
    return want


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


# --- what the project ships and writes ---------------------------------------------------------------


def test_shipped_config(openwrt_tools: hosttools.Tools, work: Path) -> None:
    got = compare(openwrt_tools, work, SHIPPED.read_text())
    assert isinstance(got, list) and [s[0] for s in got] == ["agent", "mqtt", "buffer", "update", "alerts", "meter"]


@pytest.mark.parametrize(
    "ports", [[], [("/dev/ttyUSB0", "auto")], [("/dev/ttyACM0", "contour-astm"), ("/dev/ttyACM1", "novopen")]]
)
def test_harness_device_configs(openwrt_tools: hosttools.Tools, work: Path, ports: list[tuple[str, str]]) -> None:
    path = device_config(work / "device.uci", ports, mqtt={"keepalive": "20"}, buffer={"max_records": "500"})
    assert isinstance(compare(openwrt_tools, work, path.read_text()), list)


# Values the cloud may set (set_config): anything printable, including the characters UCI quotes.
VALUES = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("'\"\\#; \t\n"), max_size=16)
KEYS = st.sampled_from(["keepalive", "log_level", "endpoint", "hypo_mgdl", "port", "protocol", "x_new"])
SECTIONS = st.sampled_from(["agent", "mqtt", "buffer", "alerts", "meter1", "@meter[0]", "newsec"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(SECTIONS, KEYS, VALUES), min_size=1, max_size=4))
def test_set_option_edits(openwrt_tools: hosttools.Tools, work: Path, edits: list[tuple[str, str, str]]) -> None:
    text = SHIPPED.read_text()
    for section, key, value in edits:
        text = set_option(text, section, key, value, create_type=section if section == "newsec" else None)
    got = compare(openwrt_tools, work, text)
    assert isinstance(got, list)


TYPES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)
NAMES = st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True)
ANY_VALUES = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def sections(draw: st.DrawFn, types: st.SearchStrategy[str] = TYPES) -> list[UciSection]:
    out: list[UciSection] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.none() | NAMES.filter(lambda n: n not in used))
        if name is not None:
            used.add(name)
        keys = draw(st.lists(NAMES, unique=True, max_size=4))
        split = draw(st.integers(0, len(keys)))
        options = {k: draw(ANY_VALUES.filter(bool)) for k in keys[:split]}
        lists = {k: tuple(draw(st.lists(ANY_VALUES, min_size=1, max_size=3))) for k in keys[split:]}
        out.append(UciSection(draw(types), name, options, lists))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secs=sections())
def test_dump_uci_output(openwrt_tools: hosttools.Tools, work: Path, secs: list[UciSection]) -> None:
    got = compare(openwrt_tools, work, dump_uci(secs))
    if all(not set(s.type) & set("#;'\"\\") for s in secs):  # such types are written quoted: uci reads them back
        assert got == normal(secs)


# --- files written by the real uci ----------------------------------------------------------------------

UCI_VALUES = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("'\"\\#; \t\n") | st.sampled_from("é血糖😀"),
    max_size=14,
)
UCI_TYPES = st.text(st.sampled_from("abcXYZ019_-#;'\"\\!%"), min_size=1, max_size=6)


@st.composite
def uci_batch(draw: st.DrawFn) -> str:
    """A ``uci batch`` script: named and anonymous sections, set, add_list and delete, then commit."""
    lines: list[str] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(0, 5))):
        stype = draw(UCI_TYPES)
        name = draw(st.none() | NAMES.filter(lambda n: n not in used and not n.startswith("cfg")))
        if name is not None:
            used.add(name)
            lines.append(f"set {quote(f'{PKG}.{name}={stype}')}")
            ref = f"{PKG}.{name}"
        else:
            lines.append(f"add {PKG} {quote(stype)}")
            ref = f"{PKG}.@{stype}[-1]"
        keys = draw(st.lists(NAMES, min_size=0, max_size=4, unique=True))
        for _ in range(draw(st.integers(0, 8))):
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            op = draw(st.sampled_from(["set", "set", "add_list", "add_list", "delete"]))
            if op == "delete":
                lines.append(f"delete {quote(f'{ref}.{key}')}")
            else:
                lines.append(f"{op} {quote(f'{ref}.{key}={draw(UCI_VALUES)}')}")
        if draw(st.integers(0, 5)) == 0:
            lines.append(f"delete {quote(ref)}")
    lines.append(f"commit {PKG}")
    return "\n".join(lines) + "\n"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=uci_batch())
def test_files_written_by_uci(openwrt_tools: hosttools.Tools, work: Path, script: str) -> None:
    conf = work / "config"
    conf.mkdir(exist_ok=True)
    (conf / PKG).write_bytes(b"")
    for stale in (work / "save").glob("*"):
        stale.unlink()
    proc = uci(openwrt_tools, work, "batch", stdin=script.encode())
    assert proc.returncode == 0, (script, proc.stderr)
    written = (conf / PKG).read_bytes().decode()
    compare(openwrt_tools, work, written)


# --- hand-written text ----------------------------------------------------------------------------------


@st.composite
def hand_written(draw: st.DrawFn) -> str:
    """UCI text as a person might write it: every quoting style and separator, in every place."""
    secs = draw(sections())
    parts: list[str] = []

    def sep() -> str:
        return draw(st.sampled_from(["\n", "\n", ";", "; ", " ; ", " ;", "\n\n", "\t# a comment; 'x\n", "\n# c\n  \n", "\r\n"]))

    def cmd(verb_long: str, verb_short: str, *args: str) -> None:
        parts.append(draw(st.sampled_from(["", "\t", "  ", "\f"])))
        parts.append(draw(st.sampled_from([verb_long, verb_short])))
        for n, a in enumerate(args):
            # strtok cuts the command word at a space or tab only; the arguments may be apart by any blank
            blanks = [" ", "\t", "  ", " \r "] + (["\v", "\f"] if n else [])
            parts.append(draw(st.sampled_from(blanks)) + encode_word(draw, a))
        parts.append(sep())

    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(["package glucoagent\n", "package glucoagent;", "p x-y\n"])))
    for s in secs:
        items = [("o", k, v) for k, v in s.options.items()] + [("l", k, v) for k, vs in s.lists.items() for v in vs]
        items = draw(st.permutations(items))
        split = draw(st.integers(0, len(items))) if s.name is not None else len(items)
        for block, chunk in enumerate((items[:split], items[split:])):
            if block == 1 and not chunk:
                break
            name_args = (s.name,) if s.name is not None else draw(st.sampled_from([(), ("",)]))
            stype = s.type if block == 0 or draw(st.integers(0, 4)) else s.type + "x"  # sometimes: another type
            cmd("config", "c", stype, *name_args)
            for kind, key, value in chunk:
                if draw(st.integers(0, 6)) == 0:
                    cmd("option", "o", key, "")  # an empty value changes nothing
                cmd(*(("option", "o") if kind == "o" else ("list", "l")), key, value)
    return "".join(parts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hand_written())
def test_hand_written_files(openwrt_tools: hosttools.Tools, work: Path, text: str) -> None:
    compare(openwrt_tools, work, text)


def _junk() -> st.SearchStrategy[str]:
    tokens = ["config", "c", "option", "o", "list", "l", "package", "p", " ", "\t", "\n", "\r", ";", "#", "\v"]
    tokens += ["'", '"', "\\", "\\\n", "a", "b_1", "x-y", "@m[0]", "é", "''", '""', "\\\r\n", "x;", "'y';"]
    return st.lists(st.sampled_from(tokens), max_size=40).map("".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_junk(), st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=50)))
def test_junk(openwrt_tools: hosttools.Tools, work: Path, text: str) -> None:
    compare(openwrt_tools, work, text)


EDGE_CASES = [
    # the two defects of issue 14
    "config a x\nconfig b x\n",  # uci: section of different type overwrites prior section with same name
    "config a x; option v 1; option w 2\n",  # uci: the ';' stuck to x ends the line: no options
    "config a x\nconfig a x\n\toption v 1\n",  # same type: merged
    "config a x ; option v 1 ; option w 2\n",
    "config a x\n\toption v 'a';option w 2\n",
    "config a x\n\toption v a;b\n",
    "config a x\n\toption v a\\;b\n",
    "config a x\n\toption v 'a;b' ; option w 2\n",
    "config a ; option v 1\n",
    "config a x\n\toption v ;x\n",
    "config a x ;\n",
    "config a x ;",
    "config a x\n\toption v #c\n",
    "config a x\n\toption v 1 # c ; option w 2\n",
    "config a x\n\toption v ab#cd\n",
    "config a x\n\toption v 'ab'#cd\n",
    'config a x\n\toption v "a" b\n',
    "config\n",
    "config",
    "config a x\n\toption\n",
    "config a x\n\toption v 'unterminated\n",
    'config a x\n\toption v "unterminated\n',
    "config a x\n\toption v 'two\nlines'\n",
    'config a x\n\toption v "join\\\nme"\n',
    "config a x\n\toption v join\\\nme\n",
    "config a x\n\toption v \\\n",
    "config a x\n\toption v end\\",
    "config a x\r\n\toption v crlf\r\n",
    "config a x\n\toption v 1\n\toption v ''\n",
    "config a x\n\toption v 1\n\tlist v 2\n\toption w 3\n\tlist w ''\n",
    "config a x\n\tlist v 1\n\toption v 2\n",
    "option v 1\n",
    "config 'a b' x\n",
    "config a 'b-c'\n",
    "config a x y\n",
    "config a x\n\toption 'p-q' 1\n",
    "package glucoagent\nconfig a x\n",
    "package\n",
    "package a b\n",
    "package x-y\nconfig a x\n",
    "\x01config a x\n",
    "config é x\n",
    "config a x\n\toption v 'é血糖'\n",
    "c a x\n\to v 1\n\tl w 2\n",
    "config a\nconfig a\n\toption v 1\n",
    "config a ''\n\toption v 1\n",
    "  \t\n#only a comment\n\n",
    "",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases(openwrt_tools: hosttools.Tools, work: Path, text: str) -> None:
    compare(openwrt_tools, work, text)


def test_the_two_defects(openwrt_tools: hosttools.Tools, work: Path) -> None:
    """Issue 14: uci refuses a name reused with another type; a ';' stuck to a word ends the line."""
    refused = compare(openwrt_tools, work, "config a x\noption v 1\nconfig b x\n")
    assert isinstance(refused, Refused) and refused.line == 3
    with pytest.raises(ConfigError, match=r"glucoagent:3: config 'b': section of different type overwrites prior section"):
        parse_uci("config a x\noption v 1\nconfig b x\n", source="/etc/config/glucoagent")
    assert compare(openwrt_tools, work, "config a x; option v 1; option w 2\n") == [("a", "x", {}, {})]
