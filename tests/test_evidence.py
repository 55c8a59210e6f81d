"""Evidence a user can verify (issue 23 part 4): the SBOMs validate with the reference tools of both formats,
the sums, signatures and provenance verify, and a change to any file is named by `maculaos-sdk verify`."""

from __future__ import annotations

import json
import shutil

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
from test_build_fake_engine import FakeClient, _build, env  # noqa: F401 - env is a fixture

from maculaos_sdk import keys
from maculaos_sdk.cli import main
from maculaos_sdk.paths import cache_dir
from maculaos_sdk.verify import VerifyFailed, verify_folder

BASE = "maculaos-core-0.1.0-amd64"


@pytest.fixture
def built(env):  # noqa: F811
    out = env / "out"
    _build(FakeClient(), out)
    return out, keys.public_key_path(cache_dir() / "keys" / "dev.key")


def test_the_sboms_validate_with_the_reference_tools_and_carry_debian_s_licences(built):
    out, _ = built
    spdx = parse_file(str(out / f"{BASE}.spdx.json"))
    assert validate_full_spdx_document(spdx) == []
    by_name = {p.name: p for p in spdx.packages}
    assert str(by_name["bash"].license_declared) == "GPL-3.0-or-later AND GPL-2.0-or-later AND BSD-3-Clause"
    assert by_name["linux-image-6.1.0-1-amd64"].version == "6.1.1-1"  # the kernel is in it too
    doc = json.loads((out / f"{BASE}.spdx.json").read_text())
    openrc = next(p for p in doc["packages"] if p["name"] == "openrc")
    assert openrc["licenseDeclared"] == "NOASSERTION"
    assert openrc["comment"] == "Debian states: BSD-2-clause, Custom-Gentoo"
    cdx = (out / f"{BASE}.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(cdx) is None
    components = {c["name"]: c for c in json.loads(cdx)["components"]}
    assert components["openrc"]["licenses"] == [{"license": {"name": "BSD-2-clause"}},
                                                {"license": {"name": "Custom-Gentoo"}}]
    assert components["bash"]["purl"] == "pkg:deb/debian/bash@5.2?arch=amd64"


def test_the_provenance_names_every_output_and_what_it_was_built_from(built):
    out, _ = built
    statement = json.loads((out / f"{BASE}.provenance.json").read_text())
    manifest = json.loads((out / f"{BASE}.manifest.json").read_text())
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": f"{BASE}.iso", "digest": {"sha256": manifest["artifacts"][f"{BASE}.iso"]
                                                                                  ["sha256"]}}]
    build = statement["predicate"]["buildDefinition"]
    assert build["internalParameters"]["stages"] == {k: v["id"] for k, v in manifest["stages"].items()}
    assert {d["uri"] for d in build["resolvedDependencies"]} >= {"file:profiles/core.yaml", "file:artifacts.lock.yaml"}


def test_verify_accepts_the_build_and_names_the_first_file_that_was_changed(built, tmp_path, capsys):
    out, public = built
    assert verify_folder(out, public).files == 4  # the ISO, two SBOMs, the provenance
    assert main(["verify", str(out), "--public-key", str(public)]) == 0
    capsys.readouterr()
    unsigned = "signature does not verify"
    spoil = {f"{BASE}.iso": "sha256 differs", f"{BASE}.spdx.json": unsigned, f"{BASE}.cdx.json": unsigned,
             f"{BASE}.provenance.json": unsigned, f"{BASE}.SHA256SUMS": unsigned,
             f"{BASE}.SHA256SUMS.minisig": unsigned}
    for name, why in spoil.items():
        copy = tmp_path / name
        shutil.copytree(out, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 1  # one bit, in the middle (a signature's trailing newline is not checked)
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(VerifyFailed, match=why) as exc:
            verify_folder(copy, public)
        assert str(exc.value).startswith(str(copy / name.removesuffix(".minisig"))), exc.value
        assert main(["verify", str(copy), "--public-key", str(public)]) == 1
        assert capsys.readouterr().err.startswith(f"maculaos-sdk verify: {copy}")
    (tmp_path / "gone").mkdir()
    shutil.copytree(out, tmp_path / "gone" / "out")
    (tmp_path / "gone" / "out" / f"{BASE}.cdx.json").unlink()
    with pytest.raises(VerifyFailed, match=f"{BASE}.cdx.json: missing"):
        verify_folder(tmp_path / "gone" / "out", public)
    other = keys.generate(tmp_path / "other.key")
    with pytest.raises(VerifyFailed, match=f"{BASE}.SHA256SUMS: signature does not verify with {other}"):
        verify_folder(out, other)


def test_evidence_is_the_same_for_the_same_inputs(built, env):  # noqa: F811
    out, _ = built
    again, reused, client = env / "again", env / "reused", FakeClient()
    _build(client, again)
    _build(client, reused)  # every stage reused this time: other "cached" flags and times in the manifest
    for folder in (again, reused):
        for suffix in (".spdx.json", ".cdx.json", ".provenance.json", ".SHA256SUMS"):
            assert (out / f"{BASE}{suffix}").read_bytes() == (folder / f"{BASE}{suffix}").read_bytes(), suffix
