#!/usr/bin/env python3
"""Benchmark: cold build, reproducibility, no-change rebuild, one-overlay-file rebuild, ISO size, QEMU start to shell.

Prints one figure per line. Usage: python bench/build.py [--profile core] [--arch amd64|arm64]
[--skip-cold] [--no-repro] [--boots N] [--compare-arm64]. The cold build uses --no-cache and drops the
bootstrap tarball cache, so nothing is reused; it runs twice (unless --no-repro) and says whether the two
ISOs are bit-identical (bench/repro.py says which file differs). --compare-arm64 also builds the arm64
image cold right after and prints its time and its ratio to the amd64 one (the target is <= 3x).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.boot import MILESTONES, one_boot  # noqa: E402
from bench.repro import build as build_from_nothing  # noqa: E402
from bench.repro import sha256  # noqa: E402

CLI = [str(ROOT / ".venv/bin/maculaos-sdk")]


def timed_build(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(CLI + ["build-image", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def cold_build(profile: str, arch: str, out: Path) -> float:
    """Seconds for bench/repro.py's build from nothing (no stage cache, no bootstrap tarball)."""
    start = time.monotonic()
    build_from_nothing(profile, arch, out)
    return time.monotonic() - start


def seconds_to_shell(iso: Path) -> float:
    """Seconds from QEMU's start to the console's login prompt (or autologin)."""
    return one_boot(iso, MILESTONES[-1:])["login prompt"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="core")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--no-repro", action="store_true", help="one cold build, not two")
    ap.add_argument("--boots", type=int, default=2)
    ap.add_argument("--arch", default="amd64", choices=["amd64", "arm64"])
    ap.add_argument("--compare-arm64", action="store_true")
    args = ap.parse_args()
    arch = ["--arch", args.arch]
    out = ROOT / "out"
    figures: list[tuple[str, str]] = []

    version = next(line.split(":", 1)[1].strip() for line in (ROOT / "profiles" / f"{args.profile}.yaml")
                   .read_text().splitlines() if line.startswith("version:"))
    iso = out / f"maculaos-{args.profile}-{version}-{args.arch}.iso"
    cold = None
    if not args.skip_cold:
        cold = cold_build(args.profile, args.arch, out)
        figures.append((f"cold build, {args.arch} (s)", f"{cold:.1f}"))
        if not args.no_repro:
            with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
                again = cold_build(args.profile, args.arch, Path(tmp))
                same = sha256(iso) == sha256(Path(tmp) / iso.name)
            figures.append(("second cold build (s)", f"{again:.1f}"))
            figures.append(("two cold ISOs bit-identical", "yes" if same else "no (bench/repro.py says where)"))
        if args.compare_arm64:
            arm = cold_build(args.profile, 'arm64', out)
            figures.append(("cold build, arm64 (s)", f"{arm:.1f} ({arm / cold:.2f}x amd64)"))
    figures.append(("no-change rebuild (s)", f"{timed_build(['-p', args.profile, *arch]):.2f}"))

    with tempfile.TemporaryDirectory() as tmp:
        edited = Path(tmp) / "edited.yaml"
        edited.write_text(f"name: {args.profile}\nextends: {ROOT / 'profiles' / (args.profile + '.yaml')}\n"
                          f"overlay:\n  /etc/maculaos-bench: '{time.time()}'\n")
        edit = timed_build(['--config', str(edited), '-o', str(Path(tmp) / 'out'), *arch])
        ratio = f" ({100 * edit / cold:.0f} % of cold)" if cold else ""
        figures.append(("one-overlay-file rebuild (s)", f"{edit:.1f}{ratio}"))

    figures.append(("ISO size (MB)", f"{iso.stat().st_size / 1e6:.1f}"))
    boots = [seconds_to_shell(iso) for _ in range(args.boots)]
    figures.append(("QEMU start to shell, TCG (s)", f"{statistics.median(boots):.1f} (runs: "
                    + ", ".join(f"{b:.1f}" for b in boots) + ")"))
    for name, value in figures:
        print(f"{name:<32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
