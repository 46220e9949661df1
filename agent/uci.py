"""UCI configuration files (``/etc/config/<package>``): a pure parser, a writer and an in-place editor.

The parser reads a file exactly as OpenWrt's libuci does (``openwrt/uci`` ``file.c``:
``uci_parse_line``, ``parse_str``, ``next_arg``, strict mode as the ``uci`` command and the init
scripts use it), quirks included, so the agent never acts on a file the box's own tools read
differently or refuse. tests/openwrt/test_uci_conformance.py compares it with the real ``uci``.

* A line holds commands: ``package``/``p``, ``config``/``c``, ``option``/``o``, ``list``/``l`` and
  their arguments. An argument is made of adjacent pieces: unquoted (``\\x`` is ``x``, ``\\`` at the
  end of a line joins the next), ``'single'`` (no escapes) and ``"double"`` (``\\`` escapes); quotes
  may span lines. ``#`` starting or inside an unquoted piece comments out the rest of the line.
* ``;`` separates commands only where an argument would start (``option a 1 ; option b 2``) or
  right after a quoted piece (``option a '1';option b 2``). Stuck to an unquoted word it ends the
  whole line: ``config a x; option v 1`` is the section ``x`` without options (libuci writes the
  string end over that ``;``). Other quirks follow from the same code: a ``;`` followed by more words
  in the same command is "too many arguments"; a ``;`` at the very end of a line is an invalid command.
* ``config <type> [<name>]``: the type is printable ASCII 33..126, the name ``[A-Za-z0-9_]+``; no name
  (or an empty one) makes an anonymous section. A second ``config`` with the same name and type
  merges into the first section; with another type the file is refused.
* ``option <name> [<value>]``: the last one wins; an empty value changes nothing. ``list <name>
  [<value>]`` appends (an ``option`` of the same name becomes the list's first item); an ``option``
  after a ``list`` replaces the list.
* Whatever libuci refuses (too many arguments, a command outside a section, a bad name, an
  unterminated quote, an unknown command) refuses the whole file; the caller keeps its last good
  configuration. One deliberate difference: a NUL character is refused (libuci would cut the line there).

Every error is a :class:`agent.errors.ConfigError` whose message names the source and the line, e.g.
``/etc/config/glucoagent:12: too many arguments (uci refuses this file)``.

No I/O here: :func:`parse_uci` takes text, :func:`dump_uci` returns text, :func:`set_option` rewrites
text.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from agent.errors import ConfigError

__all__ = ["UciSection", "dump_uci", "parse_uci", "quote", "set_option"]

#: Option and section names (libuci ``uci_validate_name``).
NAME_RE = re.compile(r"[A-Za-z0-9_]+", re.ASCII)
#: Anonymous section reference as ``uci`` prints it: ``@meter[0]``, ``@meter[-1]``.
ANON_REF_RE = re.compile(r"@(?P<type>[!-~]+?)\[(?P<index>-?\d+)\]", re.ASCII)

_CMD_PACKAGE = ("package", "p")
_CMD_CONFIG = ("config", "c")
_CMD_OPTION = ("option", "o")
_CMD_LIST = ("list", "l")
_COMMANDS = (_CMD_PACKAGE, _CMD_CONFIG, _CMD_OPTION, _CMD_LIST)
_CSPACE = " \t\n\v\f\r"  # C isspace() in the C locale
_STRTOK_DELIMS = " \t"  # what uci_parse_line splits command words on (not newlines)
_COMMENT = "#"
_SQUOTE = "'"
_DQUOTE = '"'
_ESCAPE = "\\"
_NEEDS_QUOTE = frozenset("'\"\\#;")


def _valid_type(text: str) -> bool:
    return bool(text) and all(33 <= ord(c) <= 126 for c in text)


def _valid_name(text: str) -> bool:
    return NAME_RE.fullmatch(text) is not None


def _valid_package(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+", text, re.ASCII) is not None


@dataclasses.dataclass(frozen=True)
class UciSection:
    """One ``config`` section, with its options and lists (a name is never in both)."""

    type: str
    name: str | None  # None: anonymous
    options: Mapping[str, str]
    lists: Mapping[str, tuple[str, ...]]
    # Where things were, for error messages; not part of the value (equal sections may sit on other lines).
    line: int = dataclasses.field(default=0, compare=False)  # line of the (first) ``config``, 1-based
    option_lines: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False)  # last assignment

    def __post_init__(self) -> None:
        if not _valid_type(self.type):
            raise ValueError(f"invalid UCI section type {self.type!r}")
        if self.name is not None and not _valid_name(self.name):
            raise ValueError(f"invalid UCI section name {self.name!r}")
        for key in (*self.options, *self.lists):
            if not _valid_name(key):
                raise ValueError(f"invalid UCI option name {key!r}")
        both = set(self.options) & set(self.lists)
        if both:
            raise ValueError(f"UCI option(s) {sorted(both)} are both option and list")

    def get(self, option: str, default: str | None = None) -> str | None:
        return self.options.get(option, default)


# --- libuci's reader -------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Word:
    text: str
    start: int  # offset of the first character of the word in the source text
    end: int  # offset just past the word
    line: int


@dataclasses.dataclass(slots=True)
class _Command:
    words: list[_Word]
    line: int

    @property
    def start(self) -> int:
        return self.words[0].start

    @property
    def end(self) -> int:
        return self.words[-1].end


class _Reject(Exception):
    """libuci's ``uci_parse_error``: the whole file is refused."""


