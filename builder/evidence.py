"""Phase 6: evidence a user can verify, per build. Beside the outputs:

    <basename>.spdx.json        SPDX 2.3 SBOM: the Debian packages (versions, licences where Debian states them),
                                the kernel, pinned artifacts, preloaded container images
    <basename>.cdx.json         the same as a CycloneDX 1.5 SBOM
    <basename>.provenance.json  an in-toto statement with a SLSA v1 provenance predicate: every output as a
                                subject; the profile and lock-file digests, the archive's InRelease digests,
                                every stage id and the SDK's version as what it was built from
    <basename>.SHA256SUMS       every output file, the three above included

each signed with the build's key (`<file>.minisig`). All of it is derived from the build's record (the manifest)
and SOURCE_DATE_EPOCH, so two builds of the same inputs write the same evidence. `maculaos-sdk verify` checks it
(verify.py)."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

from . import __version__, artifacts, keys, licences
from .artifacts import file_sha256
from .paths import sdk_root
from .state import Build

EVIDENCE = (".spdx.json", ".cdx.json", ".provenance.json")  # each `<basename><suffix>`, signed
SUMS = ".SHA256SUMS"
NAMESPACE = "https://maculaos.io/maculaos-sdk"
BUILD_TYPE = f"{NAMESPACE}/build/v1"


def write_evidence(build: Build, record: dict[str, Any]) -> list[Path]:
    """Write and sign the SBOMs, the provenance and the sums; return them."""
    base, out = build.plan.basename, build.out
    outputs = _output_files(record, out)  # read once: the sums and the provenance's subjects list the same files
    docs = {".spdx.json": spdx(record, base), ".cdx.json": cyclonedx(record, base),
            ".provenance.json": provenance(record, outputs)}
    written = []
    for suffix, doc in docs.items():
        path = out / f"{base}{suffix}"
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        written.append(path)
    sums = out / f"{base}{SUMS}"
    sums.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(outputs.items())) +
                    "".join(f"{file_sha256(p)}  {p.name}\n" for p in written))
    written.append(sums)
    comment = f"maculaos {record['profile']} {record['version']} {record['arch']} evidence"
    for path in written:
        keys.sign(path, build.secret, comment)
    return written


def _output_files(record: dict[str, Any], out: Path) -> dict[str, str]:
    """Every output file and its sha256: the artifacts the manifest records, and each file of a bundle (as its
    signed manifest lists them)."""
    files: dict[str, str] = {}
    for name, entry in record["artifacts"].items():
        if "image_id" in entry:  # an image in the engine (oci): not a file
            continue
        if (out / name).is_dir():  # a bundle: its signed manifest, its signature and its payload
            manifest = json.loads((out / name / "manifest.json").read_text())
            files[f"{name}/manifest.json"] = entry["sha256"]
            files[f"{name}/manifest.json.minisig"] = file_sha256(out / name / "manifest.json.minisig")
            files.update({f"{name}/{f}": e["sha256"] for f, e in manifest["files"].items()})
        else:
            files[name] = entry["sha256"]
    return files


def _created(record: dict[str, Any]) -> str:
    return datetime.datetime.fromtimestamp(record["source_date_epoch"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _packages(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, version) of every Debian package in the image, the kernel's included."""
    found = dict(record.get("packages") or {})
    kernel = record.get("kernel") or {}
    if kernel.get("package"):
        found[kernel["package"]] = kernel["version"]
    return sorted(found.items())


def _purl(name: str, version: str, arch: str) -> str:
    return f"pkg:deb/debian/{name}@{version.replace(':', '%3A')}?arch={arch}"


def _spdx_id(kind: str, name: str) -> str:
    return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]", "-", name)


