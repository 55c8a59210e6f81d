"""Lay signed update bundles out as an update server serves them, with a pointer per channel.

    DIR/maculaos-<profile>-<version>-<arch>.bundle/     the bundle folder, as build-image wrote it
    DIR/channels/<channel>/<profile>-<arch>.json       the pointer: version, bundle folder, published, expires
    DIR/channels/<channel>/<profile>-<arch>.json.minisig   its signature

A device with `upgrade.url: <where DIR is served>` and `upgrade.channel: <channel>` finds its update with
`maculaos upgrade --check`. The pointer is signed with the bundles' key and expires (default 30 days): a
device refuses an expired pointer, or one older than the last it saw, so whoever controls the network or
the server cannot keep a node on a stale release without it saying so. Re-publish before the expiry
(publishing the same bundles again refreshes the pointer). The server can stay a static file host."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from maculaos_device import manifest as bundle_manifest
from maculaos_device import versions
from maculaos_device.manifest import BUNDLE_FILES

from .errors import BadInput
from .keys import minisign_binary, sign


@dataclass(frozen=True)
class Published:
    bundle: Path
    pointer: Path
    version: str


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
    among those bundles and the one it named before, so publishing an older bundle never moves it back."""
    if not channel or "/" in channel or channel.startswith("."):
        raise BadInput(f"channel {channel!r} is not a valid name", "use a plain word such as stable or beta")
    done = []
    for bundle in bundles:
        manifest = read_bundle(bundle, public_key)
        target = dest / bundle.name
        if target.resolve() != bundle.resolve():
            tmp = dest / f".{bundle.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        pointer = dest / "channels" / channel / f"{manifest.profile}-{manifest.arch}.json"
        done.append(Published(bundle=target, pointer=pointer, version=manifest.version))
    published = int(time.time()) if now is None else now
    for pointer in sorted({p.pointer for p in done}):
        candidates = [p for p in done if p.pointer == pointer]
        _point(pointer, candidates, channel, signing_key, published, published + valid_days * 86400)
    return done


def _point(pointer: Path, candidates: list[Published], channel: str, secret: Path, published: int,
           expires: int) -> None:
    """Replace `pointer` (and its signature) with the newest of `candidates` and what it names now."""
    best = {p.version: p.bundle.name for p in candidates}
    try:
        current = bundle_manifest.parse_pointer(pointer.read_bytes())
        best.setdefault(current.version, current.bundle)
    except (OSError, bundle_manifest.ManifestError):
        pass
    newest = versions.newest(sorted(best))
    profile, arch = pointer.stem.rsplit("-", 1)
    body = bundle_manifest.Pointer(profile=profile, arch=arch, channel=channel, version=newest, bundle=best[newest],
                                   published=published, expires=expires)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.tmp")
    tmp.write_text(body.to_json())
    sign(tmp, secret, f"maculaos channel {channel} {profile}-{arch} {newest}")
    # the signature first: a device reading between the two renames sees a mismatch and retries later
    os.replace(tmp.with_name(tmp.name + ".minisig"), pointer.with_name(pointer.name + ".minisig"))
    os.replace(tmp, pointer)