class _Reader:
    """libuci's parse context (``file.c``), step by step: a line buffer the parser rewrites in place.

    libuci reads one line (``fgets``), splits it with ``strtok`` and NUL-terminates each argument in
    the buffer itself, copying unquoted characters down over quotes and backslashes. Whether a ``;``
    ends a command or the whole line depends on that copying (``a;b`` loses ``;b``: the terminator
    lands on the ``;``; ``'a';b`` keeps it), so the buffer is modelled as it is, not as a grammar.
    ``NUL`` stands for a C string end; ``src`` maps each buffer cell back to its offset in the file.
    """

    NUL = "\0"

    def __init__(self, text: str) -> None:
        self.text = text
        self.next = 0  # offset of the first unread character of the file
        self.buf: list[str] = []
        self.src: list[int] = []
        self.filled = 0  # libuci's buf_filled: end of the data the last read put in the buffer
        self.pos = 0
        self.subject = ""  # the command being read, for error messages: "option 'port'"

    # -- C primitives
    def getln(self, offset: int) -> bool:
        """``uci_getln``: the next line (with its newline) read into the buffer at ``offset``."""
        del self.buf[offset:], self.src[offset:]
        if self.next >= len(self.text):
            return False
        end = self.text.find("\n", self.next)
        end = len(self.text) if end < 0 else end + 1
        self.buf.extend(self.text[self.next : end])
        self.src.extend(range(self.next, end))
        self.next = end
        self.filled = len(self.buf)
        return True

    def char(self, i: int) -> str:
        return self.buf[i] if i < len(self.buf) else self.NUL

    def cur(self) -> str:
        return self.char(self.pos)

    def put(self, i: int, c: str) -> None:
        if i < len(self.buf):
            self.buf[i] = c

    def string(self, i: int) -> str:
        """The C string at ``i``."""
        j = i
        while self.char(j) != self.NUL:
            j += 1
        return "".join(self.buf[i:j])

    def offset(self, i: int) -> int:
        """Offset in the file of buffer cell ``i`` (just past the data for the cell after it)."""
        if i < len(self.src):
            return self.src[i]
        return self.src[-1] + 1 if self.src else self.next

    def line(self) -> int:
        """1-based line of the reading position (libuci counts only finished lines: one less on a last
        line without a newline)."""
        return self.text.count("\n", 0, self.next) + (0 if self.text[: self.next].endswith("\n") else 1)

    def skip_whitespace(self) -> None:
        while self.cur() != self.NUL and self.cur() in _CSPACE:
            self.pos += 1

    def strtok(self) -> tuple[str, int] | None:
        """``strtok(cur_str, " \\t")``: the next word and its buffer index; NUL-terminates it in place."""
        i = self.pos
        while self.char(i) in _STRTOK_DELIMS and self.char(i) != self.NUL:
            i += 1
        if self.char(i) == self.NUL:
            return None
        j = i
        while self.char(j) != self.NUL and self.char(j) not in _STRTOK_DELIMS:
            j += 1
        word = "".join(self.buf[i:j])
        self.put(j, self.NUL)
        return word, i

    def skip_command_word(self, what: str) -> None:
        """``uci_increase_pos(strlen(cur_str) + 1)``: step past the command word strtok cut off."""
        add = len(self.string(self.pos)) + 1
        if self.pos + add > self.filled:
            raise _Reject(f"{what} without name")
        self.pos += add

    def addc(self, target: int) -> int:
        self.buf[target] = self.buf[self.pos]
        self.pos += 1
        return target + 1

    def backslash(self) -> bool:
        """``parse_backslash``: False for a line join (the next line is read over the newline)."""
        self.pos += 1
        c = self.cur()
        if c == self.NUL or c == "\n" or (c == "\r" and self.char(self.pos + 1) == "\n" and self.char(self.pos + 2) == self.NUL):
            self.getln(self.pos)
            return False
        return True

    def quoted(self, target: int, quote: str) -> int:
        """``parse_single_quote`` / ``parse_double_quote``: may read further lines."""
        self.pos += 1
        while True:
            c = self.cur()
            if c == quote:
                self.pos += 1
                return target
            if c == self.NUL:
                self.getln(self.pos)
                if self.cur() == self.NUL:
                    raise _Reject(f"EOF with unterminated {quote}")
                continue
            if c == _ESCAPE and quote == _DQUOTE and not self.backslash():
                continue
            target = self.addc(target)

    def parse_str(self, target: int) -> tuple[int, int]:
        """``parse_str``: (index of the terminating NUL, index where reading stopped)."""
        advance = True
        while True:
            c = self.cur()
            if c in (_SQUOTE, _DQUOTE):
                target = self.quoted(target, c)
            elif c == _COMMENT:
                self.put(self.pos, self.NUL)
                break
            elif c == self.NUL:
                break
            elif c == ";":
                advance = False
                break
            elif c != _ESCAPE or self.backslash():
                target = self.addc(target)
            if self.cur() == self.NUL or self.cur() in _CSPACE:
                break
        stop = self.pos
        if self.cur() != self.NUL and advance:
            self.pos += 1
        self.put(target, self.NUL)
        return target, stop

    def next_arg(self, required: bool, name: bool = False, package: bool = False) -> _Word:
        """``next_arg``: one argument (empty when absent); a ``;`` where it starts is an empty one."""
        self.skip_whitespace()
        val = self.pos
        if self.cur() == ";":
            self.put(self.pos, self.NUL)
            self.pos += 1
            stop = val
        else:
            _, stop = self.parse_str(val)
        text = self.string(val)
        if not text and required:
            raise _Reject("insufficient arguments")
        if text and name and not (_valid_package(text) if package else _valid_name(text)):
            raise _Reject("invalid character in name field")
        return _Word(text, self.offset(val), self.offset(stop), self.line())

    def assert_eol(self) -> None:
        self.skip_whitespace()
        if self.next_arg(False).text:
            raise _Reject("too many arguments")


