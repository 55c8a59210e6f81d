"""The Intel NUC board booted as a NUC: q35 under UEFI only, its disk on NVMe, an Intel e1000e NIC and the
ICH9 TCO watchdog, none of which the generic image's initrd loads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from maculaos_sdk.machine import cow_disk
from maculaos_sdk.profile import load_profile

from .conftest import OUT, build_once

pytestmark = pytest.mark.qemu
NUC_DISK = "maculaos-test-0.1.0-amd64-nuc.qcow2"


@pytest.fixture(scope="session")
def nuc_build(tmp_path_factory) -> dict[str, Path]:
    return build_once(tmp_path_factory, "test-nuc", load_profile("test", {"board": "nuc"}), OUT / "nuc")


def test_nuc_disk_boots_from_nvme_with_its_nic_watchdog_and_firmware(nuc_build, make_machine, tmp_path):
    disk = cow_disk(nuc_build[NUC_DISK], tmp_path / "nuc-amd64-nuc.qcow2")
    subprocess.run(["qemu-img", "resize", "-q", str(disk), "+1G"], check=True)  # a bigger drive than the image
    m = make_machine(disk, "nuc")
    m.start()
    cmd = (m.workdir / "nuc.cmdline").read_text()
    assert "nvme,serial=maculaos0" in cmd and "e1000e,netdev=net0" in cmd and "-bios" in cmd
    assert m.wait_for_boot() == "A"
    status = m.upgrade_status()
    assert (status["mode"], status["booted"], status["active"]) == ("disk", "A", "A")
    assert m.succeed(". /etc/os-release && echo $MACULAOS_BOARD").strip() == "nuc"
    # the root came from slot A of the NVMe drive, found by the initrd through the board's nvme module
    assert m.succeed("awk '$2 == \"/run/maculaos/lower\" {print $1}' /proc/mounts").split() == ["/dev/nvme0n1p2"]
    m.wait_for_network()
    assert m.succeed("basename $(readlink -f /sys/class/net/eth0/device/driver)").strip() == "e1000e"
    assert m.succeed("cat /sys/class/watchdog/watchdog0/identity").strip() == "iTCO_wdt"
    m.wait_until_booted()
    # first boot grew the data partition (the last one) to the end of the bigger drive
    sizes = m.succeed("cat /sys/class/block/nvme0n1/size /sys/class/block/nvme0n1p4/start "
                      "/sys/class/block/nvme0n1p4/size").split()
    disk_sectors, start, size = map(int, sizes)
    assert disk_sectors - (start + size) < 2048 * 2, sizes
    # the board's firmware is in the root (GPU, Wi-Fi), and its microcode leads the initrd as an early cpio
    m.succeed("ls /usr/lib/firmware/i915/ | grep -q . && ls /usr/lib/firmware/ | grep -q '^iwlwifi-'")
    assert m.succeed("awk '$2 == \"/run/maculaos/esp\" {print $1}' /proc/mounts").split() == ["/dev/nvme0n1p1"]
    assert m.succeed("head -c 6 /run/maculaos/esp/A/initrd.img") == "070701"  # an uncompressed cpio first ...
    m.succeed("head -c 65536 /run/maculaos/esp/A/initrd.img | grep -aq kernel/x86/microcode/GenuineIntel.bin")
    m.shutdown()
