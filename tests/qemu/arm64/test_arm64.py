"""arm64 images built on this (amd64) host and booted under qemu-system-aarch64 -M virt with UEFI (TCG):
the live ISO, and an update on the A/B disk that fails its health check and is rolled back by GRUB."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from maculaos_sdk.machine import cow_disk
from maculaos_sdk.node_machine import check_native_step_outputs
from maculaos_sdk.publish import serve

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def arm64_bundle_url(arm64_update_bundle: Path, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("arm64-bundles")
    shutil.copytree(arm64_update_bundle, root / "good")
    server = serve(root)
    yield f"http://10.0.2.2:{server.server_address[1]}/good"
    server.shutdown()


def test_arm64_live_iso_boots_to_a_shell_under_uefi(arm64_build, make_machine, record_property):
    iso = arm64_build["maculaos-test-0.1.0-arm64.iso"]
    m = make_machine(iso, "live-arm64")
    m.start()
    m.wait_for_console_text(r"MaculaOS \S+ \(live\)", timeout=120)  # GRUB arm64-efi from the ISO
    m.wait_for_console_text(r"maculaos-init: boot medium /dev/\w+", timeout=180)
    to_shell = m.wait_for_channel(timeout=300)
    record_property("seconds_to_shell", round(to_shell, 1))
    assert m.succeed("uname -m") == "aarch64\n"
    release = dict(line.split("=", 1) for line in m.succeed("cat /etc/os-release").splitlines() if "=" in line)
    assert (release["MACULAOS_ARCH"], release["MACULAOS_BOARD"], release["VERSION_ID"]) == \
        ('"arm64"', '"generic"', '"0.1.0"')
    mounts = [line.split() for line in m.succeed("cat /proc/mounts").splitlines()]
    assert [x[2] for x in mounts if x[1] == "/"][-1] == "overlay"
    assert [x[2] for x in mounts if x[1] == "/run/maculaos/lower"] == ["squashfs"]
    assert "console=ttyAMA0,115200" in m.succeed("cat /proc/cmdline")
    check_native_step_outputs(m)
    m.shutdown()


def test_arm64_update_failing_its_health_check_is_rolled_back_by_grub(arm64_build, arm64_bundle_url,
                                                                      make_machine, tmp_path):
    disk = arm64_build["maculaos-test-0.1.0-arm64.qcow2"]
    m = make_machine(cow_disk(disk, tmp_path / "ab-arm64.qcow2"), "ab-arm64")
    m.start()
    assert m.wait_for_boot(timeout=400) == "A"
    m.wait_for_network()
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["slots"]["B"]["version"]) == ("A", "A", None, None)
    m.succeed("mkdir -p /var/lib/maculaos/health.d && printf '#!/bin/sh\\nexit 1\\n' > /var/lib/maculaos/health.d/fail"
              " && chmod +x /var/lib/maculaos/health.d/fail && sync")
    m.succeed(f"maculaos upgrade --apply {arm64_bundle_url} --no-reboot", timeout=600)
    s = m.upgrade_status()
    assert (s["active"], s["trial"], s["tries"], s["slots"]["B"]["version"]) == ("A", "B", 0, "0.2.0")
    m.send_channel_nowait("reboot")
    booted = [m.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=400).group(1) for _ in range(4)]
    assert booted == ["B", "B", "B", "A"]
    m.wait_for_channel(timeout=400)
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["rolledback"], s["version"]) == ("A", "A", None, "B", "0.1.0")
