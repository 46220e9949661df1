"""CycloneDX 1.5 SBOM of the .ipk or the .apk: ``dist/glucoagent.cdx.json`` and ``dist/glucoagent.apk.cdx.json``.

Lists every piece of software of unknown provenance (SOUP) the package carries or needs:

* the vendored libraries inside the package (cbor2, tenacity, paho-mqtt): version and licence from
  their metadata, and the SHA-256 of every file the package ships for them (nested ``file``
  components) plus one digest over that list;
* every OpenWrt package in ``Depends``: name, the constraint, the licence as far as known (from
  openwrt/packages), and a property saying why there is no hash (the feed provides it on the device).

Read from the built package, so the hashes are those of the bytes that ship: the .ipk with Python's
tarfile, the .apk through the real apk (``apk adbdump --format json`` for its info, ``apk extract`` for its
files; ``--apk-tool`` or the tools cache). Deterministic: the timestamp is the package's SourceDateEpoch
(the .apk's file mtimes, which are the same epoch) and the serial number derives from the package hash.

Usage: ``python -m openwrt.sbom [--ipk dist/x.ipk | --apk dist/x.apk --apk-tool PATH] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import email.parser
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from openwrt import build_apk
from openwrt import build_ipk as B
from openwrt.package import Depend

__all__ = ["OPENWRT_DEPENDENCIES", "Artefact", "main", "read_apk", "read_ipk", "sbom"]

#: What openwrt/packages says about each dependency (lang/python/*/Makefile PKG_LICENSE, versions on
#: the 23.05 / 24.10 branches as read for the packaging reference).
OPENWRT_DEPENDENCIES: dict[str, dict[str, str]] = {
    "libc": {"license": "MIT", "note": "musl C library (OpenWrt's libc)"},
    "python3-light": {"license": "PSF-2.0", "known": "3.11.7 (23.05), 3.11.14 (24.10)"},
    "python3-asyncio": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-ctypes": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-decimal": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-email": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-logging": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-openssl": {"license": "PSF-2.0", "known": "part of python3 3.11.x; links libopenssl (Apache-2.0)"},
    "python3-sqlite3": {"license": "PSF-2.0", "known": "part of python3 3.11.x; links libsqlite3 (blessing)"},
    "python3-urllib": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-uuid": {"license": "PSF-2.0", "known": "part of python3 3.11.x"},
    "python3-cryptography": {"license": "Apache-2.0 OR BSD-3-Clause", "known": "41.0.7 (23.05, 24.10)"},
    "python3-pyserial": {"license": "BSD-3-Clause", "known": "3.5 (23.05, 24.10)"},
}
NO_HASH = (
    "none: not inside this package; installed from the OpenWrt package feed on the device"
    " (opkg checks its feed's SHA256sum, apk its signed index)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Artefact:
    """What the SBOM needs from a built package, whichever its format."""

    path: Path
    format: str  # "ipk" or "apk"
    name: str
    version: str
    description: str
    arch: str
    depends: tuple[Depend, ...]
    depends_text: str  # as the package writes it
    epoch: int
    files: dict[str, bytes]  # device path -> bytes


def _tar_files(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        return {
            "/" + m.name.removeprefix("./"): tf.extractfile(m).read()  # type: ignore[union-attr]
            for m in tf.getmembers()
            if m.isfile()
        }


def _control(blob: bytes) -> dict[str, str]:
    text = _tar_files(blob)["/control"].decode()
    return {k: v for k, _, v in (line.partition(": ") for line in text.splitlines() if not line.startswith(" "))}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _licenses(expression: str) -> list[dict[str, Any]]:
    if " " in expression or expression.startswith("LicenseRef-"):
        return [{"expression": expression}]
    return [{"license": {"id": expression}}]


def _vendored_component(lib: B.Vendored, files: dict[str, bytes]) -> dict[str, Any]:
    vendor = str(B.VENDOR_DIR)
    dist_prefix = lib.dist.replace("-", "_") + "-"
    infos = sorted({p.split("/")[5] for p in files if p.startswith(f"{vendor}/{dist_prefix}") and ".dist-info/" in p})
    if len(infos) != 1:
        raise ValueError(f"{lib.dist}: expected one dist-info in the package, found {infos}")
    info = infos[0]
    meta = email.parser.Parser().parsestr(files[f"{vendor}/{info}/METADATA"].decode())
    version = meta["Version"]
    mine = sorted(
        p
        for p in files
        if p.startswith(f"{vendor}/{info}/") or any(p.startswith(f"{vendor}/{top}/") for top in lib.top_level)
    )
    manifest = "".join(f"{_sha256(files[p])}  {p}\n" for p in mine)
    licence_files = [p for p in mine if "/licenses/" in p]
    purl = f"pkg:pypi/{lib.dist}@{version}"
    return {
        "type": "library",
        "bom-ref": purl,
        "name": lib.dist,
        "version": version,
        "scope": "required",
        "purl": purl,
        "licenses": _licenses(meta.get("License-Expression") or lib.license),
        "hashes": [{"alg": "SHA-256", "content": _sha256(manifest.encode())}],
        "externalReferences": [{"type": "vcs", "url": lib.url}],
        "properties": [
            {"name": "glucoagent:provenance", "value": "vendored into the package from the build environment"},
            {"name": "glucoagent:path", "value": f"{vendor}/{lib.top_level[0]}"},
            {"name": "glucoagent:hash-method", "value": "SHA-256 over lines '<sha256>  <path>\\n' of the files below"},
            {"name": "glucoagent:license-files", "value": ", ".join(licence_files)},
        ],
        "components": [
            {
                "type": "file",
                "bom-ref": f"file:{p}",
                "name": p,
                "hashes": [{"alg": "SHA-256", "content": _sha256(files[p])}],
            }
            for p in mine
        ],
    }


def _openwrt_component(depend: Depend, fmt: str) -> dict[str, Any]:
    name = depend.name
    known = OPENWRT_DEPENDENCIES.get(name, {})
    props = [
        {"name": "glucoagent:provenance", "value": f"OpenWrt package feed (depends of the .{fmt})"},
        {"name": "glucoagent:hash", "value": NO_HASH},
    ]
    if depend.constraint:
        props.append({"name": "glucoagent:version-constraint", "value": depend.constraint})
    if "known" in known:
        props.append({"name": "glucoagent:known-versions", "value": known["known"]})
    if "note" in known:
        props.append({"name": "glucoagent:note", "value": known["note"]})
    comp: dict[str, Any] = {
        "type": "library",
        "bom-ref": f"pkg:generic/openwrt/{name}",
        "name": name,
        "scope": "required",
        "purl": f"pkg:generic/openwrt/{name}",
        "properties": props,
    }
    if "license" in known:
        comp["licenses"] = _licenses(known["license"])
    else:
        props.append({"name": "glucoagent:license", "value": "unknown"})
    return comp


def read_ipk(path: Path) -> Artefact:
    blob = path.read_bytes()
    outer = _tar_files(blob)
    fields = _control(outer["/control.tar.gz"])
    return Artefact(
        path=path,
        format="ipk",
        name=fields["Package"],
        version=fields["Version"],
        description=fields["Description"],
        arch=fields["Architecture"],
        depends=tuple(Depend.parse(d.strip()) for d in fields["Depends"].split(",")),
        depends_text=fields["Depends"],
        epoch=int(fields["SourceDateEpoch"]),
        files=_tar_files(outer["/data.tar.gz"]),
    )


def _apk_run(apk_tool: Path, *args: str) -> str:
    res = subprocess.run([str(apk_tool), *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ValueError(f"apk {args[0]} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def read_apk(path: Path, apk_tool: Path) -> Artefact:
    """The .apk as the real apk reads it: info and file records from the ADB, bytes from ``apk extract``."""
    adb = json.loads(_apk_run(apk_tool, "adbdump", "--format", "json", str(path)))
    info = adb["info"]
    mtimes = {f["mtime"] for d in adb["paths"] for f in d.get("files", [])}
    if len(mtimes) != 1:
        raise ValueError(f"{path}: expected one mtime (SOURCE_DATE_EPOCH) on every file, found {sorted(mtimes)}")
    with tempfile.TemporaryDirectory(prefix="sbom-apk.") as tmp:
        _apk_run(apk_tool, "extract", "--allow-untrusted", "--destination", tmp, str(path))
        root = Path(tmp)
        files = {"/" + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return Artefact(
        path=path,
        format="apk",
        name=info["name"],
        version=info["version"],
        description=info["description"],
        arch=info["arch"],
        depends=tuple(Depend.parse_apk(d) for d in info.get("depends", [])),
        depends_text=" ".join(info.get("depends", [])),
        epoch=mtimes.pop(),
        files=files,
    )


def sbom(package: Path | Artefact) -> dict[str, Any]:
    """The CycloneDX 1.5 document for a package (an .ipk path, or an Artefact read by read_apk)."""
    art = package if isinstance(package, Artefact) else read_ipk(package)
    digest = _sha256(art.path.read_bytes())
    main_ref = f"pkg:generic/glucoagent@{art.version}"
    vendored = [_vendored_component(lib, art.files) for lib in B.VENDORED]
    depends = [_openwrt_component(d, art.format) for d in art.depends]
    # the .ipk keeps its original serial namespace so its SBOM does not change with this refactor
    serial_key = f"glucoagent-{art.format}:{digest}"
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, serial_key)}",
        "version": 1,
        "metadata": {
            "timestamp": dt.datetime.fromtimestamp(art.epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "glucoagent openwrt/sbom.py"}]},
            "component": {
                "type": "application",
                "bom-ref": main_ref,
                "name": art.name,
                "version": art.version,
                "description": art.description,
                "licenses": _licenses(B.LICENSE),
                "hashes": [{"alg": "SHA-256", "content": digest}],
                "properties": [
                    {"name": "glucoagent:file", "value": art.path.name},
                    {"name": "glucoagent:format", "value": art.format},
                    {"name": "openwrt:Architecture", "value": art.arch},
                    {"name": "openwrt:Depends", "value": art.depends_text},
                ],
            },
        },
        "components": vendored + depends,
        "dependencies": [
            {"ref": main_ref, "dependsOn": [c["bom-ref"] for c in vendored + depends]},
            *({"ref": c["bom-ref"], "dependsOn": []} for c in vendored + depends),
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbom", description="CycloneDX 1.5 SBOM of the glucoagent .ipk or .apk")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--ipk", type=Path, help="package to describe (default: build the .ipk into dist/)")
    what.add_argument("--apk", type=Path, help="the .apk to describe (read with the real apk)")
    parser.add_argument("--apk-tool", type=Path, help="apk 3 binary to read the .apk with")
    parser.add_argument(
        "--tools-src", type=Path, help="OpenWrt tool sources to build apk from when --apk-tool is not given"
    )
    parser.add_argument("--out", type=Path, default=B.REPO / "dist" / "glucoagent.cdx.json")
    args = parser.parse_args(argv)
    try:
        if args.apk:
            tool = build_apk.find_apk_tool(args.apk_tool, args.tools_src or build_apk.DEFAULT_TOOLS_SRC)
            package: Path | Artefact = read_apk(args.apk, tool)
            name = args.apk.name
        else:
            package = args.ipk or B.build_ipk(args.out.parent)
            name = PurePosixPath(package).name
        doc = sbom(package)
    except (B.BuildError, ValueError, OSError) as exc:
        print(f"sbom: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    n_files = sum(len(c.get("components", [])) for c in doc["components"])
    print(f"{args.out}: {len(doc['components'])} components, {n_files} hashed files, for {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
