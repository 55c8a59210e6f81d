"""`maculaos install` choosing and checking its target disk, read through the Device's /sys and /proc paths: a
sysfs tree and a mount table in a temporary folder, shaped as the kernel makes them (a partition's folder is a
link into its disk's folder and holds a `partition` file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from maculaos_device import installer, layout
from maculaos_device.system import Device, DeviceError

MEDIUM = str(installer.MEDIUM)


def machine(tmp_path: Path, disks: dict[str, tuple[int, int]], mounts: list[str]) -> Device:
    """A Device whose sysfs has `disks` (name -> (size in MiB, partitions)) and whose mount table is `mounts`."""
    devices, block = tmp_path / "devices", tmp_path / "class-block"
    block.mkdir(parents=True)
    for disk, (mib, parts) in disks.items():
        folder = devices / disk
        folder.mkdir(parents=True)
        (folder / "size").write_text(f"{mib * 2048}\n")
        (block / disk).symlink_to(folder)
        for n in range(1, parts + 1):
            part = folder / f"{disk}{'p' if disk[-1].isdigit() else ''}{n}"
            part.mkdir()
            (part / "partition").write_text(f"{n}\n")
            (part / "size").write_text("2048\n")
            (block / part.name).symlink_to(part)
    table = tmp_path / "mounts"
    table.write_text("".join(f"{line} 0 0\n" for line in ["proc /proc proc rw", *mounts]))
    return Device(run=tmp_path / "run", sys_block=block, proc_mounts=table)


# a live boot from a USB stick (sda), an empty card reader (mmcblk0), an NVMe disk and a virtio disk with no size
LIVE = {"sda": (1024, 2), "mmcblk0": (0, 0), "nvme0n1": (8192, 1), "vda": (0, 0)}
FROM_STICK = [f"/dev/sda1 {MEDIUM} iso9660 ro", "/dev/nvme0n1p1 /mnt/old ext4 rw"]


def test_auto_takes_the_first_disk_with_a_size_that_is_not_the_medium(tmp_path):
    dev = machine(tmp_path, LIVE, FROM_STICK)
    assert dev.disks() == ["vda", "sda", "nvme0n1", "mmcblk0"]  # virtio, SCSI/USB, NVMe, MMC; no partitions
    assert installer.target_disk(dev, "auto") == "nvme0n1"


def test_auto_refuses_when_the_medium_is_unknown(tmp_path):
    dev = machine(tmp_path, LIVE, ["/dev/nvme0n1p1 /mnt/old ext4 rw"])
    with pytest.raises(DeviceError, match=r"cannot tell the boot medium \(nothing mounted at .*\): refusing to pick"):
        installer.target_disk(dev, "auto")


@pytest.mark.parametrize("device, why", [
    ("/dev/sda", "is the boot medium"),
    ("/dev/nvme0n1p1", "is a partition; give the whole disk"),
    ("/dev/sdz", "is not a disk this machine has"),
    ("/tmp/disk.img", "is not a disk this machine has"),
    ("nvme0n1", "is not a disk this machine has"),
])
def test_a_named_device_that_is_not_an_erasable_disk_is_refused(tmp_path, device, why):
    dev = machine(tmp_path, LIVE, FROM_STICK)
    with pytest.raises(DeviceError, match=f"^install: {device} {why}"):
        installer.target_disk(dev, device)


def test_a_named_disk_is_refused_while_the_medium_is_unknown(tmp_path):
    dev = machine(tmp_path, LIVE, [])
    with pytest.raises(DeviceError, match="refusing to write"):
        installer.target_disk(dev, "/dev/nvme0n1")
    assert installer.target_disk(machine(tmp_path / "2", LIVE, FROM_STICK), "/dev/nvme0n1") == "nvme0n1"


def test_what_is_mounted_from_the_target_is_its_own_partitions_only(tmp_path):
    dev = machine(tmp_path, {"sda": (1024, 1), "sdaa": (1024, 1), "nvme0n1": (1024, 2), "nvme0n10": (1024, 1)},
                  ["/dev/sda1 /a ext4 rw", "/dev/sdaa1 /aa ext4 rw", "/dev/nvme0n1p2 /n ext4 rw",
                   "/dev/nvme0n1 /whole ext4 rw", "/dev/nvme0n10p1 /n10 ext4 rw", "tmpfs /tmp tmpfs rw"])
    assert dev.mounts_on_disk("sda") == ["/a"]
    assert dev.mounts_on_disk("nvme0n1") == ["/n", "/whole"]


def test_the_layout_gives_data_the_rest_of_the_disk_or_names_the_shortfall(tmp_path):
    dev = machine(tmp_path, {"vda": (4096, 0), "vdb": (300, 0)}, FROM_STICK)
    squashfs = 150 * layout.MIB
    plan = installer.disk_plan(dev, "vda", squashfs)
    assert plan == layout.plan(squashfs, size_mb=4096)  # the size read from sysfs: 4096 MiB
    assert plan.data_mb > layout.DATA_MB  # data takes the rest of the disk
    with pytest.raises(DeviceError, match=r"^install: /dev/vdb \(300 MiB\) is too small: a disk of 300 MiB cannot "
                                          r"hold ESP"):
        installer.disk_plan(dev, "vdb", squashfs)
