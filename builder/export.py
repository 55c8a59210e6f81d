"""Phase 4: copy each stage's exports out of its image into the output folder, unless the last export is still
intact; checksum, sign and convert them; check their size. A new output is a stage with `exports:` (its
stage.yaml); what is done to a freshly exported artifact of a new kind is one entry in FINISHERS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import keys, ui
from .arch import Architecture
from .artifacts import file_sha256
from .boards import Board
from .errors import BuildFailed
from .render import RenderedStage
from .state import Build


def export_artifacts(build: Build) -> None:
    """Fill `build.exported` (manifest entries) and `build.result.artifacts` (name -> path); tag the stage images
    that are outputs themselves (oci)."""
    previous = build.previous.get("artifacts", {})
    for r in build.rendered:
        if r.meta.tag:
            build.exported.update(tag_image(build, r))
        for src, pattern in sorted(r.meta.exports.items()):
            dest = build.out / pattern.format(basename=build.plan.basename).rstrip("/")
            old = previous.get(dest.name, {})
            if old.get("stage_id") == r.stage_id and _intact(dest, old):
                build.exported.update({k: v for k, v in previous.items()
                                       if k == dest.name or v.get("derived_from") == dest.name})
                build.result.artifacts[dest.name] = dest
                continue
            with ui.step(f"export {dest}"):
                if src.endswith("/"):
                    build.engine.export_tree(r.image, f"/out/{src}", dest)
                else:
                    build.engine.export(r.image, f"/out/{src}", dest)
            build.exported.update(finish_artifact(build, dest, r))
            build.result.artifacts[dest.name] = dest
            check_size(dest, build.plan.profile.settings.size.iso_max_mb, build.plan.board, build.plan.arch)


def tag_image(build: Build, r: RenderedStage) -> Entries:
    """A stage image that is an output: tagged as its stage.yaml says (`maculaos-core:0.1.0-amd64`)."""
    profile = build.plan.profile
    assert r.meta.tag is not None, "only stages with a tag: are tagged"
    name = r.meta.tag.format(profile=profile.name, version=profile.version, arch=build.plan.arch.value)
    repo, _, tag = name.partition(":")
    image = build.engine.client.images.get(r.image)
    image.tag(repo, tag)
    ui.info(f"  tagged {name} ({r.image})")
    return {name: {"stage": r.meta.name, "stage_id": r.stage_id, "image_id": image.id}}


def check_size(dest: Path, limit_mb: int, board: Board, arch: Architecture = Architecture.amd64) -> None:
    """size.iso_max_mb, plus what the board's firmware and the arch's kernel are allowed to add."""
    if not (dest.suffix == ".iso" and limit_mb):
        return
    allowed = limit_mb + board.image_extra_mb + arch.image_extra_mb
    if dest.stat().st_size > allowed * 1024 * 1024:
        extra = f" + {board.image_extra_mb} for {board.name}'s firmware" if board.image_extra_mb else ""
        extra += f" + {arch.image_extra_mb} for the {arch} kernel" if arch.image_extra_mb else ""
        raise BuildFailed(f"{dest} is {dest.stat().st_size / 2**20:.0f} MiB, over size.iso_max_mb={limit_mb}{extra}",
                          "prune kernel modules or packages, or raise the limit")


def _intact(dest: Path, recorded: dict[str, Any]) -> bool:
    """True when an exported artifact is still what the manifest says (cheap checks only)."""
    if dest.is_dir():
        return (dest / "manifest.json.minisig").is_file() and recorded.get("size") == size_of(dest)
    return dest.is_file() and dest.stat().st_size == recorded.get("size") and \
        dest.with_name(dest.name + ".sha256").is_file()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _write_sha256(path: Path) -> str:
    digest = file_sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


Entries = dict[str, dict[str, Any]]  # artifact name -> its manifest entry


def _finish_bundle(build: Build, dest: Path, entry: dict[str, Any]) -> Entries:
    """An update bundle (a folder): sign its manifest with the build's key."""
    profile, secret = build.plan.profile, build.secret
    keys.sign(dest / "manifest.json", secret,
              f"maculaos {profile.name} {profile.version} {profile.arch} key:{keys.public_key_path(secret).name}")
    return {dest.name: {**entry, "size": size_of(dest), "sha256": file_sha256(dest / "manifest.json")}}


def _finish_disk(build: Build, dest: Path, entry: dict[str, Any]) -> Entries:
    """A qcow2 disk image: its checksum, and the raw image beside it (for dd to a disk)."""
    entries = _finish_file(build, dest, entry)
    raw = dest.with_suffix(".img")
    if shutil.which("qemu-img") is None:
        raise BuildFailed("qemu-img is not installed", "run `make setup` (apt-get install qemu-utils)")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(dest), str(raw)], check=True)
    entries[raw.name] = {**entry, "derived_from": dest.name, "size": raw.stat().st_size, "sha256": _write_sha256(raw)}
    return entries


def _finish_file(build: Build, dest: Path, entry: dict[str, Any]) -> Entries:
    """Any other file: its size and a .sha256 beside it."""
    return {dest.name: {**entry, "size": dest.stat().st_size, "sha256": _write_sha256(dest)}}


Finisher = Callable[[Build, Path, dict[str, Any]], Entries]
FINISHERS: tuple[tuple[Callable[[Path], bool], Finisher], ...] = (  # the first that matches
    (Path.is_dir, _finish_bundle),
    (lambda p: p.suffix == ".qcow2", _finish_disk),
    (lambda p: True, _finish_file),
)


def finish_artifact(build: Build, dest: Path, r: RenderedStage) -> Entries:
    """Checksums (and signature, raw conversion) for a freshly exported artifact; its manifest entries."""
    finish = next(f for matches, f in FINISHERS if matches(dest))
    return finish(build, dest, {"stage": r.meta.name, "stage_id": r.stage_id})
