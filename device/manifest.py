"""The signed bundle manifest (`manifest.json`) and the per-slot record (`<esp>/<slot>/slot.json`).

A bundle's manifest is written by `stages/80-bundle/mkmanifest.sh` and signed with minisign; the device
parses it here, after the signature checked out, and never evaluates any of it. Every field must have the
expected type and form, or the whole manifest is refused. A slot record is written on the ESP once a
slot has been read back and matched its signed sha256; a slot without one holds nothing bootable."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

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
    """The digest the manifest's `chunk_blake2b` list holds for one chunk (`b2sum -l 256` in mkmanifest.sh)."""
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
