"""A release built for real: `build-image --release` with a throwaway signing key, through the docker engine.
What it records and signs is checked, not what it prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from maculaos_sdk import keys
from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.paths import cache_dir
from maculaos_sdk.profile import load_profile
from maculaos_sdk.verify import verify_folder

from .conftest import OUT

pytestmark = pytest.mark.qemu


def test_a_release_with_a_throwaway_key_is_locked_and_signed_by_it(tmp_path):
    secret = tmp_path / "release.key"
    public = keys.generate(secret)
    profile = load_profile(str(Path(__file__).parent / "profiles" / "release.yaml"))
    out = OUT / "release"
    artifacts = build_image(profile, BuildOptions(output=out, release=True, signing_key=secret)).artifacts
    bundle = artifacts["maculaos-release-0.1.0-amd64.bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["signing_key_id"] == keys.key_id(public.read_text())
    assert subprocess.run(["minisign", "-Vqm", str(bundle / "manifest.json"), "-p", str(public)]).returncode == 0
    build = json.loads((out / "manifest.json").read_text())
    assert build["signing_key_id"] == manifest["signing_key_id"]
    # the layer it was built from (hashed into the layer stage's id) trusts the throwaway key alone, and its
    # inittab logs nobody in
    layer = cache_dir() / "contexts" / profile.artifact_basename() / "layer"
    assert (layer / "overlay/usr/share/maculaos/update.pub").read_text() == public.read_text()
    gettys = [line for line in (layer / "inittab").read_text().splitlines() if "agetty" in line]
    assert len(gettys) == 2 and not any("--autologin" in line for line in gettys), gettys
    # the evidence a user checks: signed sums, both SBOMs valid by their formats' reference tools (the licences are
    # what the real packages' copyright files state), a provenance naming every output
    assert verify_folder(out, public).files >= 9  # the bundle's 5 files, the ISO, 2 SBOMs, the provenance
    base = "maculaos-release-0.1.0-amd64"
    assert validate_full_spdx_document(parse_file(str(out / f"{base}.spdx.json"))) == []
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str((out / f"{base}.cdx.json").read_text()) is None
    debs = [p for p in json.loads((out / f"{base}.spdx.json").read_text())["packages"] if "externalRefs" in p]
    expressed = [p for p in debs if p["licenseDeclared"] != "NOASSERTION"]
    # every package gets what Debian states: an SPDX expression when all its names have SPDX ids, else the names
    assert len(expressed) > len(debs) / 3 and all(p.get("comment", "").startswith("Debian states: ")
                                                  for p in debs if p not in expressed and "comment" in p), debs
    sshd = next(p for p in debs if p["name"] == "openssh-server")  # its doc folder links to openssh-client's
    assert sshd["licenseDeclared"] != "NOASSERTION" or "OpenSSH" in sshd["comment"], sshd
