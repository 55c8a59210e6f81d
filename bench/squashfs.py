#!/usr/bin/env python3
"""Benchmark: the squashfs compressor, measured on a profile's real root filesystem.

For each compressor setting, packs the rootfs stage image's tree with the tools stage's mksquashfs (the
command the squashfs stage runs) and prints the seconds to pack, the size, and the seconds to read every
file back (unsquashfs into a tmpfs: what reading the image costs, as the kernel does at boot).
Usage: python bench/squashfs.py [--profile core] [--arch amd64]; the profile must have been built (its
stage images are found through its manifest in out/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SETTINGS = [("xz", "-b 1M"), ("zstd", "-b 256K -Xcompression-level 15"), ("zstd", "-b 256K -Xcompression-level 9"),
            ("zstd", "-b 1M -Xcompression-level 9"), ("zstd", "-b 1M -Xcompression-level 10"),
            ("zstd", "-b 1M -Xcompression-level 12"), ("zstd", "-b 1M -Xcompression-level 15")]
SCRIPT = """set -e
cd /work
env -u SOURCE_DATE_EPOCH mksquashfs /rootfs /work/fs.img -noappend -no-progress -quiet -comp {comp} {opts} \\
  -mkfs-time 0 -all-time 0 >/dev/null
t1=$(date +%s.%N)
size=$(stat -c %s /work/fs.img)
unsquashfs -q -n -d /work/x /work/fs.img >/dev/null
t2=$(date +%s.%N)
rm -rf /work/x /work/fs.img
echo "$size $(awk "BEGIN {{print $t2 - $t1}}")"
"""


def stage_image(profile: str, arch: str, key: str) -> str:
    """The stage image the profile's last build used, from its manifest in out/."""
    manifests = sorted((ROOT / "out").glob(f"maculaos-{profile}-*-{arch}.manifest.json"),
                       key=lambda p: p.stat().st_mtime)
    if not manifests:
        sys.exit(f"no out/maculaos-{profile}-*-{arch}.manifest.json: build the profile first")
    return json.loads(manifests[-1].read_text())["stages"][key]["image"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="core")
    ap.add_argument("--arch", default="amd64")
    args = ap.parse_args()
    rootfs, tools = (stage_image(args.profile, args.arch, key) for key in ("rootfs", "tools"))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        tree = Path(tmp) / "rootfs"
        tree.mkdir()
        container = subprocess.run(["docker", "create", rootfs, "/bin/true"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        try:
            export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(tree), "--exclude=proc/*", "--exclude=sys/*", "--exclude=dev/*"],
                           stdin=export.stdout, check=True)
            export.wait()
        finally:
            subprocess.run(["docker", "rm", container], capture_output=True)
        print(f"rootfs of {args.profile} ({args.arch}); compressor, seconds to pack, MiB, seconds to read back")
        for comp, opts in SETTINGS:
            script = SCRIPT.format(comp=comp, opts=opts)
            timed = f"s=$(date +%s.%N); out=$({script}); e=$(date +%s.%N); echo $out $(awk \"BEGIN {{print $e - $s}}\")"
            cmd = ["docker", "run", "--rm", "-v", f"{tree}:/rootfs:ro", "--tmpfs", "/work:size=3g", tools,
                   "sh", "-c", timed]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{comp} {opts}: failed: {out.stderr.strip()[-300:]}")
                continue
            size, read, total = out.stdout.split()
            pack = float(total) - float(read)
            print(f"{comp:5} {opts or 'default':30} pack {pack:6.1f} s  {int(size) / 2**20:6.1f} MiB  "
                  f"read {float(read):5.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
