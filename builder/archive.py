"""What pins a build to the Debian archive, as the manifest records it, and whether the archive moved.

Stage ids hash the build's own inputs, not the archive: two builds of one plan install whatever versions the
archive serves on the day. The rootfs stage records both what apt read and what it installed:
`/usr/share/maculaos/archive.txt` (each signed InRelease apt used: its sha256, which pins every Packages file it
lists, and its Date) and `packages.tsv` (every installed package's version). A rootfs rebuilt with the same id as
in the previous manifest but different versions means the archive moved in between: the build says so.
"""

from __future__ import annotations

from typing import Any

from . import licences
from .engine import Engine, read_text_from_image

RECORD = "/usr/share/maculaos/archive.txt"
PACKAGES = "/usr/share/maculaos/packages.tsv"
DOCS = "/usr/share/doc"  # only the copyright files are kept there (bootstrap.NODOC)


def parse_record(text: str) -> dict[str, dict[str, str]]:
    """`sha256sum` lines (`<hash>  <file>`) and `grep -H` lines (`<file>:Date: <date>`), per InRelease file."""
    found: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if ":Date: " in line:
            name, date = line.split(":Date: ", 1)
            found.setdefault(name.strip().removeprefix("./"), {})["date"] = date.strip()
        elif len(parts := line.split()) == 2 and len(parts[0]) == 64:
            found.setdefault(parts[1].lstrip("*").removeprefix("./"), {})["sha256"] = parts[0]
    return found


def parse_packages(text: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)


def rootfs_pins(engine: Engine, image: str | None, unchanged: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """`packages`, `archive` and `licences` for the manifest: the previous manifest's when the rootfs image is
    `unchanged` since it (the same image, reused from the cache) and it has them, else read from the image."""
    if image is None:
        return {"packages": {}, "archive": {}, "licences": {}}
    if unchanged and previous.get("packages") and "archive" in previous and "licences" in previous:
        return {key: previous[key] for key in ("packages", "archive", "licences")}
    try:
        archive = parse_record(read_text_from_image(engine, image, RECORD))
    except Exception:  # a rootfs built before the record existed
        archive = {}
    with engine.archive(image, DOCS) as tar:
        stated = licences.from_doc_tree(tar)
    return {"packages": parse_packages(read_text_from_image(engine, image, PACKAGES)), "archive": archive,
            "licences": stated}


def moved(previous: dict[str, Any], current: dict[str, Any], limit: int = 5) -> str | None:
    """One line when the rootfs was built from the same inputs as last time but installed other versions."""
    def rootfs_id(record: dict[str, Any]) -> str | None:
        return record.get("stages", {}).get("rootfs", {}).get("id")

    same_id = rootfs_id(previous) == rootfs_id(current)
    old, new = previous.get("packages") or {}, current.get("packages") or {}
    if not same_id or not old or old == new:
        return None
    changed = [n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
    shown = ", ".join(f"{n} {old.get(n, '-')} -> {new.get(n, '-')}" for n in changed[:limit])
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    dates = sorted({v.get("date", "") for v in (current.get("archive") or {}).values()} - {""})
    served = f" (the archive now serves InRelease dated {dates[-1]})" if dates else ""
    return (f"the Debian archive moved since this image's last build from the same inputs{served}: "
            f"{len(changed)} package version(s) differ: {shown}{more}; the image is not bit-identical to that one")
