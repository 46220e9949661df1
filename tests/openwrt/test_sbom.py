"""The CycloneDX SBOM lists exactly what the package carries and needs, with the shipped hashes."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from openwrt import build_ipk as B
from openwrt import hosttools
from openwrt import sbom as S
from openwrt.build_apk import build_apk
from openwrt.package import describe


@pytest.fixture(scope="module")
def doc(ipk: Path) -> dict[str, Any]:
    return S.sbom(ipk)


def _data_files(ipk: Path) -> dict[str, bytes]:
    with tarfile.open(ipk, "r:gz") as outer:
        data = outer.extractfile("./data.tar.gz").read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tf:
        return {"/" + m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_document_shape(doc: dict[str, Any], ipk: Path) -> None:
    assert (doc["bomFormat"], doc["specVersion"], doc["version"]) == ("CycloneDX", "1.5", 1)
    assert doc["serialNumber"].startswith("urn:uuid:")
    main = doc["metadata"]["component"]
    assert main["name"] == "glucoagent" and main["version"] == B.package_version()
    assert main["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(ipk.read_bytes()).hexdigest()}]
    refs = [c["bom-ref"] for c in doc["components"]]
    assert len(refs) == len(set(refs))
    (top,) = [d for d in doc["dependencies"] if d["ref"] == main["bom-ref"]]
    assert sorted(top["dependsOn"]) == sorted(refs)
    json.dumps(doc)  # serialisable


def test_vendored_libraries_with_version_licence_and_file_hashes(doc: dict[str, Any], ipk: Path) -> None:
    files = _data_files(ipk)
    vendored_files = {p for p in files if p.startswith(str(B.VENDOR_DIR) + "/")}
    listed: set[str] = set()
    for lib in B.VENDORED:
        (comp,) = [c for c in doc["components"] if c["name"] == lib.dist]
        assert comp["version"] == importlib.metadata.version(lib.dist)
        assert comp["purl"] == f"pkg:pypi/{lib.dist}@{comp['version']}"
        assert comp["licenses"]
        for f in comp["components"]:
            assert f["hashes"][0]["content"] == hashlib.sha256(files[f["name"]]).hexdigest(), f["name"]
            listed.add(f["name"])
        manifest = "".join(f"{x['hashes'][0]['content']}  {x['name']}\n" for x in comp["components"])
        assert comp["hashes"][0]["content"] == hashlib.sha256(manifest.encode()).hexdigest()
        assert any("/licenses/" in f["name"] for f in comp["components"])
    assert listed == vendored_files  # every shipped third-party file is accounted for, nothing else


def test_every_openwrt_dependency_is_listed_without_a_hash(doc: dict[str, Any]) -> None:
    by_name = {c["name"]: c for c in doc["components"]}
    for depend in B.DEPENDS:
        name = depend.split(" ")[0]
        comp = by_name[name]
        props = {p["name"]: p["value"] for p in comp["properties"]}
        assert props["glucoagent:hash"] == S.NO_HASH
        assert "hashes" not in comp
        assert comp.get("licenses"), f"{name}: licence unknown; add it to OPENWRT_DEPENDENCIES"
    assert by_name["python3-light"]["properties"][2]["value"] == ">= 3.11"


def test_sbom_is_deterministic(ipk: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert S.main(["--ipk", str(ipk), "--out", str(a)]) == 0
    assert S.main(["--ipk", str(ipk), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_apk_sbom_describes_the_same_software(
    openwrt_tools: hosttools.Tools, doc: dict[str, Any], tmp_path: Path
) -> None:
    """The .apk's SBOM, read through the real apk: same vendored files and hashes, same dependencies."""
    apk = build_apk(tmp_path / "dist", apk=openwrt_tools.apk)
    apk_doc = S.sbom(S.read_apk(apk, openwrt_tools.apk))
    main = apk_doc["metadata"]["component"]
    assert (main["name"], main["version"]) == ("glucoagent", describe().apk_version)
    assert main["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(apk.read_bytes()).hexdigest()}]
    assert apk_doc["metadata"]["timestamp"] == doc["metadata"]["timestamp"]  # both from SOURCE_DATE_EPOCH
    assert apk_doc["serialNumber"] != doc["serialNumber"]
    by_name = {c["name"]: c for c in apk_doc["components"]}
    for comp in doc["components"]:
        if comp["purl"].startswith("pkg:pypi/"):
            assert by_name[comp["name"]] == comp  # every vendored file, byte for byte the same hashes
        else:
            props = {p["name"]: p["value"] for p in by_name[comp["name"]]["properties"]}
            ipk_props = {p["name"]: p["value"] for p in comp["properties"]}
            assert props.get("glucoagent:version-constraint") == ipk_props.get("glucoagent:version-constraint")
    assert set(by_name) == {c["name"] for c in doc["components"]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        assert S.main(["--apk", str(apk), "--apk-tool", str(openwrt_tools.apk), "--out", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()
