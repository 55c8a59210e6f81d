#!/usr/bin/env python3
"""Reproducibility: two `--no-cache` builds of one profile, compared byte for byte.

Builds the profile twice from nothing (the bootstrap tarball cache dropped before each), each into its own
output folder, and prints per artifact whether the two are identical (sha256). When one differs, it says why
as far as it can: the Debian archive moved between the builds (the manifests' package versions differ), or
the first differing path inside the root filesystem (both squashfs unpacked in the tools image and their
listings and file hashes compared). Usage: python bench/repro.py [--profile core] [--arch amd64|arm64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maculaos_sdk.paths import cache_dir  # noqa: E402

CLI = [str(ROOT / ".venv/bin/maculaos-sdk")]
# In the tools image: the squashfs out of an ISO (or a plain squashfs), unpacked, then one line per path with
# its type, mode, owner, size and content hash, sorted: two such listings diff to the first differing file.
LISTING = r"""
set -eu
for side in a b; do
  src=$(ls /w/$side/*.iso 2>/dev/null | head -n1)
  if [ -n "$src" ]; then  # every file of the ISO, hashed, and its squashfs
    xorriso -osirrox on -indev "$src" -extract / /w/$side.iso.d >/dev/null 2>&1
    (cd /w/$side.iso.d && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > /w/$side.isosums)
    cp /w/$side.iso.d/maculaos/rootfs.squashfs /w/$side.sq
  fi
  unsquashfs -q -n -d /w/$side.root /w/$side.sq >/dev/null
  (cd /w/$side.root && find . -printf '%y %m %u:%g %s %p\n' | LC_ALL=C sort > /w/$side.list \
    && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > /w/$side.sums)
done
"""


def build(profile: str, arch: str, out: Path) -> dict:
    shutil.rmtree(cache_dir() / "bootstrap", ignore_errors=True)
    subprocess.run(CLI + ["build-image", "-p", profile, "--arch", arch, "--no-cache", "-o", str(out)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(next(out.glob("*.manifest.json")).read_text())


def sha256(path: Path) -> str:
    if path.is_dir():  # an update bundle: its signed manifest names every file's hash
        path = path / "manifest.json"
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_difference(a: list[str], b: list[str]) -> str | None:
    """The first line (path order) where two sorted listings disagree, as `a: ... / b: ...`."""
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"first: {x}\n  second: {y}"
    if len(a) != len(b):
        return f"one build has {abs(len(a) - len(b))} more paths"
    return None


def explain_rootfs(tmp: Path, tools_image: str) -> str:
    subprocess.run(["docker", "run", "--rm", "-v", f"{tmp}:/w", tools_image, "sh", "-c", LISTING], check=True)
    if (tmp / "a.isosums").exists():
        sums = [dict(reversed(line.split(maxsplit=1)) for line in (tmp / f"{side}.isosums").read_text().splitlines())
                for side in "ab"]
        differ = sorted(p for p in sums[0].keys() | sums[1].keys() if sums[0].get(p) != sums[1].get(p))
        print(f"{'files differing inside the ISO':<40} {', '.join(differ) or 'none'}")
    for name in ("list", "sums"):
        diff = first_difference((tmp / f"a.{name}").read_text().splitlines(),
                                (tmp / f"b.{name}").read_text().splitlines())
        if diff:
            return f"root filesystem {'entries' if name == 'list' else 'contents'} differ, {diff}"
    return "the root filesystems hold the same files: the difference is in how they were packed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="core")
    ap.add_argument("--arch", default="amd64", choices=["amd64", "arm64"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "out") as tmp_name:
        tmp = Path(tmp_name)
        first, second = build(args.profile, args.arch, tmp / "a"), build(args.profile, args.arch, tmp / "b")
        same_ids = {k: v["id"] for k, v in first["stages"].items()} == {k: v["id"] for k, v in second["stages"].items()}
        print(f"{'stage ids':<40} {'equal' if same_ids else 'different'}")
        differing = []
        for name in sorted(first["artifacts"]):
            equal = sha256(tmp / "a" / name) == sha256(tmp / "b" / name)
            print(f"{name:<40} {'identical' if equal else 'DIFFERENT'}")
            differing += [] if equal else [name]
        print(f"{'reproducible':<40} {'yes' if not differing else 'no'}")
        if not differing:
            return 0
        if first["packages"] != second["packages"]:
            moved = sorted(set(first["packages"].items()) ^ set(second["packages"].items()))[:6]
            print(f"the Debian archive moved between the two builds: {moved}")
            return 1
        print(explain_rootfs(tmp, first["stages"]["tools"]["image"]))
        return 1


if __name__ == "__main__":
    sys.exit(main())
