"""The signed bundle manifest (`manifest.json`) and the per-slot record (`<esp>/<slot>/slot.json`).

Both have one writer, here: `bundle_manifest` (the bundle stage runs `python3 -m maculaos_device.manifest bundle`;
the SDK signs the result with minisign) and `SlotRecord.to_json` (the device after a verified write, and the disk
and SD image stages through `python3 -m maculaos_device.manifest slot-record` for the slot A they ship). The device
parses a manifest here, after the signature checked out, and never evaluates any of it. Every field must have the
expected type and form, or the whole manifest is refused. A slot record is written on the ESP once a
slot has been read back and matched its signed sha256; a slot without one holds nothing bootable."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import versions

MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64 << 10
PAYLOAD = ("rootfs.squashfs", "vmlinuz", "initrd.img")
SIGNED = ("manifest.json", "manifest.json.minisig")
BUNDLE_FILES = SIGNED + PAYLOAD
WORD = re.compile(r"[A-Za-z0-9._+~-]{1,64}")
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"[0-9A-F]{16}")  # minisign's key id, as `minisign -V` prints it
# rootfs.squashfs also carries a digest of each CHUNK_BYTES piece, so a device checks its read-back on every CPU.
# BLAKE2b-256 (RFC 7693; minisign signs the BLAKE2b-512 of a file): under TCG it hashed 118 MB in 1.4 s where
# sha256 took 5.0 s, and it is no weaker.
CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 64 << 20


def chunk_digest(data: bytes | memoryview) -> str:
    """The digest the manifest's `chunk_blake2b` list holds for one chunk."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


class ManifestError(ValueError):
    """The manifest (or slot record) is not of the expected form: the message says which field."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    chunk_bytes: int = 0  # with `chunks`: the chunk_digest of each chunk_bytes piece, in order (older bundles: none)
    chunks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    profile: str
    version: str
    arch: str
    board: str
    min_version: str
    files: dict[str, FileEntry]
    signing_key_id: str = ""  # the key the SDK signed it with (bundles before 0.1.0's trixie builds: absent)


@dataclass(frozen=True)
class SlotRecord:
    """What a verified slot holds: written after the read-back check, removed before the slot is written."""

    version: str
    profile: str
    size: int
    sha256: str

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "profile": self.profile, "size": self.size,
                           "sha256": self.sha256}, sort_keys=True) + "\n"


def _word(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not WORD.fullmatch(value):
        raise ManifestError(f"field {key!r} is not a plain word")
    return value


def _version(data: dict, key: str) -> str:
    value = _word(data, key)
    if not versions.PATTERN.fullmatch(value):
        raise ManifestError(f"field {key!r} is not a version")
    return value


def _file(data: object, name: str) -> FileEntry:
    if not isinstance(data, dict):
        raise ManifestError(f"files[{name!r}] is missing")
    size, sha = data.get("size"), data.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ManifestError(f"files[{name!r}].size is not a positive integer")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise ManifestError(f"files[{name!r}].sha256 is not a sha256")
    if "chunk_bytes" not in data and "chunk_blake2b" not in data:
        return FileEntry(size=size, sha256=sha)
    step, chunks = data.get("chunk_bytes"), data.get("chunk_blake2b")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 < step <= MAX_CHUNK_BYTES or step % 4096:
        raise ManifestError(f"files[{name!r}].chunk_bytes is not a multiple of 4096 up to {MAX_CHUNK_BYTES}")
    if not isinstance(chunks, list) or len(chunks) != -(-size // step) or \
            not all(isinstance(c, str) and SHA256.fullmatch(c) for c in chunks):
        raise ManifestError(f"files[{name!r}].chunk_blake2b is not one 256-bit digest per chunk")
    return FileEntry(size=size, sha256=sha, chunk_bytes=step, chunks=tuple(chunks))


def _object(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise ManifestError(f"larger than {limit} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError("not a JSON object")
    return data


def parse(raw: bytes) -> Manifest:
    """The manifest's fields, each checked for type and form; raises ManifestError."""
    data = _object(raw, MAX_MANIFEST_BYTES)
    if data.get("format") != 1 or data.get("name") != "maculaos":
        raise ManifestError("not a MaculaOS bundle manifest (format 1)")
    files = data.get("files")
    if not isinstance(files, dict):
        raise ManifestError("field 'files' is not an object")
    return Manifest(profile=_word(data, "profile"), version=_version(data, "version"), arch=_word(data, "arch"),
                    board=_word(data, "board"), min_version=_version(data, "min_version"),
                    files={name: _file(files.get(name), name) for name in PAYLOAD},
                    signing_key_id=_key_id(data))


def key_id(public_text: str) -> str:
    """minisign's key id (as `minisign -V` prints it) of a public key file's text; '' if not one."""
    import base64
    import binascii

    lines = [line for line in public_text.splitlines() if line and not line.startswith("untrusted comment:")]
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (IndexError, binascii.Error):
        return ""
    return raw[2:10][::-1].hex().upper() if len(raw) == 42 and raw[:2] == b"Ed" else ""


def _key_id(data: dict) -> str:
    value = data.get("signing_key_id", "")
    if value != "" and not (isinstance(value, str) and KEY_ID.fullmatch(value)):
        raise ManifestError("field 'signing_key_id' is not a minisign key id")
    return value


