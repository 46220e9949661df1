"""The installer's package manager: configured, or what the box has (apk's database on 25.12+, else opkg)."""

from __future__ import annotations

from pathlib import Path

from agent.update.pkgdb import APK, OPKG, PackageManager


def test_an_empty_setting_takes_apk_when_its_database_exists(tmp_path: Path) -> None:
    (tmp_path / "lib/apk/db").mkdir(parents=True)
    (tmp_path / "lib/apk/db/installed").write_text("P:glucoagent\nV:0.1.0-r1\n")
    pm = PackageManager.parse("", "", root=tmp_path)
    assert pm == APK and pm.format == "apk"
    assert pm.install == ("apk", "add", "--allow-untrusted", "--no-network")
    assert pm.status_file == Path("/lib/apk/db/installed")


def test_an_empty_setting_takes_opkg_otherwise(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/opkg").mkdir(parents=True)
    pm = PackageManager.parse("", "", root=tmp_path)
    assert pm == OPKG and pm.format == "ipk"
    assert pm.install == ("opkg", "install", "--force-downgrade", "--force-reinstall")


def test_what_is_configured_wins_and_the_database_names_the_format(tmp_path: Path) -> None:
    (tmp_path / "lib/apk/db").mkdir(parents=True)
    (tmp_path / "lib/apk/db/installed").touch()
    pm = PackageManager.parse("env A='b c' /x/opkg install", "/r/usr/lib/opkg/status", root=tmp_path)
    assert pm.install == ("env", "A=b c", "/x/opkg", "install") and pm.format == "ipk"
    pm = PackageManager.parse("/x/apk --root /r add", "/r/lib/apk/db/installed", root=tmp_path)
    assert pm.format == "apk"
    # Only the command set: the database is the box's own.
    assert PackageManager.parse("/x/apk add", "", root=tmp_path).status_file == APK.status_file
