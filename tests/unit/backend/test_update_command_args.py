"""`glucoagent-backend command DEV update manifest=FILE`: a bytes argument is the content of the file named."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.commands import CommandError, parse_args


def test_bytes_arguments_read_the_named_file(tmp_path: Path) -> None:
    manifest = tmp_path / "glucoagent_0.2.0-1_all.ipk.manifest"
    manifest.write_bytes(b"\xd2\x84signed")
    assert parse_args("update", [f"manifest={manifest}"]) == {"manifest": b"\xd2\x84signed"}


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="manifest must be bytes"):
        parse_args("update", [f"manifest={tmp_path / 'absent'}"])