def parse_slot_record(raw: bytes) -> SlotRecord:
    data = _object(raw, 4096)
    entry = _file(data, "slot")
    return SlotRecord(version=_version(data, "version"), profile=_word(data, "profile"), size=entry.size,
                      sha256=entry.sha256)


POINTER_FORMAT = 2  # 2: the pointer carries its bundle's manifest digest (format 1 named a folder only)


@dataclass(frozen=True)
class Pointer:
    """A channel pointer (`channels/<channel>/<profile>-<arch>.json` + `.minisig`), signed by `publish`:
    which bundle a channel names (its folder, its version and the sha256 of its signed manifest.json, so no
    other signed bundle can stand in for it), since when, and until when a device may trust it is current."""

    profile: str
    arch: str
    channel: str
    version: str
    bundle: str
    manifest_sha256: str
    published: int
    expires: int

    def to_json(self) -> str:
        return json.dumps({"format": POINTER_FORMAT, "profile": self.profile, "arch": self.arch,
                           "channel": self.channel, "version": self.version, "bundle": self.bundle,
                           "manifest_sha256": self.manifest_sha256, "published": self.published,
                           "expires": self.expires}, sort_keys=True) + "\n"


BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def _epoch(data: dict, key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ManifestError(f"field {key!r} is not a time")
    return value


def parse_pointer(raw: bytes) -> Pointer:
    data = _object(raw, 65536)
    if data.get("format") != POINTER_FORMAT:
        raise ManifestError(f"not a MaculaOS channel pointer of format {POINTER_FORMAT} (one that names its "
                            "bundle's manifest digest): publish it again with this SDK")
    bundle = data.get("bundle")
    if not isinstance(bundle, str) or not BUNDLE_NAME.fullmatch(bundle) or ".." in bundle:
        raise ManifestError("field 'bundle' names no bundle folder")
    digest = data.get("manifest_sha256")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise ManifestError("field 'manifest_sha256' is not a sha256")
    return Pointer(profile=_word(data, "profile"), arch=_word(data, "arch"), channel=_word(data, "channel"),
                   version=_version(data, "version"), bundle=bundle, manifest_sha256=digest,
                   published=_epoch(data, "published"), expires=_epoch(data, "expires"))


def _digests(path: Path, chunk_bytes: int) -> tuple[str, list[str]]:
    """A file's sha256, and the chunk_digest of each chunk_bytes piece (none for chunk_bytes=0)."""
    whole, chunks = hashlib.sha256(), []
    with path.open("rb") as f:
        while piece := f.read(chunk_bytes or 1 << 20):
            whole.update(piece)
            if chunk_bytes:
                chunks.append(chunk_digest(piece))
    return whole.hexdigest(), chunks


def bundle_manifest(folder: Path, profile: str, version: str, arch: str, board: str, min_version: str,
                    signing_key_id: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """The one writer of a bundle's manifest.json, for the payload in `folder`: identity, compatibility, each
    file's size and sha256, and the rootfs's chunk digests (a device checks its read-back on every CPU). What it
    writes is parsed back before it is returned: a bad field fails the build, not the device."""
    files: dict[str, dict[str, object]] = {}
    for name in PAYLOAD:
        step = chunk_bytes if name == "rootfs.squashfs" else 0
        sha, chunks = _digests(folder / name, step)
        files[name] = {"size": (folder / name).stat().st_size, "sha256": sha}
        if step:
            files[name].update(chunk_bytes=step, chunk_blake2b=chunks)
    text = json.dumps({"format": 1, "name": "maculaos", "profile": profile, "version": version, "arch": arch,
                       "board": board, "min_version": min_version, "signing_key_id": signing_key_id,
                       "files": files}, sort_keys=True) + "\n"
    if not KEY_ID.fullmatch(signing_key_id):
        raise ManifestError(f"signing key id {signing_key_id!r} is not minisign's 16 hex digits")
    parse(text.encode())
    return text


def slot_record_of(squashfs: Path, version: str, profile: str) -> SlotRecord:
    """The record of a slot holding `squashfs` (an image stage's slot A, before any device read it back)."""
    sha, _ = _digests(squashfs, 0)
    record = SlotRecord(version=version, profile=profile, size=squashfs.stat().st_size, sha256=sha)
    return parse_slot_record(record.to_json().encode())


def main(argv: list[str]) -> int:
    """For the image stages: `bundle FOLDER PROFILE VERSION ARCH BOARD MIN_VERSION KEY_ID CHUNK_BYTES` prints a
    bundle manifest, `slot-record SQUASHFS VERSION PROFILE` a slot record; a bad field exits 2."""
    try:
        if argv[:1] == ["bundle"] and len(argv) == 9:
            folder, profile, version, arch, board, min_version, key_id, chunk = argv[1:9]
            print(bundle_manifest(Path(folder), profile, version, arch, board, min_version, key_id, int(chunk)), end="")
        elif argv[:1] == ["slot-record"] and len(argv) == 4:
            print(slot_record_of(Path(argv[1]), argv[2], argv[3]).to_json(), end="")
        else:
            print(main.__doc__, file=sys.stderr)
            return 2
    except (ManifestError, ValueError, OSError) as exc:
        print(f"maculaos_device.manifest: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
