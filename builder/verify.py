"""`maculaos-sdk verify DIR`: check what a build or a release folder carries, as a user downloading it would.

For every `<basename>.SHA256SUMS` in the folder: its signature and those of the SBOMs and the provenance (minisign,
against the given public key), every file it lists (present, the same sha256), and that every output has its
SPDX and CycloneDX SBOMs and is a subject of the provenance with the same digest. The first thing that fails is
named (exit 1); nothing is trusted before its signature checked out."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import keys
from .artifacts import file_sha256
from .evidence import EVIDENCE, SUMS

MAX_SUMS_BYTES = 1 << 20
MAX_EVIDENCE_BYTES = 64 << 20


class VerifyFailed(Exception):
    """What failed, as one line."""


@dataclass
class Verified:
    builds: int
    files: int


def verify_folder(folder: Path, public_key: Path) -> Verified:
    sums_files = sorted(folder.glob(f"*{SUMS}"))
    if not sums_files:
        raise VerifyFailed(f"{folder}: no *{SUMS} (not the output folder of a build with evidence)")
    files = 0
    for sums in sums_files:
        files += _verify_build(folder, sums, public_key)
    return Verified(len(sums_files), files)


def _signed(path: Path, public_key: Path, limit: int) -> bytes:
    """The file's bytes, once its minisign signature checked out against the key."""
    if not path.is_file():
        raise VerifyFailed(f"{path}: missing")
    if path.stat().st_size > limit:
        raise VerifyFailed(f"{path}: larger than {limit} bytes")
    signature = path.with_name(path.name + ".minisig")
    if not signature.is_file():
        raise VerifyFailed(f"{signature}: missing")
    check = subprocess.run([keys.minisign_binary(), "-Vqm", str(path), "-x", str(signature), "-p", str(public_key)],
                           capture_output=True)
    if check.returncode != 0:
        raise VerifyFailed(f"{path}: signature does not verify with {public_key}")
    return path.read_bytes()


def _parse_sums(sums: Path, data: bytes) -> dict[str, str]:
    listed: dict[str, str] = {}
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
            raise VerifyFailed(f"{sums}:{n}: not a `<sha256>  <file>` line")
        listed[name] = digest
    return listed


def _verify_build(folder: Path, sums: Path, public_key: Path) -> int:
    listed = _parse_sums(sums, _signed(sums, public_key, MAX_SUMS_BYTES))
    base = sums.name[: -len(SUMS)]
    docs = {}
    for suffix in EVIDENCE:
        name = f"{base}{suffix}"
        if name not in listed:
            raise VerifyFailed(f"{sums}: does not list {name}")
        docs[suffix] = json.loads(_signed(folder / name, public_key, MAX_EVIDENCE_BYTES))
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise VerifyFailed(f"{path}: listed in {sums.name}, missing")
        if file_sha256(path) != digest:
            raise VerifyFailed(f"{path}: sha256 differs from {sums.name}")
    outputs = {n: d for n, d in listed.items() if n not in {f"{base}{s}" for s in EVIDENCE}}
    subjects = {s.get("name"): s.get("digest", {}).get("sha256") for s in docs[".provenance.json"].get("subject", [])}
    for name, digest in outputs.items():
        if subjects.get(name) != digest:
            raise VerifyFailed(f"{folder / name}: not a subject of {base}.provenance.json with this digest")
    if docs[".spdx.json"].get("name") != base or docs[".cdx.json"].get("bomFormat") != "CycloneDX":
        raise VerifyFailed(f"{folder / base}: its SBOMs do not describe this build")
    return len(listed)
