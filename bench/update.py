#!/usr/bin/env python3
"""Benchmark: `maculaos upgrade --apply` vs. a raw copy of the same squashfs into the standby slot.

Boots the test profile's A/B disk image under QEMU, serves the 0.2.0 bundle over HTTP from the host and
times, inside the guest: (1) curl of rootfs.squashfs straight into the rootfs-B partition, (2) the full
apply (signature, checks, streamed direct-I/O write, read-back sha256 while the kernel and initrd
are fetched, env).
Needs `make test` (or the test fixtures) to have built out/maculaos-test-0.1.0-amd64.qcow2 and
out/update/maculaos-test-0.2.0-amd64.bundle. Usage: python bench/update.py [--runs 3] [--compare-with REV]:
with a git revision, each run also applies with that revision's on-device code (device/, fetched into the
guest and put first on the path), so two versions of the updater are timed in the same guest.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maculaos_sdk.machine import cow_disk  # noqa: E402
from maculaos_sdk.node_machine import MaculaMachine  # noqa: E402
from maculaos_sdk.publish import serve  # noqa: E402
from maculaos_sdk.vm import VmConfig  # noqa: E402

DISK = ROOT / "out" / "maculaos-test-0.1.0-amd64.qcow2"
BUNDLE = ROOT / "out" / "update" / "maculaos-test-0.2.0-amd64.bundle"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare-with", metavar="REV", help="also time the apply of this git revision's device code")
    args = ap.parse_args()
    for path in (DISK, BUNDLE):
        if not path.exists():
            print(f"missing {path}: run `make test` first", file=sys.stderr)
            return 2
    served = Path(tempfile.mkdtemp())
    (served / BUNDLE.name).symlink_to(BUNDLE.resolve())
    if args.compare_with:  # that revision's device/ as a maculaos_device package
        tar = subprocess.run(["git", "archive", "--prefix=maculaos_device/", f"{args.compare_with}:device"],
                             cwd=ROOT, check=True, capture_output=True).stdout
        (served / "device.tar").write_bytes(tar)
    server = serve(served)
    base = f"http://10.0.2.2:{server.server_address[1]}"
    url = f"{base}/{BUNDLE.name}"
    other = ("python3 -I -c 'import sys; sys.path.insert(0, \"/tmp/rev\"); from maculaos_device.cli import main; "
             "sys.exit(main())'")
    raw, apply, apply_rev = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        disk = cow_disk(DISK, Path(tmp) / "bench-amd64.qcow2")
        m = MaculaMachine("bench-update", VmConfig.for_image(disk), Path(tmp))
        m.start()
        try:
            m.wait_for_boot()
            m.wait_for_network()
            dev = "$(d=$(grep -l PARTNAME=rootfs-B /sys/class/block/*/uevent); d=${d%/uevent}; echo /dev/${d##*/})"
            if args.compare_with:
                m.succeed(f"mkdir -p /tmp/rev && curl -fsS {base}/device.tar | tar -x -C /tmp/rev")
            for _ in range(args.runs):
                out = m.succeed(f"s=$(date +%s.%N); curl -fsS {url}/rootfs.squashfs > {dev}; sync; "
                                "e=$(date +%s.%N); awk \"BEGIN{print $e-$s}\"",
                                timeout=600)
                raw.append(float(out.strip().splitlines()[-1]))
                out = m.succeed(f"s=$(date +%s.%N); maculaos upgrade --apply {url} --no-reboot >/dev/null 2>&1 "
                                "|| echo FAILED; e=$(date +%s.%N); awk \"BEGIN{print $e-$s}\"",
                                timeout=600)
                if out.startswith("FAILED"):
                    print(f"the apply failed:\n{out}", file=sys.stderr)
                    return 1
                apply.append(float(out.strip().splitlines()[0]))
                # drop the pending trial (same length; '#' is no valid slot) so the next apply is allowed
                env = "/run/maculaos/esp/grub/grubenv"
                m.succeed(f"sed -i 's/^trial=B$/trial=#/' {env} {env}.bak")
                if args.compare_with:
                    out = m.succeed(f"s=$(date +%s.%N); {other} upgrade --apply {url} --no-reboot >/dev/null 2>&1 "
                                    "|| echo FAILED; e=$(date +%s.%N); awk \"BEGIN{print $e-$s}\"", timeout=600)
                    if out.startswith("FAILED"):
                        print(f"the apply of {args.compare_with} failed:\n{out}", file=sys.stderr)
                        return 1
                    apply_rev.append(float(out.strip().splitlines()[0]))
                    m.succeed(f"sed -i 's/^trial=B$/trial=#/' {env} {env}.bak")
        finally:
            m.close()
            server.shutdown()
            shutil.rmtree(served, ignore_errors=True)
    size_mb = (BUNDLE / "rootfs.squashfs").stat().st_size / 1e6
    r, a = statistics.median(raw), statistics.median(apply)
    print(f"{'squashfs size (MB)':<34} {size_mb:.1f}")
    print(f"{'raw copy into slot, TCG (s)':<34} {r:.2f}  (runs: {', '.join(f'{x:.2f}' for x in raw)})")
    print(f"{'upgrade --apply, TCG (s)':<34} {a:.2f}  (runs: {', '.join(f'{x:.2f}' for x in apply)})")
    print(f"{'apply / raw copy':<34} {a / r:.2f}x")
    if apply_rev:
        o = statistics.median(apply_rev)
        print(f"{'upgrade --apply of ' + args.compare_with[:12] + ' (s)':<34} {o:.2f}  (runs: "
              + ", ".join(f"{x:.2f}" for x in apply_rev) + f"), {o / r:.2f}x the raw copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
