"""UCI grammar: agent.uci against hand-written cases and generated files.

The generated files do not come from dump_uci alone: ``_encode`` writes each argument in a random
mix of quoting styles (unquoted with escapes, 'single', "double", concatenated pieces, line joins),
with short and long command verbs, ';' separators, comments, blank lines, option->list promotion,
overridden options and named sections split into two blocks, so the tokenizer is checked against
the grammar independently of the writer.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.uci_text import encode_word

from agent.errors import ConfigError
from agent.uci import UciSection, dump_uci, parse_uci, quote, set_option

SRC = "/etc/config/glucoagent"


def sec(type_: str, name: str | None = None, options: dict | None = None, lists: dict | None = None) -> UciSection:
    return UciSection(type=type_, name=name, options=options or {}, lists=lists or {})


# --- hand-written cases -----------------------------------------------------------------------------


def test_reference_example_file() -> None:
    text = """\
# committed config
package glucoagent

config agent 'main'                         # named section: glucoagent.main
\toption enabled '1'                      # bool
\toption device '/dev/ttyUSB0'
\tlist alg 'EdDSA'                        # list
\tlist alg 'ES256'

config meter                                # anonymous: glucoagent.@meter[0]
\toption vid '1a79'
\toption pid '6002'
"""
    got = parse_uci(text, source=SRC)
    assert got == [
        sec("agent", "main", {"enabled": "1", "device": "/dev/ttyUSB0"}, {"alg": ("EdDSA", "ES256")}),
        sec("meter", None, {"vid": "1a79", "pid": "6002"}),
    ]
    assert got[0].line == 4
    assert dict(got[0].option_lines) == {"enabled": 5, "device": 6, "alg": 8}
    assert got[1].line == 10
    assert got[1].option_lines["pid"] == 12


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("config t n\n option v 'ab'\"cd\"ef", "abcdef"),
        ("config t n\n option v a\\ b", "a b"),
        ('config t n\n option v "a\\"b\\\\c"', 'a"b\\c'),
        ("config t n\n option v 'a\\nb'", "a\\nb"),  # no escapes in single quotes
        ("config t n\n option v 'line1\nline2'", "line1\nline2"),
        ('config t n\n option v "x\\\ny"', "xy"),  # backslash-newline joins inside double quotes
        ("config t n\n option v ab\\\ncd", "abcd"),  # ... and unquoted
        ("config t n\n option v ab#cd", "ab"),  # comment inside an unquoted word
        ("config t n\n option v 'ab'#cd", "ab"),
        ("config t n\n option v '#x'", "#x"),
        ("config t n ; option v x ; option w y", "x"),
        ("config t n\n option v 'x';option v y", "y"),  # ';' right after a quote separates commands
        ("config t n\n option v x;option v y", "x"),  # stuck to a bare word it ends the line (libuci)
        ("c t n\n o v short", "short"),
        ("config t n\r\n\toption v crlf\r\n", "crlf"),
        ("config t n\n option v first\n option v second", "second"),
        ("config t n\n option v first\n option v ''", "first"),  # empty value is a no-op
        ("config t n\n option v first\n option v", "first"),
    ],
)
def test_values(text: str, expected: str) -> None:
    (s,) = parse_uci(text)
    assert s.options["v"] == expected


def test_lists_promotion_and_replacement() -> None:
    (s,) = parse_uci("config t n\n option a x\n list a y\n list b ''\n list c 1\n option c 2\n l d p\n l d q")
    assert dict(s.options) == {"c": "2"}
    assert dict(s.lists) == {"a": ("x", "y"), "b": ("",), "d": ("p", "q")}
    assert s.option_lines["a"] == 3
    assert s.option_lines["d"] == 8


def test_named_sections_merge_and_anonymous_do_not() -> None:
    text = "config a x\n option p 1\n option q 2\nconfig m\nconfig a x\n option q 3\nconfig m\nconfig t ''\n"
    got = parse_uci(text)
    assert got == [sec("a", "x", {"p": "1", "q": "3"}), sec("m"), sec("m"), sec("t")]
    assert got[0].line == 1
    assert got[0].option_lines["q"] == 6


def test_empty_and_comment_only_files() -> None:
    assert parse_uci("") == []
    assert parse_uci("# nothing\n\n   \n\t# x ;\npackage glucoagent\n") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config agent 'main'\n\toption port '/dev/ttyUSB0\n", f"{SRC}:2: option 'port': EOF with unterminated ' (uci refuses this file)"),
        ('config agent main\n\n\toption port "/dev\n', f"{SRC}:3: option 'port': EOF with unterminated \" (uci refuses this file)"),
        ("config agent 'ma", f"{SRC}:1: config 'agent': EOF with unterminated ' (uci refuses this file)"),
        ("\n'abc", f"{SRC}:2: invalid command \"'abc\" (uci refuses this file)"),
        ("option port x\n", f"{SRC}:1: option: option/list command found before the first section (uci refuses this file)"),
        ("list port x\n", f"{SRC}:1: list: option/list command found before the first section (uci refuses this file)"),
        ("config a 'b-c'\n", f"{SRC}:1: config 'a': invalid character in name field (uci refuses this file)"),
        ("config a b c\n", f"{SRC}:1: config 'a': too many arguments (uci refuses this file)"),
        ("config \n", f"{SRC}:1: config: insufficient arguments (uci refuses this file)"),
        ("config\n", f"{SRC}:1: invalid command 'config\\n' (uci refuses this file)"),  # strtok splits on blanks only
        ("config 'a b'\n", f"{SRC}:1: config 'a b': invalid character in type field (uci refuses this file)"),
        ("config a x\nconfig b x\n", f"{SRC}:2: config 'b': section of different type overwrites prior section with same name (uci refuses this file)"),
        ("config a\n\toption 'p-q' x\n", f"{SRC}:2: option: invalid character in name field (uci refuses this file)"),
        ("config a\n\toption port a b\n", f"{SRC}:2: option 'port': too many arguments (uci refuses this file)"),
        ("config a\n\toption \n", f"{SRC}:2: option: insufficient arguments (uci refuses this file)"),
        ("config a\n\tvalue x y\n", f"{SRC}:2: invalid command 'value' (uci refuses this file)"),
        ("package \n", f"{SRC}:1: package: insufficient arguments (uci refuses this file)"),
        ("package a b\n", f"{SRC}:1: package: too many arguments (uci refuses this file)"),
        ("config a\n\toption x a\0b\n", f"{SRC}:2: NUL character in file"),
    ],
)
def test_errors_name_line_and_option(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_uci(text, source=SRC)
    assert str(exc.value) == message


def test_section_validates_itself() -> None:
    with pytest.raises(ValueError, match="name"):
        sec("t", "a-b")
    with pytest.raises(ValueError, match="both option and list"):
        sec("t", None, {"x": "1"}, {"x": ("2",)})
    with pytest.raises(ValueError, match="type"):
        sec("a b")


def test_dump_refuses_what_uci_cannot_express() -> None:
    with pytest.raises(ValueError, match="empty"):
        dump_uci([sec("t", "n", {"x": ""})])
    with pytest.raises(ValueError, match="twice"):
        dump_uci([sec("t", "n"), sec("u", "n")])


def test_quote() -> None:
    assert quote("it's") == "'it'\\''s'"
    (s,) = parse_uci(f"config t\n option v {quote(chr(39) * 3)}")
    assert s.options["v"] == "'''"


# --- set_option ------------------------------------------------------------------------------------

CONFIG = """\
# glucoagent configuration
config agent 'agent'
\toption state_dir '/etc/glucoagent'   # keys and buffer
\toption log_level 'info'              # debug|info|warning|error

