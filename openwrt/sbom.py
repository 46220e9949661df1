"""CycloneDX 1.5 SBOM of the .ipk: ``dist/glucoagent.cdx.json`` (``make sbom``).

Lists every piece of software of unknown provenance (SOUP) the package carries or needs:

* the vendored libraries inside the package (cbor2, tenacity, paho-mqtt): version and licence from
  their metadata, and the SHA-256 of every file the package ships for them (nested ``file``
  components) plus one digest over that list;
* every OpenWrt package in ``Depends``: name, the constraint, the licence as far as known (from
  openwrt/packages), and a property saying why there is no hash (the feed provides it on the device).

Read from the built .ipk, so the hashes are those of the bytes that ship. Deterministic: the
timestamp is the package's SourceDateEpoch and the serial number derives from the package hash.

Usage: ``python -m openwrt.sbom [--ipk dist/x.ipk] [--out dist/glucoagent.cdx.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.parser
import hashlib
import io
import json
import sys
import tarfile
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from openwrt import build_ipk as B

__all__ = ["OPENWRT_DEPENDENCIES", "main", "sbom"]

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
NO_HASH = "none: not inside this package; installed from the OpenWrt package feed on the device (opkg checks its feed's SHA256sum)"


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


def _openwrt_component(depend: str) -> dict[str, Any]:
    name, _, constraint = depend.partition(" ")
    known = OPENWRT_DEPENDENCIES.get(name, {})
    props = [
        {"name": "glucoagent:provenance", "value": "OpenWrt package feed (Depends of the .ipk)"},
        {"name": "glucoagent:hash", "value": NO_HASH},
    ]
    if constraint:
        props.append({"name": "glucoagent:version-constraint", "value": constraint.strip("()")})
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


def sbom(ipk: Path) -> dict[str, Any]:
    """The CycloneDX 1.5 document for ``ipk``."""
    blob = ipk.read_bytes()
    outer = _tar_files(blob)
    fields = _control(outer["/control.tar.gz"])
    files = _tar_files(outer["/data.tar.gz"])
    digest = _sha256(blob)
    epoch = int(fields["SourceDateEpoch"])
    main_ref = f"pkg:generic/glucoagent@{fields['Version']}"
    vendored = [_vendored_component(lib, files) for lib in B.VENDORED]
    depends = [_openwrt_component(d.strip()) for d in fields["Depends"].split(",")]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'glucoagent-ipk:{digest}')}",
        "version": 1,
        "metadata": {
            "timestamp": dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "glucoagent openwrt/sbom.py"}]},
            "component": {
                "type": "application",
                "bom-ref": main_ref,
                "name": fields["Package"],
                "version": fields["Version"],
                "description": fields["Description"],
                "licenses": _licenses(B.LICENSE),
                "hashes": [{"alg": "SHA-256", "content": digest}],
                "properties": [
                    {"name": "glucoagent:file", "value": ipk.name},
                    {"name": "openwrt:Architecture", "value": fields["Architecture"]},
                    {"name": "openwrt:Depends", "value": fields["Depends"]},
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
    parser = argparse.ArgumentParser(prog="sbom", description="CycloneDX 1.5 SBOM of the glucoagent .ipk")
    parser.add_argument("--ipk", type=Path, help="package to describe (default: build it into dist/)")
    parser.add_argument("--out", type=Path, default=B.REPO / "dist" / "glucoagent.cdx.json")
    args = parser.parse_args(argv)
    try:
        ipk = args.ipk or B.build_ipk(args.out.parent)
    except B.BuildError as exc:
        print(f"sbom: {exc}", file=sys.stderr)
        return 1
    doc = sbom(ipk)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    n_files = sum(len(c.get("components", [])) for c in doc["components"])
    print(f"{args.out}: {len(doc['components'])} components, {n_files} hashed files, for {PurePosixPath(ipk).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
