"""The package's postinst puts the update watchdog in root's crontab once, as an image build runs it
(``IPKG_INSTROOT`` set) and again on an upgrade: never twice, never a failing exit status."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

POSTINST = Path(__file__).resolve().parents[2] / "openwrt" / "files" / "glucoagent.postinst-pkg"
LINE = "* * * * * [ -x /usr/libexec/glucoagent-update-watchdog ] && /usr/libexec/glucoagent-update-watchdog"


def _run(root: Path, upgrade: bool) -> None:
    shell = shutil.which("busybox")
    argv = [shell, "ash", str(POSTINST)] if shell else ["sh", str(POSTINST)]
    env = {"PATH": "/usr/bin:/bin", "IPKG_INSTROOT": str(root), "PKG_UPGRADE": "1" if upgrade else "0"}
    subprocess.run(argv, env=env, check=True, timeout=30)


def test_the_watchdog_line_is_added_once_and_kept_across_upgrades(tmp_path: Path) -> None:
    crontabs = tmp_path / "etc" / "crontabs"
    crontabs.mkdir(parents=True)
    (crontabs / "root").write_text("0 3 * * * /sbin/reboot-if-needed\n")  # the owner's own lines stay
    _run(tmp_path, upgrade=False)
    _run(tmp_path, upgrade=True)
    lines = (crontabs / "root").read_text().splitlines()
    assert lines == ["0 3 * * * /sbin/reboot-if-needed", LINE]
    assert (tmp_path / "etc" / "glucoagent").stat().st_mode & 0o777 == 0o700