config mqtt 'mqtt'
\toption endpoint ''
\toption keepalive '30'   # seconds

config meter
\toption port '/dev/ttyUSB0'

config meter 'second'
\toption port '/dev/ttyACM0'; option protocol 'auto'
"""


def test_set_option_changes_only_the_value() -> None:
    out = set_option(CONFIG, "mqtt", "keepalive", "45")
    assert out == CONFIG.replace("keepalive '30'", "keepalive '45'")


def test_set_option_adds_a_missing_option_after_the_section() -> None:
    out = set_option(CONFIG, "mqtt", "protocol", "mqttv311")
    assert out == CONFIG.replace(
        "\toption keepalive '30'   # seconds\n", "\toption keepalive '30'   # seconds\n\toption protocol 'mqttv311'\n"
    )
    out = set_option(CONFIG, "@meter[0]", "protocol", "contour-astm")
    assert out == CONFIG.replace("'/dev/ttyUSB0'\n", "'/dev/ttyUSB0'\n\toption protocol 'contour-astm'\n")
    out = set_option(CONFIG, "second", "baud", "9600")
    assert parse_uci(out)[-1].options == {"port": "/dev/ttyACM0", "protocol": "auto", "baud": "9600"}
    assert out.startswith(CONFIG.rstrip("\n"))


def test_set_option_empty_value_deletes() -> None:
    out = set_option(CONFIG, "agent", "log_level", "")
    assert out == CONFIG.replace("\toption log_level 'info'              # debug|info|warning|error\n", "")
    out = set_option(CONFIG, "second", "protocol", "")
    assert "\toption port '/dev/ttyACM0'\n" in out


def test_set_option_replaces_list_and_duplicates() -> None:
    text = "config t 'n'\n\toption x 1\n\tlist x 2\n\tlist x 3 # about x\n\tlist y a\n"
    out = set_option(text, "n", "x", "9")
    assert out == "config t 'n'\n\toption x '9'\n\tlist y a\n"  # the option's line stays; list lines go


def test_set_option_missing_section() -> None:
    with pytest.raises(ConfigError, match="no section 'alerts'"):
        set_option(CONFIG, "alerts", "hypo_mgdl", "65", source=SRC)
    out = set_option(CONFIG, "alerts", "hypo_mgdl", "65", create_type="alerts")
    assert out.startswith(CONFIG)
    assert parse_uci(out)[-1] == sec("alerts", "alerts", {"hypo_mgdl": "65"})
    with pytest.raises(ConfigError, match="no section"):
        set_option(CONFIG, "meter", "port", "x")  # two meter sections: ambiguous


def test_set_option_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="invalid option name"):
        set_option(CONFIG, "mqtt", "keep-alive", "1")
    with pytest.raises(ConfigError, match=":1: option: option/list command found before the first section"):
        set_option("option x y\n", "mqtt", "keepalive", "1")


# --- generated files --------------------------------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True)
TYPES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)
VALUES = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12)
NONEMPTY = VALUES.filter(bool)


@st.composite
def sections(draw: st.DrawFn) -> list[UciSection]:
    out: list[UciSection] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.none() | NAMES.filter(lambda n: n not in used))
        if name is not None:
            used.add(name)
        keys = draw(st.lists(NAMES, unique=True, max_size=5))
        split = draw(st.integers(0, len(keys)))
        options = {k: draw(NONEMPTY) for k in keys[:split]}
        lists = {k: tuple(draw(st.lists(VALUES, min_size=1, max_size=3))) for k in keys[split:]}
        out.append(UciSection(draw(TYPES), name, options, lists))
    return out


@st.composite
def encoded(draw: st.DrawFn) -> tuple[list[UciSection], str, dict[tuple[int, str], int]]:
    """(sections, text, {(section index, option): line of its last assignment})."""
    secs = draw(sections())
    parts: list[str] = []
    lines: dict[tuple[int, str], int] = {}

    def line_now() -> int:
        return "".join(parts).count("\n") + 1

    def sep() -> str:
        # no ';': where it separates commands and where it ends the line is libuci's business,
        # compared with the real uci in test_uci_conformance.py
        return draw(st.sampled_from(["\n", "\n", "\n\n", "\t# a comment; 'x\n", "\n# c\n  \n"]))

    def cmd(verb_long: str, verb_short: str, *args: str) -> None:
        parts.append(draw(st.sampled_from(["", "\t", "  ", "\f"])))
        parts.append(draw(st.sampled_from([verb_long, verb_short])))
        for n, a in enumerate(args):
            # strtok cuts the command word at a space or tab only; the arguments may be apart by any blank
            blanks = [" ", "\t", "  ", " \r "] + (["\v", "\f"] if n else [])
            parts.append(draw(st.sampled_from(blanks)) + encode_word(draw, a))
        parts.append(sep())

    if draw(st.booleans()):
        parts.append("package glucoagent\n")
    for i, s in enumerate(secs):
        items = [("o", k, v) for k, v in s.options.items()] + [("l", k, v) for k, vs in s.lists.items() for v in vs]
        items = draw(st.permutations(items))
        # keep each list's items in their order: shuffle only which command comes when
        queues = {k: iter(vs) for k, vs in s.lists.items()}
        items = [(kind, key, next(queues[key]) if kind == "l" else value) for kind, key, value in items]
        seen_list: set[str] = set()
        # a named section may be written as two blocks that UCI merges
        split = draw(st.integers(0, len(items))) if s.name is not None else len(items)
        for block, chunk in enumerate((items[:split], items[split:])):
            if block == 1 and not chunk:
                break
            parts.append(draw(st.sampled_from(["", "\n", "# section\n"])))
            name_args = (s.name,) if s.name is not None else draw(st.sampled_from([(), ("",)]))
            cmd("config", "c", s.type, *name_args)
            for kind, key, value in chunk:
                if kind == "o":
                    if draw(st.booleans()):
                        cmd("option", "o", key, "overridden")  # last one wins
                    if draw(st.booleans()):
                        cmd("option", "o", key, "")  # no-op
                    lines[(i, key)] = line_now()
                    cmd("option", "o", key, value)
                else:
                    first = key not in seen_list
                    seen_list.add(key)
                    lines[(i, key)] = line_now()
                    if first and value and len(s.lists[key]) > 1 and draw(st.booleans()):
                        cmd("option", "o", key, value)  # promoted to the list's first item
                    else:
                        cmd("list", "l", key, value)
    return secs, "".join(parts), lines


@settings(max_examples=300, deadline=None)
@given(sections())
def test_dump_parse_round_trip(secs: list[UciSection]) -> None:
    assert parse_uci(dump_uci(secs)) == secs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded())
def test_generated_files_parse_to_what_was_generated(case: tuple[list[UciSection], str, dict]) -> None:
    secs, text, lines = case
    got = parse_uci(text, source=SRC)
    assert got == secs
    for (i, key), line in lines.items():
        assert got[i].option_lines[key] == line, (key, text)
    # and the writer agrees with the reader on what was read
    assert parse_uci(dump_uci(got)) == got


def _junk_alphabet() -> st.SearchStrategy[str]:
    tokens = ["config", "c", "option", "o", "list", "l", "package", "p", " ", "\t", "\n", "\r", ";", "#"]
    tokens += ["'", '"', "\\", "\\\n", "a", "b_1", "x-y", "@m[0]", "\0", "é", "''", '""']
    return st.lists(st.sampled_from(tokens), max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(max_size=60), _junk_alphabet()))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        got = parse_uci(text, source=SRC)
    except ConfigError as exc:
        assert re.match(rf"{re.escape(SRC)}:\d+: ", str(exc)), str(exc)
        line = int(str(exc)[len(SRC) + 1 :].split(":", 1)[0])
        assert 1 <= line <= text.count("\n") + 1
    else:
        assert parse_uci(dump_uci(got)) == got


BREAKERS = [
    ("\toption port '/dev/tty", "option 'port': EOF with unterminated ' (uci refuses this file)"),
    ('\tlist alg "EdDSA', "list 'alg': EOF with unterminated \" (uci refuses this file)"),
    ("\toption a b c", "option 'a': too many arguments (uci refuses this file)"),
    ("config t 'bad name'", "config 't': invalid character in name field (uci refuses this file)"),
    ("\toption bad-name x", "option: invalid character in name field (uci refuses this file)"),
    ("value x y", "invalid command 'value' (uci refuses this file)"),
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded(), st.sampled_from(BREAKERS))
def test_a_bad_line_anywhere_rejects_the_file_and_names_it(case: tuple, breaker: tuple[str, str]) -> None:
    secs, text, _ = case
    assume(secs)  # an option needs a section before it
    bad, message = breaker
    if not text.endswith("\n"):
        text += "\n"
    line = text.count("\n") + 1
    with pytest.raises(ConfigError) as exc:
        parse_uci(text + bad + "\n", source=SRC)
    assert str(exc.value) == f"{SRC}:{line}: {message}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded(), st.data())
def test_set_option_changes_exactly_one_option(case: tuple, data: st.DataObject) -> None:
    secs, text, _ = case
    assume(secs)
    i = data.draw(st.integers(0, len(secs) - 1))
    target = secs[i]
    if target.name is not None:
        ref = target.name
    else:
        ref = f"@{target.type}[{[s.type for s in secs[:i]].count(target.type)}]"
        assume(not any(s.name == ref for s in secs))
    existing = [*target.options, *target.lists]
    key = data.draw(st.sampled_from(existing) | NAMES if existing else NAMES)
    value = data.draw(VALUES)
    out = set_option(text, ref, key, value)
    got = parse_uci(out)
    options = {k: v for k, v in target.options.items() if k != key}
    if value:
        options[key] = value
    lists = {k: v for k, v in target.lists.items() if k != key}
    want = [*secs[:i], dataclasses.replace(target, options=options, lists=lists), *secs[i + 1 :]]
    assert got == want
