"""Lay signed update bundles out as an update server serves them, with a pointer per channel.

    DIR/maculaos-<profile>-<version>-<arch>.bundle/     the bundle folder, as build-image wrote it
    DIR/channels/<channel>/<profile>-<arch>.json       {"version": ..., "bundle": "<folder name>"}

A device with `upgrade.url: <where DIR is served>` and `upgrade.channel: <channel>` finds its update with
`maculaos upgrade --check`. The pointer is not trusted: the bundle's signed manifest is what the device
checks, so a server can be a plain static file host (or a USB stick)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from maculaos_device import manifest as bundle_manifest
from maculaos_device import versions
from maculaos_device.manifest import BUNDLE_FILES

from .errors import BadInput
from .keys import minisign_binary


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


def publish(bundles: list[Path], dest: Path, channel: str, public_key: Path | None = None) -> list[Published]:
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
    for pointer in sorted({p.pointer for p in done}):
        _point(pointer, [p for p in done if p.pointer == pointer])
    return done


def _point(pointer: Path, candidates: list[Published]) -> None:
    """Replace `pointer` atomically with the newest of `candidates` and what it names now."""
    best = {p.version: p.bundle.name for p in candidates}
    try:
        current = json.loads(pointer.read_text())
        if versions.PATTERN.fullmatch(current["version"]):
            best.setdefault(current["version"], current["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    newest = versions.newest(sorted(best))
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp_pointer = pointer.with_suffix(".json.tmp")
    tmp_pointer.write_text(json.dumps({"version": newest, "bundle": best[newest]}) + "\n")
    os.replace(tmp_pointer, pointer)