# --- parser ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Builder:
    type: str
    name: str | None
    line: int
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    lists: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    option_lines: dict[str, int] = dataclasses.field(default_factory=dict)
    commands: list[_Command] = dataclasses.field(default_factory=list)  # config/option/list, in order

    def freeze(self) -> UciSection:
        return UciSection(
            type=self.type,
            name=self.name,
            options=MappingProxyType(dict(self.options)),
            lists=MappingProxyType({k: tuple(v) for k, v in self.lists.items()}),
            line=self.line,
            option_lines=MappingProxyType(dict(self.option_lines)),
        )


@dataclasses.dataclass(slots=True)
class _Package:
    sections: list[_Builder] = dataclasses.field(default_factory=list)
    by_name: dict[str, _Builder] = dataclasses.field(default_factory=dict)
    current: _Builder | None = None


def _parse_line(r: _Reader, pkg: _Package) -> None:
    """``uci_parse_line``: every command of one line (and the lines its quotes pulled in)."""
    r.skip_whitespace()
    while True:
        found = r.strtok()
        if found is None:
            return
        word, at = found
        verb = _Word(word, r.offset(at), r.offset(at + len(word)), r.line())
        long = next((c[0] for c in _COMMANDS if word in c), "")
        r.subject = long
        if word.startswith(_COMMENT):
            return
        if word in _CMD_PACKAGE:
            r.skip_command_word("package")
            r.next_arg(True, name=True, package=True)
            r.assert_eol()  # the package is named by the file; the line is only checked
        elif word in _CMD_CONFIG:
            r.skip_command_word("config")
            stype = r.next_arg(True)
            r.subject = f"config {stype.text!r}"
            if not _valid_type(stype.text):
                raise _Reject("invalid character in type field")
            name = r.next_arg(False, name=True)
            r.assert_eol()
            _config(pkg, _Command([verb, stype, name] if name.end > name.start else [verb, stype], verb.line))
        elif word in _CMD_OPTION or word in _CMD_LIST:
            if pkg.current is None:
                raise _Reject("option/list command found before the first section")
            r.skip_command_word("option")
            r.subject = long
            key = r.next_arg(True, name=True)
            r.subject = f"{long} {key.text!r}"
            value = r.next_arg(False)
            r.assert_eol()
            words = [verb, key, value] if value.end > value.start else [verb, key]  # '' is a word too
            _option(pkg.current, _Command(words, verb.line), word in _CMD_LIST)
        else:
            raise _Reject(f"invalid command {word!r}")


