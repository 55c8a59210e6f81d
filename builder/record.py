"""Phase 5: the build's record (the manifest: what was built from what, and how long it took), and keeping the
engine's stage images within the cache limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from . import __version__, archive, gc, keys, ui
from .engine import Engine, read_text_from_image
from .state import Build, StageResult


def previous_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def manifest(build: Build) -> dict[str, Any]:
    plan, result, inputs, previous = build.plan, build.result, build.inputs, build.previous
    profile = plan.profile
    by_key = {s.stage.key: s for s in result.stages}
    rootfs = by_key.get("rootfs")
    return {
        "profile": profile.name,
        "version": profile.version,
        "arch": plan.arch.value,
        "board": plan.board.name,
        "outputs": list(plan.outputs),
        "source_date_epoch": plan.sde,
        "signing_key_id": keys.key_id(inputs.public_key),
        "sdk_version": __version__,
        "profile_files": [str(p) for p in profile.files],
        "stages": {s.stage.key: {"id": s.stage.stage_id, "image": s.stage.image, "cached": s.cached,
                                 "pulled": s.pulled, "seconds": round(s.seconds, 1)} for s in result.stages},
        "artifacts": build.exported,
        "pinned_artifacts": {dest: {"sha256": path.name} for dest, path in sorted(inputs.pinned.items())},
        "images": inputs.image_records,
        "kernel": _kernel_info(build.engine, by_key.get("kernel"), previous),
        **archive.rootfs_pins(build.engine, rootfs.stage.image if rootfs else None, _unchanged(rootfs, previous),
                              previous),
        "build_seconds": round(build.seconds(), 1),
    }


def write_manifest(build: Build) -> dict[str, Any]:
    """`<basename>.manifest.json`, and `manifest.json` for the output folder's latest build; the record."""
    record = manifest(build)
    if note := archive.moved(build.previous, record):
        ui.info(f"[yellow]note:[/] {escape(note)}")
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    build.manifest_path.write_text(text)
    (build.out / "manifest.json").write_text(text)
    return record


def trim_cache(engine: Engine, keep: set[str]) -> None:
    """Keep the engine's stage images within the cache limit (never the ones this plan uses). Housekeeping:
    an engine error here (another build removing images meanwhile) is said, never fails the finished build."""
    limit = gc.cache_max()
    try:
        done = gc.collect(engine.client, keep, limit, dangling_older_than="6h")
    except Exception as err:  # docker.errors.APIError and the like; the SDK's import stays lazy
        ui.info(f"  cache: not trimmed this time ({str(err).splitlines()[0][:200]}); `maculaos-sdk gc` does it")
        return
    what = [f"{len(done.removed)} stage image(s) no recent build used"] if done.removed else []
    what += ["untagged images killed builds left"] if done.dangling_bytes else []
    if what:
        ui.info(f"  cache: removed {' and '.join(what)}, {gc.human(done.freed)} freed; {gc.human(done.kept_bytes)} "
                f"kept (limit {gc.human(limit)}: MACULAOS_SDK_CACHE_MAX)")
    if done.prune_refused:
        ui.info(f"  cache: the engine refused to prune untagged images ({done.prune_refused}); "
                "`maculaos-sdk gc` tries again")


def _unchanged(s: StageResult | None, previous: dict[str, Any]) -> bool:
    """True when the stage's image is the one the previous manifest recorded, reused from the cache: what was read
    from it then still holds. A rebuild with the same id (--no-cache) may have installed other versions."""
    return s is not None and s.cached and previous.get("stages", {}).get(s.stage.key, {}).get("id") == s.stage.stage_id


def _kernel_info(engine: Engine, s: StageResult | None, previous: dict[str, Any]) -> dict[str, str]:
    if s is None:
        return {}
    if _unchanged(s, previous) and previous.get("kernel"):
        return previous["kernel"]
    package, version = read_text_from_image(engine, s.stage.image, "/out/kernel-package.tsv").split()[:2]
    release = read_text_from_image(engine, s.stage.image, "/out/kernel-version").strip()
    return {"package": package, "version": version, "release": release}
