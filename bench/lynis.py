#!/usr/bin/env python3
"""What an outside auditor sees: Debian's lynis, run on an installed node of a release-like profile (core with
GRUB and recovery locked, signed with a throwaway key: tests/qemu/profiles/release.yaml as a disk image),
booted in QEMU. Prints the hardening index, the number of tests, and every warning and suggestion.

Usage: python bench/lynis.py   (the host needs `apt-get install lynis`: the node reads it over 9p, nothing is
installed on it). Takes a release build (cached after the first) and one boot."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maculaos_sdk import keys  # noqa: E402
from maculaos_sdk.build import BuildOptions, build_image  # noqa: E402
from maculaos_sdk.devvm import dev_ssh_key, guest_config, ssh_command  # noqa: E402
from maculaos_sdk.machine import Machine  # noqa: E402
from maculaos_sdk.profile import load_profile  # noqa: E402
from maculaos_sdk.vm import VmConfig, cow_disk, free_port  # noqa: E402

LYNIS = Path("/usr/sbin/lynis")
LYNIS_SHARE = Path("/usr/share/lynis")


def release_disk(tmp: Path) -> Path:
    """The release profile as an A/B disk image, signed with a key made for this run."""
    secret = tmp / "bench.key"
    keys.generate(secret)
    profile = tmp / "release.yaml"
    profile.write_text(f"name: release-audit\nextends: {ROOT / 'tests/qemu/profiles/release.yaml'}\n"
                       "outputs: [-iso, -bundle, disk]\n")
    artifacts = build_image(load_profile(str(profile)), BuildOptions(output=tmp / "out", release=True,
                                                                     signing_key=secret)).artifacts
    return next(path for path in artifacts.values() if path.suffix == ".qcow2")


def lynis_tree(dest: Path) -> Path:
    """lynis as it runs from its own folder: the script, include/, plugins/, db/ and the default profile."""
    dest.mkdir()
    shutil.copy(LYNIS, dest / "lynis")
    for part in ("include", "db"):
        shutil.copytree(LYNIS_SHARE / part, dest / part)
    shutil.copytree("/etc/lynis/plugins", dest / "plugins")
    shutil.copy("/etc/lynis/default.prf", dest / "default.prf")
    return dest


def audit(disk: Path, tree: Path, workdir: Path) -> str:
    """Boot the node, run lynis over SSH, return its report file."""
    key, port = dev_ssh_key(), free_port()
    config = VmConfig.for_image(cow_disk(disk, workdir / "node.qcow2"), ssh_port=port, share=tree,
                                guest_config=guest_config(key, ()), memory="2048")
    m = Machine("lynis", config, workdir, test_channel=False)
    m.start()
    try:
        deadline = time.monotonic() + 600
        while subprocess.run(ssh_command(port, key, ["test -x /mnt/host/lynis"]), capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise SystemExit("the node did not answer over SSH with the share mounted within 600 s")
            time.sleep(5)
        run = ("cd /mnt/host && sh ./lynis audit system --quick --no-colors --report-file /tmp/lynis.dat "
               ">/tmp/lynis.out 2>&1; cat /tmp/lynis.dat")
        return subprocess.run(ssh_command(port, key, [run]), capture_output=True, text=True, timeout=1800).stdout
    finally:
        m.close()


def main() -> int:
    if not LYNIS.is_file():
        print(f"{LYNIS} is missing: apt-get install lynis", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        report = audit(release_disk(Path(tmp)), lynis_tree(Path(tmp) / "lynis"), Path(tmp))
    fields: dict[str, list[str]] = {}
    for line in report.splitlines():
        key, _, value = line.partition("=")
        fields.setdefault(key, []).append(value)
    print(f"lynis {fields.get('lynis_version', ['?'])[0]}: hardening index {fields.get('hardening_index', ['?'])[0]}"
          f", {fields.get('lynis_tests_done', ['?'])[0]} tests")
    for kind in ("warning[]", "suggestion[]"):
        for value in fields.get(kind, []):
            test, text = (value.split("|") + ["", ""])[:2]
            print(f"  {kind[:-2]:<10} {test:<10} {text}")
    # which settings the flagged tests wanted otherwise (sshd options, sysctl keys, file permissions)
    for value in fields.get("details[]", []):
        test, _, detail = (value.split("|") + ["", "", ""])[:3]
        if test in ("SSH-7408", "KRNL-6000", "FILE-7524") and "prefval" in detail:
            print(f"  {'detail':<10} {test:<10} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