def _config(pkg: _Package, cmd: _Command) -> None:
    stype = cmd.words[1].text
    name = cmd.words[2].text if len(cmd.words) > 2 else ""
    if not name:
        cur = _Builder(stype, None, cmd.line)
        pkg.sections.append(cur)
    elif name in pkg.by_name:
        cur = pkg.by_name[name]
        if cur.type != stype:  # libuci in strict mode, as `uci` and the init scripts run it
            raise _Reject("section of different type overwrites prior section with same name")
    else:
        cur = pkg.by_name[name] = _Builder(stype, name, cmd.line)
        pkg.sections.append(cur)
    cur.commands.append(cmd)
    pkg.current = cur


def _option(cur: _Builder, cmd: _Command, is_list: bool) -> None:
    key = cmd.words[1].text
    value = cmd.words[2].text if len(cmd.words) > 2 else ""
    cur.commands.append(cmd)
    if is_list:
        items = cur.lists.setdefault(key, [])
        if key in cur.options:
            items.append(cur.options.pop(key))
        items.append(value)
        cur.option_lines[key] = cmd.line
    elif value:  # uci_set with an empty value on a parsed option changes nothing
        cur.lists.pop(key, None)
        cur.options[key] = value
        cur.option_lines[key] = cmd.line


def _parse(text: str, source: str) -> list[_Builder]:
    nul = text.find("\0")
    if nul >= 0:  # libuci's fgets/strlen would cut the line there; nothing we write has one
        raise ConfigError(f"{source}:{text.count(chr(10), 0, nul) + 1}: NUL character in file")
    r = _Reader(text)
    pkg = _Package()
    while True:
        r.pos = 0
        if not r.getln(0):
            return pkg.sections
        try:
            _parse_line(r, pkg)
        except _Reject as exc:
            subject = f"{r.subject}: " if r.subject else ""
            raise ConfigError(f"{source}:{r.line()}: {subject}{exc} (uci refuses this file)") from None


def parse_uci(text: str, *, source: str = "<string>") -> list[UciSection]:
    """Sections of a UCI file in file order (merged named sections appear once, where first seen)."""
    if not isinstance(text, str):
        raise TypeError(f"str expected, got {type(text).__name__}")
    return [b.freeze() for b in _parse(text, source)]


