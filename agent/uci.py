"""UCI configuration files (``/etc/config/<package>``): a pure parser, a writer and an in-place editor.

The grammar is libuci's (``openwrt/uci`` ``file.c``: ``uci_parse_line``, ``parse_str``, ``next_arg``):

* A command is ``package``/``p``, ``config``/``c``, ``option``/``o`` or ``list``/``l`` followed by
  its arguments. A newline or ``;`` (outside quotes) ends a command.
* ``#`` at the start of a word, or anywhere inside an unquoted word, comments to the end of the line.
* An argument is made of adjacent pieces that concatenate: unquoted (``\\x`` escapes any character,
  ``\\`` at the end of a line joins the next one), ``'single'`` (no escapes, may span lines) and
  ``"double"`` (``\\`` escapes, may span lines). ``'ab'"cd"ef`` is ``abcdef``.
* ``config <type> [<name>]``: the type is printable ASCII 33..126, the name ``[A-Za-z0-9_]+``; no name
  (or an empty one) makes an anonymous section. A second ``config`` with the same name merges into
  the first section (its type replaces the old one; later options override).
* ``option <name> [<value>]``: the last one wins; an empty value is a no-op. ``list <name> [<value>]``
  appends (an ``option`` of the same name becomes the list's first item); an ``option`` after a
  ``list`` replaces the list.
* More than two arguments, a command outside a section, a bad name or an unterminated quote reject
  the whole file, as ``uci`` does; the caller keeps its last good configuration.

Every error is a :class:`agent.errors.ConfigError` whose message names the source, the line and the
option, e.g. ``/etc/config/glucoagent:12: option 'port': unterminated quote``.

No I/O here: :func:`parse_uci` takes text, :func:`dump_uci` returns text, :func:`set_option` rewrites
text.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
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
_SEPARATORS = "\n;"
_BLANKS = " \t\r\f\v"
_COMMENT = "#"
_SQUOTE = "'"
_DQUOTE = '"'
_ESCAPE = "\\"
_NEEDS_QUOTE = frozenset("'\"\\#;")


def _valid_type(text: str) -> bool:
    return bool(text) and all(33 <= ord(c) <= 126 for c in text)


def _valid_name(text: str) -> bool:
    return NAME_RE.fullmatch(text) is not None


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


# --- tokenizer ------------------------------------------------------------------------------------


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


def _subject(words: list[_Word]) -> str:
    """How an error names the command it is in: ``option 'port'``, ``config``, ..."""
    if not words:
        return ""
    cmd = words[0].text
    kind = {**dict.fromkeys(_CMD_OPTION, "option"), **dict.fromkeys(_CMD_LIST, "list")}.get(cmd)
    if kind is None:
        kind = "config" if cmd in _CMD_CONFIG else "package" if cmd in _CMD_PACKAGE else repr(cmd)
        if cmd in _CMD_CONFIG and len(words) > 1:
            return f"config {words[1].text!r}"
        return kind
    if len(words) > 1:
        return f"{kind} {words[1].text!r}"
    return kind


class _Lexer:
    """Splits text into commands of words, keeping offsets and line numbers."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.i = 0
        self.line = 1

    def fail(self, line: int, words: list[_Word], message: str) -> ConfigError:
        subject = _subject(words)
        where = f"{self.source}:{line}: "
        return ConfigError(f"{where}{subject}: {message}" if subject else f"{where}{message}")

    def _line_join(self) -> bool:
        """At a backslash: if it ends the line, skip it and the newline (True)."""
        text, i = self.text, self.i
        for ending in ("\\\n", "\\\r\n"):
            if text.startswith(ending, i):
                self.i += len(ending)
                self.line += 1
                return True
        return False

    def commands(self) -> Iterator[_Command]:
        text, n = self.text, len(self.text)
        words: list[_Word] = []
        cur: list[str] = []
        have = False
        start = start_line = 0

        def flush() -> None:
            nonlocal cur, have
            if have:
                words.append(_Word("".join(cur), start, self.i, start_line))
            cur, have = [], False

        def begin() -> None:
            nonlocal have, start, start_line
            if not have:
                have, start, start_line = True, self.i, self.line

        while self.i < n:
            c = text[self.i]
            if c == "\0":
                raise self.fail(self.line, words, "NUL character in file")
            if c in _SEPARATORS:
                flush()
                if words:
                    yield _Command(words, words[0].line)
                words = []
                if c == "\n":
                    self.line += 1
                self.i += 1
            elif c in _BLANKS:
                flush()
                self.i += 1
            elif c == _COMMENT:
                flush()
                j = text.find("\n", self.i)
                self.i = n if j < 0 else j
            elif c == _SQUOTE:
                begin()
                quote_line = self.line
                j = text.find(_SQUOTE, self.i + 1)
                if j < 0:
                    raise self.fail(words[0].line if words else quote_line, words, "unterminated quote")
                piece = text[self.i + 1 : j]
                if "\0" in piece:
                    raise self.fail(quote_line, words, "NUL character in file")
                cur.append(piece)
                self.line += piece.count("\n")
                self.i = j + 1
            elif c == _DQUOTE:
                begin()
                quote_line = self.line
                self.i += 1
                while True:
                    if self.i >= n:
                        raise self.fail(words[0].line if words else quote_line, words, "unterminated quote")
                    c = text[self.i]
                    if c == _DQUOTE:
                        self.i += 1
                        break
                    if c == "\0":
                        raise self.fail(self.line, words, "NUL character in file")
                    if c == _ESCAPE:
                        if self._line_join():
                            continue
                        if self.i + 1 < n:
                            c = text[self.i + 1]
                            if c == "\0":
                                raise self.fail(self.line, words, "NUL character in file")
                            self.line += c == "\n"
                            cur.append(c)
                            self.i += 2
                            continue
                    self.line += c == "\n"
                    cur.append(c)
                    self.i += 1
            elif c == _ESCAPE:
                if self._line_join():
                    continue
                if self.i + 1 < n:
                    begin()
                    c = text[self.i + 1]
                    if c == "\0":
                        raise self.fail(self.line, words, "NUL character in file")
                    self.line += c == "\n"
                    cur.append(c)
                    self.i += 2
                else:
                    self.i += 1  # a lone backslash at the very end of the file is dropped
            else:
                begin()
                cur.append(c)
                self.i += 1
        flush()
        if words:
            yield _Command(words, words[0].line)


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