def spdx(record: dict[str, Any], base: str) -> dict[str, Any]:
    """An SPDX 2.3 document describing the image and what it contains."""
    stated = record.get("licences") or {}
    image = {"SPDXID": "SPDXRef-image", "name": f"maculaos-{record['profile']}", "versionInfo": record["version"],
             "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "licenseConcluded": "NOASSERTION",
             "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
             "primaryPackagePurpose": "OPERATING-SYSTEM", "supplier": "Organization: MaculaOS"}
    packages = [image]
    for name, version in _packages(record):
        names = stated.get(name, [])
        package = {"SPDXID": _spdx_id("deb", name), "name": name, "versionInfo": version,
                   "supplier": "Organization: Debian", "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
                   "licenseConcluded": "NOASSERTION",
                   "licenseDeclared": licences.spdx_expression(names) or "NOASSERTION",
                   "copyrightText": "NOASSERTION", "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER",
                   "referenceType": "purl", "referenceLocator": _purl(name, version, record["arch"])}]}
        if names and package["licenseDeclared"] == "NOASSERTION":
            package["comment"] = "Debian states: " + ", ".join(names)
        packages.append(package)
    for dest, entry in sorted((record.get("pinned_artifacts") or {}).items()):
        packages.append({"SPDXID": _spdx_id("file", dest), "name": dest, "downloadLocation": "NOASSERTION",
                         "filesAnalyzed": False, "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
                         "copyrightText": "NOASSERTION", "primaryPackagePurpose": "FILE",
                         "checksums": [{"algorithm": "SHA256", "checksumValue": entry["sha256"]}]})
    for i, img in enumerate(record.get("images") or []):
        packages.append({"SPDXID": _spdx_id("image", f"{i}-{img['ref']}"), "name": img["ref"],
                         "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "licenseConcluded": "NOASSERTION",
                         "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
                         "primaryPackagePurpose": "CONTAINER", "comment": "image ids: " + " ".join(img["ids"])})
    digest = hashlib.sha256(_stage_ids(record).encode()).hexdigest()[:32]
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": base,
        "documentNamespace": f"{NAMESPACE}/spdx/{base}-{digest}",
        "creationInfo": {"created": _created(record), "creators": [f"Tool: maculaos-sdk-{__version__}"]},
        "packages": packages,
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": "SPDXRef-image"}] +
                         [{"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                           "relatedSpdxElement": p["SPDXID"]} for p in packages[1:]],
    }


def cyclonedx(record: dict[str, Any], base: str) -> dict[str, Any]:
    """A CycloneDX 1.5 BOM of the same."""
    stated = record.get("licences") or {}
    components = []
    for name, version in _packages(record):
        purl = _purl(name, version, record["arch"])
        component: dict[str, Any] = {"type": "library", "bom-ref": purl, "name": name, "version": version,
                                     "purl": purl, "publisher": "Debian"}
        names = stated.get(name, [])
        if expression := licences.spdx_expression(names):
            component["licenses"] = [{"expression": expression}]
        elif names:
            component["licenses"] = [{"license": {"name": n}} for n in names]
        components.append(component)
    for dest, entry in sorted((record.get("pinned_artifacts") or {}).items()):
        components.append({"type": "file", "bom-ref": f"file:{dest}", "name": dest,
                           "hashes": [{"alg": "SHA-256", "content": entry["sha256"]}]})
    for i, img in enumerate(record.get("images") or []):
        components.append({"type": "container", "bom-ref": f"image:{i}:{img['ref']}", "name": img["ref"],
                           "description": "image ids: " + " ".join(img["ids"])})
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}/cdx/{base}/" + _stage_ids(record))
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "serialNumber": f"urn:uuid:{serial}", "version": 1,
        "metadata": {"timestamp": _created(record),
                     "tools": {"components": [{"type": "application", "name": "maculaos-sdk",
                                               "version": __version__}]},
                     "component": {"type": "operating-system", "bom-ref": "image",
                                   "name": f"maculaos-{record['profile']}", "version": record["version"]}},
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": [c["bom-ref"] for c in components]}],
    }


def _where(path: Path) -> str:
    """A build input's path as the provenance names it: relative to the SDK (the same on every machine), else
    its file name."""
    try:
        return path.resolve().relative_to(sdk_root().resolve()).as_posix()
    except ValueError:
        return path.name


def _stage_ids(record: dict[str, Any]) -> str:
    """What names a build in its documents: its stages' ids alone. Whether a stage was built, reused or pulled,
    and how long it took, change no byte (two builds of the same inputs give the same evidence)."""
    return json.dumps({key: stage["id"] for key, stage in record["stages"].items()}, sort_keys=True)


def provenance(record: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    """An in-toto v1 statement, SLSA provenance v1 predicate: what was built (every output file), from what."""
    subjects = [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(outputs.items())]
    subjects += [{"name": name, "digest": {"sha256": entry["image_id"].removeprefix("sha256:")}}  # its config's
                 for name, entry in sorted(record["artifacts"].items()) if "image_id" in entry]
    files = [Path(p) for p in record["profile_files"]] + [artifacts.lock_path()] * artifacts.lock_path().is_file()
    inputs = [{"uri": f"file:{_where(path)}", "digest": {"sha256": file_sha256(path)}} for path in files]
    inputs += [{"uri": f"http://{name.replace('_', '/')}", "name": name, "digest": {"sha256": entry["sha256"]}}
               for name, entry in sorted((record.get("archive") or {}).items()) if "sha256" in entry]
    inputs += [{"uri": f"file://{dest}", "digest": {"sha256": entry["sha256"]}}
               for dest, entry in sorted((record.get("pinned_artifacts") or {}).items())]
    return {
        "_type": "https://in-toto.io/Statement/v1", "subject": subjects,
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {k: record[k] for k in ("profile", "version", "arch", "board", "outputs")},
                "internalParameters": {"source_date_epoch": record["source_date_epoch"],
                                       "signing_key_id": record["signing_key_id"],
                                       "stages": {k: v["id"] for k, v in sorted(record["stages"].items())}},
                "resolvedDependencies": inputs,
            },
            "runDetails": {"builder": {"id": NAMESPACE, "version": {"maculaos-sdk": __version__}}},
        },
    }
