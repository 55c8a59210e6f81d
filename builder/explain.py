"""Why did a stage rebuild? Each build records what every stage id was hashed from (the rendered context
file by file, the parent stage ids, arch, source date); `build-image --explain` compares a stage about to
be built with what the same profile's stage was built from last time on this cache and says what changed.

Records live in the cache folder, keyed by stage id (`explain/<id>.json`), with a pointer per output
basename and stage (`explain/last/<basename>/<stage>`) to the id last built or reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .paths import cache_dir
from .render import RenderedStage

SHOWN = 6  # changed files named per stage; the rest are counted


def _folder() -> Path:
    return cache_dir() / "explain"


def _pointer(basename: str, key: str) -> Path:
    return _folder() / "last" / basename / key


def remember(basename: str, stages: list[RenderedStage]) -> None:
    """Record each stage's id inputs and make it the last one this output used (best effort)."""
    try:
        for r in stages:
            record = _folder() / f"{r.stage_id}.json"
            if not record.exists():
                record.parent.mkdir(parents=True, exist_ok=True)
                tmp = record.with_suffix(".tmp")
                tmp.write_text(json.dumps(r.id_inputs, sort_keys=True))
                tmp.replace(record)
            pointer = _pointer(basename, r.key)
            pointer.parent.mkdir(parents=True, exist_ok=True)
            pointer.write_text(r.stage_id + "\n")
    except OSError:
        pass


def _previous(basename: str, key: str) -> tuple[str, dict[str, Any]] | None:
    try:
        old_id = _pointer(basename, key).read_text().strip()
        return old_id, json.loads((_folder() / f"{old_id}.json").read_text())
    except (OSError, ValueError):
        return None


def _files_changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """`path changed|added|removed|mode 644->755`, files before folders, sorted."""
    found = []
    for rel in sorted(old.keys() | new.keys()):
        before, after = old.get(rel), new.get(rel)
        if before == after:
            continue
        if before is None:
            found.append(f"{rel} added")
        elif after is None:
            found.append(f"{rel} removed")
        elif before.split(" ")[0] == after.split(" ")[0] == "F" and before.split(" ")[2] == after.split(" ")[2]:
            found.append(f"{rel} mode {before.split(' ')[1]}->{after.split(' ')[1]}")
        elif not after.startswith("D "):
            found.append(f"{rel} changed")
    return found


def why(basename: str, r: RenderedStage, no_cache: bool = False) -> str:
    """One line: why stage `r` is built instead of reused."""
    if no_cache:
        return "--no-cache"
    prev = _previous(basename, r.key)
    if prev is None:
        return f"never built for {basename} on this cache"
    old_id, old = prev
    if old_id == r.stage_id:
        return "built before with these inputs, but its image is gone (gc, docker rmi or another engine)"
    reasons = [f"{k} {old.get(k)} -> {r.id_inputs.get(k)}" for k in ("schema", "arch", "sde")
               if old.get(k) != r.id_inputs.get(k)]
    old_inputs, new_inputs = old.get("inputs", {}), r.id_inputs.get("inputs", {})
    reasons += [f"input stage {n} changed" for n in sorted(new_inputs) if old_inputs.get(n) != new_inputs[n]]
    files = _files_changed(old.get("files", {}), r.id_inputs.get("files", {}))
    reasons += files[:SHOWN] + ([f"and {len(files) - SHOWN} more file(s)"] if len(files) > SHOWN else [])
    return "; ".join(reasons) or "its inputs hash differently (an older SDK's record)"