def _parse(text: str, source: str) -> list[_Builder]:
    lexer = _Lexer(text, source)
    sections: list[_Builder] = []
    by_name: dict[str, _Builder] = {}
    cur: _Builder | None = None
    for cmd in lexer.commands():
        words = cmd.words
        verb, args = words[0].text, [w.text for w in words[1:]]
        if verb in _CMD_PACKAGE:
            if len(args) != 1 or not _valid_name(args[0]):
                raise lexer.fail(cmd.line, words[:1], "expected one package name")
            continue
        if verb in _CMD_CONFIG:
            if not args:
                raise lexer.fail(cmd.line, words, "missing section type")
            if len(args) > 2:
                raise lexer.fail(cmd.line, words, "too many arguments")
            stype = args[0]
            if not _valid_type(stype):
                raise lexer.fail(cmd.line, words[:1], f"invalid section type {stype!r}")
            name = args[1] if len(args) > 1 and args[1] else None
            if name is None:
                cur = _Builder(stype, None, cmd.line)
                sections.append(cur)
            elif not _valid_name(name):
                raise lexer.fail(cmd.line, words, f"invalid section name {name!r}")
            elif name in by_name:
                cur = by_name[name]
                cur.type = stype
            else:
                cur = by_name[name] = _Builder(stype, name, cmd.line)
                sections.append(cur)
            cur.commands.append(cmd)
            continue
        is_list = verb in _CMD_LIST
        if not is_list and verb not in _CMD_OPTION:
            raise lexer.fail(cmd.line, [], f"unknown command {verb!r}")
        if not args:
            raise lexer.fail(cmd.line, words, "missing option name")
        if len(args) > 2:
            raise lexer.fail(cmd.line, words, "too many arguments")
        key = args[0]
        if not _valid_name(key):
            raise lexer.fail(cmd.line, words, "invalid option name")
        if cur is None:
            raise lexer.fail(cmd.line, words, "not inside a config section")
        value = args[1] if len(args) > 1 else ""
        cur.commands.append(cmd)
        if is_list:
            items = cur.lists.setdefault(key, [])
            if key in cur.options:
                items.append(cur.options.pop(key))
            items.append(value)
            cur.option_lines[key] = cmd.line
        elif value:
            cur.lists.pop(key, None)
            cur.options[key] = value
            cur.option_lines[key] = cmd.line
    return sections


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
    _check(result, source, section, option, value)
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


def _check(result: str, source: str, section: str, option: str, value: str) -> None:
    """The edit must have done exactly what was asked (guards the offset arithmetic above)."""
    target = _find_section(_parse(result, source), section)
    got = target.options.get(option, "") if target is not None else None
    if got != value or (target is not None and option in target.lists):
        raise ConfigError(f"{source}: could not set {section}.{option} in place")
