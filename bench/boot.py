#!/usr/bin/env python3
"""Where a TCG boot to the login prompt goes: seconds from QEMU's start to each milestone on the serial
console, medians over N boots, and the phase between each milestone and the one before.

Milestones (those an image never prints are left out): the GRUB menu drawn, the initrd's /init running,
sysvinit started on the real root, OpenRC done with sysinit and boot (runlevel 3 entered), the login prompt.
Usage: python bench/boot.py [IMAGE] [--boots 3]; IMAGE defaults to out/maculaos-core-0.1.0-amd64.iso
(`make image`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maculaos_sdk.machine import Machine, MachineError  # noqa: E402
from maculaos_sdk.vm import VmConfig  # noqa: E402

MILESTONES = (("GRUB menu", r"GNU GRUB"), ("initrd /init", r"maculaos-init:"), ("sysvinit", r"INIT: version"),
              ("runlevel 3", r"Entering runlevel"), ("login prompt", r"login: "))


def one_boot(image: Path, milestones: tuple[tuple[str, str], ...] = MILESTONES) -> dict[str, float]:
    """Boot `image` once: seconds from QEMU's start to each of `milestones` (the last one must come)."""
    seen: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        m = Machine("bench-boot", VmConfig.for_image(image), Path(tmp), test_channel=False)
        m.start()
        try:
            for name, pattern in milestones:
                try:
                    m.wait_for_console_text(pattern, timeout=30 if name != "login prompt" else 180)
                except MachineError:
                    if name == "login prompt":
                        raise
                    continue  # not printed by this image: the next milestone still counts
                seen[name] = time.monotonic() - m.started_at
        finally:
            m.close()
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image", nargs="?", default=str(ROOT / "out/maculaos-core-0.1.0-amd64.iso"))
    ap.add_argument("--boots", type=int, default=3)
    args = ap.parse_args()
    image = Path(args.image)
    if not image.is_file():
        print(f"missing {image}: build it first (make image)", file=sys.stderr)
        return 2
    runs = [one_boot(image) for _ in range(args.boots)]
    before = 0.0
    for name, _ in MILESTONES:
        times = [r[name] for r in runs if name in r]
        if len(times) < len(runs):
            continue
        at = statistics.median(times)
        print(f"{name:<16} at {at:6.1f} s   (+{at - before:5.1f} s)")
        before = at
    return 0


if __name__ == "__main__":
    sys.exit(main())
