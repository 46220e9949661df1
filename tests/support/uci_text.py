"""Hypothesis encoders of UCI words, shared by the grammar tests and the conformance corpus: every quoting
style (single, double with escapes and line joins, bare with backslashes) a person or `uci` might write."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st


def encode_piece(draw: st.DrawFn, piece: str) -> str:
    styles = ["double"]
    if "'" not in piece:
        styles.append("single")
    if "\n" not in piece and "\r" not in piece:
        styles.append("bare")
    style = draw(st.sampled_from(styles))
    if style == "single":
        return f"'{piece}'"
    if style == "double":
        body = "".join("\\" + c if c in '"\\' or (c.isalpha() and draw(st.booleans())) else c for c in piece)
        return f'"{body}"' if not draw(st.booleans()) else f'"{body}\\\n"'
    special = set(" \t\r\f\v'\"\\#;")
    tokens = ["\\" + c if c in special else c for c in piece]
    if tokens and draw(st.booleans()):
        cut = draw(st.integers(0, len(tokens)))
        tokens.insert(cut, "\\\n")  # a line join vanishes
    return "".join(tokens) or "''"


def encode_word(draw: st.DrawFn, word: str) -> str:
    if not word:
        return draw(st.sampled_from(["''", '""', "''\"\""]))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(word) - 1)), max_size=3))))
    bounds = [0, *[c for c in cuts if c < len(word)], len(word)]
    return "".join(encode_piece(draw, word[a:b]) for a, b in itertools.pairwise(bounds))
