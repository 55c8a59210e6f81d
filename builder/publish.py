"""Lay signed update bundles out as an update server serves them, with a pointer per channel.

    DIR/maculaos-<profile>-<version>-<arch>.bundle/     the bundle folder, as build-image wrote it
    DIR/channels/<channel>/<profile>-<arch>.json       the pointer: version, bundle folder, the sha256 of its
                                                       manifest.json, published, expires
    DIR/channels/<channel>/<profile>-<arch>.json.minisig   its signature

A device with `upgrade.url: <where DIR is served>` and `upgrade.channel: <channel>` finds its update with
`maculaos upgrade --check`. The pointer is signed with the bundles' key and expires (default 30 days): a
device refuses an expired pointer, or one older than the last it saw, so whoever controls the network or
the server cannot keep a node on a stale release without it saying so. Re-publish before the expiry
(publishing the same bundles again refreshes the pointer). The server can stay a static file host."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from maculaos_device import manifest as bundle_manifest
from maculaos_device import versions
from maculaos_device.manifest import BUNDLE_FILES

from .errors import BadInput
from .keys import minisign_binary, public_key_path, sign


@dataclass(frozen=True)
class Published:
    bundle: Path
    pointer: Path
    version: str
    manifest_sha256: str


def read_bundle(bundle: Path, public_key: Path | None) -> bundle_manifest.Manifest:
    """The bundle's manifest, after checking its files are all there (and its signature, given a key)."""
    if not bundle.is_dir():
        raise BadInput(f"{bundle}: not a bundle folder", "pass out/maculaos-<profile>-<version>-<arch>.bundle")
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise BadInput(f"{bundle}: incomplete bundle, missing {', '.join(missing)}", "rebuild it with build-image")
    if public_key is not None:
        proc = subprocess.run([minisign_binary(), "-Vqm", str(bundle / "manifest.json"), "-p", str(public_key)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BadInput(f"{bundle}/manifest.json: signature does not verify with {public_key}",
                           "publish bundles signed with the key your devices trust")
    try:  # the device's own parser: what publish accepts, a device accepts
        manifest = bundle_manifest.parse((bundle / "manifest.json").read_bytes())
    except bundle_manifest.ManifestError as exc:
        raise BadInput(f"{bundle}/manifest.json: not a bundle manifest ({exc})",
                       "rebuild it with build-image") from None
    return manifest


VALID_DAYS = 30


def publish(bundles: list[Path], dest: Path, channel: str, public_key: Path | None = None, *,
            signing_key: Path, valid_days: int = VALID_DAYS, now: int | None = None) -> list[Published]:
    """Copy each bundle into `dest`; each channel pointer (one per profile and arch) names the newest version
    among those bundles and the one it named before, so publishing an older bundle never moves it back. The
    pointer on the server is believed only once its signature verifies: publish never re-signs what someone
    else wrote there."""
    if not channel or "/" in channel or channel.startswith("."):
        raise BadInput(f"channel {channel!r} is not a valid name", "use a plain word such as stable or beta")
    public = public_key or public_key_path(signing_key)
    done = []
    for bundle in bundles:
        manifest = read_bundle(bundle, public_key)
        target = _place(bundle, dest)
        pointer = dest / "channels" / channel / f"{manifest.profile}-{manifest.arch}.json"
        done.append(Published(bundle=target, pointer=pointer, version=manifest.version,
                              manifest_sha256=_digest(target / "manifest.json")))
    published = int(time.time()) if now is None else now
    for pointer in sorted({p.pointer for p in done}):
        candidates = [p for p in done if p.pointer == pointer]
        current = _current(pointer, dest, public)
        _point(pointer, candidates + ([current] if current else []), channel, signing_key, published,
               published + valid_days * 86400)
    return done


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _place(bundle: Path, dest: Path) -> Path:
    """`bundle` copied to `dest/<its folder name>` (replaced whole, through a temporary copy); never `dest`
    itself, nor a folder inside the bundle (`publish .` from within a bundle used to remove `dest`)."""
    source = bundle.resolve()
    name = source.name
    if not bundle_manifest.BUNDLE_NAME.fullmatch(name):
        raise BadInput(f"{bundle}: {name!r} is not a bundle folder name", "pass out/maculaos-<profile>-<version>-"
                       "<arch>.bundle by its name, not as `.`")
    root = dest.resolve()
    target = root / name
    if target == source:
        return dest / name
    if root.is_relative_to(source) or source.is_relative_to(target):
        raise BadInput(f"{bundle}: publishing it to {dest} would copy it into itself",
                       "give --to a folder outside the bundle")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return dest / name


def _current(pointer: Path, dest: Path, public: Path) -> Published | None:
    """What the channel names on the server now, once its signature and the bundle it names verify; None when
    there is no pointer yet. A pointer that does not verify is refused, never re-signed."""
    if not pointer.exists():
        return None
    hint = f"check who wrote {pointer}; remove it and publish again once the server is trusted"
    signature = pointer.with_name(pointer.name + ".minisig")
    proc = subprocess.run([minisign_binary(), "-Vqm", str(pointer), "-x", str(signature), "-p", str(public)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BadInput(f"{pointer}: the channel pointer on the server does not verify with {public}", hint)
    try:
        body = json.loads(pointer.read_bytes())
        version, name = body["version"], body["bundle"]
        bundle = dest / name
        if not (isinstance(name, str) and bundle_manifest.BUNDLE_NAME.fullmatch(name)):
            raise ValueError(name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{pointer}: the channel pointer on the server is not one publish wrote ({exc})", hint) from None
    manifest = read_bundle(bundle, public)
    if manifest.version != version:
        raise BadInput(f"{pointer}: names {version}, but {bundle} holds {manifest.version}", hint)
    return Published(bundle=bundle, pointer=pointer, version=version, manifest_sha256=_digest(bundle / "manifest.json"))


def _point(pointer: Path, candidates: list[Published], channel: str, secret: Path, published: int,
           expires: int) -> None:
    """Replace `pointer` (and its signature) with the newest of `candidates`."""
    best = {p.version: p for p in candidates}
    newest = best[versions.newest(sorted(best))]
    profile, arch = pointer.stem.rsplit("-", 1)
    body = bundle_manifest.Pointer(profile=profile, arch=arch, channel=channel, version=newest.version,
                                   bundle=newest.bundle.name, manifest_sha256=newest.manifest_sha256,
                                   published=published, expires=expires)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.tmp")
    tmp.write_text(body.to_json())
    sign(tmp, secret, f"maculaos channel {channel} {profile}-{arch} {newest.version}")
    # the signature first: a device reading between the two renames sees a mismatch and retries later
    os.replace(tmp.with_name(tmp.name + ".minisig"), pointer.with_name(pointer.name + ".minisig"))
    os.replace(tmp, pointer)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def serve(folder: Path, handler: type[QuietHandler] = QuietHandler) -> http.server.ThreadingHTTPServer:
    """Serve `folder` (an update server's layout, a bundle) over HTTP on 127.0.0.1, on a free port, in a thread:
    what the QEMU tests and the benches update guests from (QEMU's user network shows it as 10.0.2.2).
    `server.server_address[1]` is the port; `server.shutdown()` stops it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