# --- writer ---------------------------------------------------------------------------------------


def quote(value: str) -> str:
    """``value`` as one UCI argument, single-quoted like ``uci export`` (``'`` becomes ``'\\''``)."""
    return "'" + value.replace("'", "'\\''") + "'"


def dump_uci(sections: Iterable[UciSection]) -> str:
    """Text that :func:`parse_uci` reads back into equal sections (for named sections, unique names).

    Raises ``ValueError`` for what UCI cannot express: an empty option value (UCI ignores it) or a
    name given to two sections (UCI merges them).
    """
    out: list[str] = []
    seen: set[str] = set()
    for sec in sections:
        if sec.name is not None:
            if sec.name in seen:
                raise ValueError(f"section name {sec.name!r} used twice")
            seen.add(sec.name)
        if out:
            out.append("")
        head = f"config {sec.type if not set(sec.type) & _NEEDS_QUOTE else quote(sec.type)}"
        out.append(f"{head} {quote(sec.name)}" if sec.name is not None else head)
        for key, value in sec.options.items():
            if not value:
                raise ValueError(f"option {key!r} of section {sec.name or sec.type!r} is empty")
            out.append(f"\toption {key} {quote(value)}")
        for key, items in sec.lists.items():
            out.extend(f"\tlist {key} {quote(item)}" for item in items)
    return "\n".join(out) + "\n" if out else ""


# --- in-place edit --------------------------------------------------------------------------------


def _find_section(builders: list[_Builder], section: str) -> _Builder | None:
    for b in builders:
        if b.name == section:
            return b
    m = ANON_REF_RE.fullmatch(section)
    if m:
        of_type = [b for b in builders if b.type == m["type"]]
        index = int(m["index"])
        try:
            return of_type[index]
        except IndexError:
            return None
    of_type = [b for b in builders if b.type == section]
    return of_type[0] if len(of_type) == 1 else None


def _line_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """Offsets of the start of the line holding ``start`` and just past the newline ending ``end``'s line."""
    lo = text.rfind("\n", 0, start) + 1
    hi = text.find("\n", end)
    return lo, (len(text) if hi < 0 else hi + 1)


def set_option(
    text: str,
    section: str,
    option: str,
    value: str,
    *,
    source: str = "<string>",
    create_type: str | None = None,
) -> str:
    """``text`` with ``option`` of ``section`` set to ``value``; every other byte is kept.

    ``section`` is a section name, an ``@type[index]`` reference, or the type of the only section of
    that type (``mqtt`` finds an anonymous ``config mqtt``). The last assignment of the option keeps
    its place, indentation and trailing comment; only its value changes. Earlier assignments and
    list items of the same name are removed. An empty ``value`` deletes the option, as ``uci set``
    does. A missing section is an error unless ``create_type`` is given: then ``config <create_type>
    '<section>'`` is appended with the option.
    """
    if not _valid_name(option):
        raise ConfigError(f"{source}: option {option!r}: invalid option name")
    builders = _parse(text, source)
    target = _find_section(builders, section)
    if target is None:
        if create_type is None or not _valid_name(section):
            raise ConfigError(f"{source}: no section {section!r}")
        if not value:
            return text
        sep = "" if not text or text.endswith("\n") else "\n"
        blank = "\n" if text.strip() else ""
        new = f"{sep}{blank}config {quote(create_type)} {quote(section)}\n\toption {option} {quote(value)}\n"
        result = text + new
    else:
        result = _rewrite(text, target, option, value)
    _check(text, result, source, section, option, value)
    return result


