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

from .errors import BadInput
from .keys import minisign_binary

BUNDLE_FILES = ("manifest.json", "manifest.json.minisig", "rootfs.squashfs", "vmlinuz", "initrd.img")


@dataclass(frozen=True)
class Published:
    bundle: Path
    pointer: Path
    version: str


def read_bundle(bundle: Path, public_key: Path | None) -> dict:
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
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
        for key in ("profile", "version", "arch"):
            if not isinstance(manifest.get(key), str):
                raise ValueError(key)
    except (ValueError, OSError) as exc:
        raise BadInput(f"{bundle}/manifest.json: not a bundle manifest ({exc})", "rebuild it with build-image") from exc
    return manifest


def publish(bundles: list[Path], dest: Path, channel: str, public_key: Path | None = None) -> list[Published]:
    """Copy each bundle into `dest` and point `channel` at it (the pointer is replaced atomically)."""
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
        pointer = dest / "channels" / channel / f"{manifest['profile']}-{manifest['arch']}.json"
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp_pointer = pointer.with_suffix(".json.tmp")
        tmp_pointer.write_text(json.dumps({"version": manifest["version"], "bundle": bundle.name}) + "\n")
        os.replace(tmp_pointer, pointer)
        done.append(Published(bundle=target, pointer=pointer, version=manifest["version"]))
    return done