def _rewrite(text: str, target: _Builder, option: str, value: str) -> str:
    mine = [c for c in target.commands if len(c.words) > 1 and c.words[0].text not in _CMD_CONFIG]
    hits = [c for c in mine if c.words[1].text == option]
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), non-overlapping
    keep = None
    if value:
        keep = next((c for c in reversed(hits) if c.words[0].text in _CMD_OPTION), None)
        if keep is None and hits:
            keep = hits[-1]  # a list: turn its last item into the option
    for cmd in hits:
        if cmd is keep:
            verb = cmd.words[0]
            if verb.text not in _CMD_OPTION:
                edits.append((verb.start, verb.end, "option"))
            if len(cmd.words) > 2:
                edits.append((cmd.words[2].start, cmd.words[2].end, quote(value)))
            else:
                edits.append((cmd.words[1].end, cmd.words[1].end, " " + quote(value)))
        else:
            edits.append(_removal(text, cmd))
    if value and keep is None:
        anchor = target.commands[-1]
        indent = "\t"
        if mine:
            lo, _ = _line_bounds(text, mine[-1].start, mine[-1].end)
            lead = text[lo : mine[-1].start]
            indent = lead if lead.strip() == "" else "\t"
        edits.append((anchor.end, anchor.end, f"\n{indent}option {option} {quote(value)}"))
        tail = text[anchor.end : _line_bounds(text, anchor.end, anchor.end)[1]]
        stripped = tail.lstrip(" \t\r;")
        if stripped and not stripped.startswith(("\n", "#")):
            # another command follows on the same line: keep it on a line of its own after ours
            edits[-1] = (anchor.end, anchor.end, f"\n{indent}option {option} {quote(value)};")
        elif stripped.startswith("#"):
            # keep the anchor's trailing comment on the anchor's line
            _, hi = _line_bounds(text, anchor.end, anchor.end)
            nl = "" if text[:hi].endswith("\n") else "\n"
            edits[-1] = (hi, hi, f"{nl}{indent}option {option} {quote(value)}\n")
    out, limit = text, len(text)
    for start, end, repl in sorted(edits, key=lambda e: e[0], reverse=True):
        end = min(end, limit)  # two removals on one line may both claim the ';' between them
        out = out[:start] + repl + out[end:]
        limit = start
    return out


def _removal(text: str, cmd: _Command) -> tuple[int, int, str]:
    """Edit removing ``cmd``: its whole line(s) when nothing else is on them, else just the command."""
    lo, hi = _line_bounds(text, cmd.start, cmd.end)
    before, after = text[lo : cmd.start], text[cmd.end : hi]
    alone = after.strip() in ("", ";") or after.lstrip(" \t\r;").startswith("#")
    if before.strip() == "" and alone:  # the line holds only this command (and maybe its comment)
        return lo, hi, ""
    follow = re.match(r"[ \t]*;[ \t]*", after)
    if follow:  # "option a 1; option b 2" -> "option b 2"
        return cmd.start, cmd.end + follow.end(), ""
    lead = re.search(r"[ \t]*;[ \t]*$", before)
    if lead and after.strip() in ("", ";"):  # "option a 1; option b 2" -> "option a 1"
        return lo + lead.start(), cmd.end, ""
    return cmd.start, cmd.end, ""


def _check(before: str, result: str, source: str, section: str, option: str, value: str) -> None:
    """The edit must have done exactly what was asked and nothing else (guards the offset arithmetic
    above, and libuci's quirks: a requoted value must not revive a command a stuck ``;`` had hidden)."""
    old, new = _parse(before, source), _parse(result, source)
    target = _find_section(new, section)
    got = target.options.get(option, "") if target is not None else None
    if got != value or (target is not None and option in target.lists):
        raise ConfigError(f"{source}: could not set {section}.{option} in place")

    def without_target(builders: list[_Builder]) -> list[UciSection]:
        hit = _find_section(builders, section)
        out = []
        for b in builders:
            s = b.freeze()
            if b is hit:
                s = dataclasses.replace(
                    s,
                    options={k: v for k, v in s.options.items() if k != option},
                    lists={k: v for k, v in s.lists.items() if k != option},
                )
            out.append(s)
        return out

    if without_target(new)[: len(old)] != without_target(old) or len(new) > len(old) + 1:
        raise ConfigError(f"{source}: could not set {section}.{option} in place")
