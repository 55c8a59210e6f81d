"""The MaculaOS disk layout: one module for the SDK, the image builder stages and the device.

Every fact about how an installed disk is laid out lives here: partition names and type GUIDs, the ESP
size, the slot size rule, the data partition's folders. The same file is `maculaos_device.layout` on the
host, on the device (`maculaos install`) and in the disk and SD image stages (context source device-modules),
so the three cannot disagree. Standard library only.

    python3 -m maculaos_device.layout sfdisk --squashfs-bytes N [--esp-mb M] [--slot-mb M] [--data-mb M]
                             [--size-mb M] [--fixed-ids] [--mbr] [--data-fills-disk] [--json|--sizes]
    python3 -m maculaos_device.layout data-dirs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

MIB = 1 << 20
SECTOR = 512
ALIGN_MB = 1  # first partition starts at 1 MiB; every size is whole MiB

ESP_MB = 128  # GRUB, its env, one kernel + initrd per slot (arm64 kernels are ~30 MiB uncompressed)
DATA_MB = 256  # the data partition of a built disk image; an install gives data the rest of the disk
MIN_SLOT_MB = 256
SLOT_ROUND_MB = 64
SLOT_FACTOR = 2  # a slot holds twice today's squashfs, so later releases still fit

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

PART_ESP, PART_DATA = "esp", "data"
SLOTS = ("A", "B")

# Folders on the data partition, and where the initrd binds them into the root.
DATA_BINDS = (("maculaos", "var/lib/maculaos"), ("rancher", "var/lib/rancher"), ("home", "home"),
              ("data", "var/lib/data"))
ETC_OVERLAY = ("overlay/etc/upper", "overlay/etc/work")
# What a factory reset leaves on the data partition: the anti-rollback floor, and with --keep-data the users'
# folders; everything else (node state, k3s, /etc's overlay, folders nobody knows) goes.
HIGHEST_VERSION_FILE = "highest-version"
RESET_KEEPS = (HIGHEST_VERSION_FILE, "lost+found")
USER_DATA = ("home", "data")
# The only /etc files that outlive a reboot (shell patterns under /etc). At every boot the initrd copies these
# from the persistent /etc overlay into a fresh upper layer and drops the rest, so neither a compromised root
# nor an offline write keeps init scripts, keys, whiteouts or opaque folders in /etc. Settings belong in the
# node config (the data partition), which is validated at every boot.
ETC_PERSIST = ("machine-id", "ssh/ssh_host_*_key", "ssh/ssh_host_*_key.pub", "rancher/node/password")

# Built disk images carry fixed ids (reproducible bytes); `maculaos install` lets sfdisk make fresh ones.
FIXED_DISK_ID = "4D41434C-0000-4000-8000-000000000000"
# Raspberry Pi cards use MBR (the Pi firmware's GPT support is unreliable): no partition names there, so
# the partitions are found by number on the disk with this MBR signature (init and `maculaos` read it).
MBR_DISK_ID = "4d41434c"
MBR_FAT32_LBA = "c"
MBR_LINUX = "83"
PART_NUMBERS = {PART_ESP: 1, "rootfs-A": 2, "rootfs-B": 3, PART_DATA: 4}


def slot_name(slot: str) -> str:
    return f"rootfs-{slot}"


def _fixed_part_id(n: int) -> str:
    return f"4D41434C-000{n}-4000-8000-00000000000{n}"


def data_dirs() -> list[str]:
    """Every folder a fresh data partition holds."""
    return [d for d, _ in DATA_BINDS] + list(ETC_OVERLAY)


def mb_for_bytes(n: int) -> int:
    return (n + MIB - 1) // MIB


def slot_mb_for(squashfs_bytes: int) -> int:
    """The slot size rule: twice the squashfs, rounded up to 64 MiB, at least 256 MiB."""
    want = SLOT_FACTOR * mb_for_bytes(squashfs_bytes)
    return max(MIN_SLOT_MB, -(-want // SLOT_ROUND_MB) * SLOT_ROUND_MB)


class LayoutError(ValueError):
    """The parts do not fit: the message says which and by how much."""


@dataclass(frozen=True)
class Layout:
    """Sizes in MiB of the four partitions; `size_mb` is the whole disk (GPT backup included)."""

    esp_mb: int
    slot_mb: int
    data_mb: int
    size_mb: int
    squashfs_mb: int

    def offsets_mb(self) -> dict[str, int]:
        """Start of each partition, in MiB from the start of the disk."""
        esp = ALIGN_MB
        a = esp + self.esp_mb
        return {PART_ESP: esp, slot_name("A"): a, slot_name("B"): a + self.slot_mb, PART_DATA: a + 2 * self.slot_mb}

    def sfdisk_script(self, fixed_ids: bool, data_fills_disk: bool = False, mbr: bool = False) -> str:
        """The partition table as sfdisk input (GPT, names, types; fixed ids for reproducible images)."""
        if mbr:
            return self._mbr_script(data_fills_disk)
        s = ALIGN_MB * MIB // SECTOR
        lines = ["label: gpt"] + ([f"label-id: {FIXED_DISK_ID}"] if fixed_ids else [])
        parts = [(PART_ESP, ESP_TYPE, self.esp_mb), (slot_name("A"), LINUX_TYPE, self.slot_mb),
                 (slot_name("B"), LINUX_TYPE, self.slot_mb), (PART_DATA, LINUX_TYPE, self.data_mb)]
        for n, (name, type_guid, mb) in enumerate(parts, start=1):
            fields = [f"start={s}"] if n == 1 else []
            if not (data_fills_disk and name == PART_DATA):
                fields.append(f"size={mb * MIB // SECTOR}")
            fields += [f"type={type_guid}", f'name="{name}"']
            if fixed_ids:
                fields.append(f"uuid={_fixed_part_id(n)}")
            lines.append(", ".join(fields))
        return "\n".join(lines) + "\n"


    def _mbr_script(self, data_fills_disk: bool) -> str:
        """MBR for the Pi: FAT32 boot partition (active) first, then the slots and data, in PART_NUMBERS order."""
        sizes = [self.esp_mb, self.slot_mb, self.slot_mb, self.data_mb]
        types = [MBR_FAT32_LBA, MBR_LINUX, MBR_LINUX, MBR_LINUX]
        lines = ["label: dos", f"label-id: 0x{MBR_DISK_ID}"]
        for n, (mb, type_id) in enumerate(zip(sizes, types, strict=True), start=1):
            fields = [f"start={ALIGN_MB * MIB // SECTOR}"] if n == 1 else []
            if not (data_fills_disk and n == 4):
                fields.append(f"size={mb * MIB // SECTOR}")
            fields.append(f"type={type_id}")
            if n == 1:
                fields.append("bootable")
            lines.append(", ".join(fields))
        return "\n".join(lines) + "\n"


MIN_DATA_MB = 32  # an ext4 data partition with its folders and a journal


def _fixed_mb(esp_mb: int, slot_mb: int) -> int:
    return ALIGN_MB + esp_mb + 2 * slot_mb + ALIGN_MB  # + the backup GPT at the end


def never_fits(esp_mb: int, slot_mb: int, data_mb: int, size_mb: int) -> str | None:
    """Why these disk.* settings can hold no image at all, whatever its squashfs (the SDK checks it before any
    stage runs); None when some image fits."""
    if data_mb < MIN_DATA_MB:
        return f"a data partition of {data_mb} MiB is below the {MIN_DATA_MB} MiB it needs"
    least = _fixed_mb(esp_mb, slot_mb or MIN_SLOT_MB) + data_mb
    if size_mb and size_mb < least:
        return (f"a disk of {size_mb} MiB cannot hold ESP {esp_mb} + two slots of at least {slot_mb or MIN_SLOT_MB} "
                f"+ data {data_mb} MiB (need {least})")
    return None


def plan(squashfs_bytes: int, *, esp_mb: int = ESP_MB, slot_mb: int = 0, data_mb: int = DATA_MB,
         size_mb: int = 0) -> Layout:
    """Sizes for a disk holding this squashfs; `size_mb` (0 = just big enough) gives data the rest."""
    sq_mb = mb_for_bytes(squashfs_bytes)
    slot_mb = slot_mb or slot_mb_for(squashfs_bytes)
    if sq_mb > slot_mb:
        raise LayoutError(f"the squashfs ({sq_mb} MiB) does not fit a slot of {slot_mb} MiB: raise disk.slot_mb")
    fixed = _fixed_mb(esp_mb, slot_mb)
    need = fixed + data_mb
    if size_mb:
        if size_mb < need:
            raise LayoutError(f"a disk of {size_mb} MiB cannot hold ESP {esp_mb} + two slots of {slot_mb} + data "
                              f"{data_mb} MiB (need {need})")
        data_mb = size_mb - fixed
    return Layout(esp_mb=esp_mb, slot_mb=slot_mb, data_mb=data_mb, size_mb=size_mb or need, squashfs_mb=sq_mb)


def find_mbr_partition(name: str, signature: str, sys_block: str = "/sys/block", dev: str = "/dev") -> str | None:
    """/dev node of partition `name` (by its number) on the disk whose MBR carries `signature`."""
    number = PART_NUMBERS.get(name)
    if number is None:
        return None
    for disk in sorted(os.listdir(sys_block)):
        try:
            with open(os.path.join(dev, disk), "rb") as f:
                f.seek(440)
                found = f.read(4)[::-1].hex()
        except OSError:
            continue
        if found != signature.lower():
            continue
        for part in sorted(os.listdir(os.path.join(sys_block, disk))):
            try:
                with open(os.path.join(sys_block, disk, part, "partition")) as f:
                    if int(f.read()) == number:
                        return os.path.join(dev, part)
            except (OSError, ValueError):
                continue
    return None


def _cmdline_mbr() -> str:
    with open("/proc/cmdline") as f:
        for arg in f.read().split():
            if arg.startswith("macula.mbr="):
                return arg.split("=", 1)[1]
    return MBR_DISK_ID


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maculaos_device.layout", description="MaculaOS disk layout")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sfdisk", help="print the partition table for sfdisk (and the sizes with --json)")
    s.add_argument("--squashfs-bytes", type=int, required=True)
    s.add_argument("--esp-mb", type=int, default=ESP_MB)
    s.add_argument("--slot-mb", type=int, default=0)
    s.add_argument("--data-mb", type=int, default=DATA_MB)
    s.add_argument("--size-mb", type=int, default=0, help="whole disk; data gets the rest")
    s.add_argument("--fixed-ids", action="store_true", help="reproducible disk and partition GUIDs")
    s.add_argument("--data-fills-disk", action="store_true", help="no size for data: sfdisk gives it the rest")
    s.add_argument("--mbr", action="store_true", help="an MBR table (Raspberry Pi) instead of GPT")
    s.add_argument("--json", action="store_true", help="print the sizes and offsets as JSON instead")
    s.add_argument("--sizes", action="store_true", help="print `ESP SLOT DATA SIZE SQUASHFS` (MiB) instead")
    sub.add_parser("data-dirs", help="the folders of a fresh data partition, one per line")
    sub.add_parser("mbr-id", help="the MBR disk signature of Raspberry Pi cards (also their FAT volume id)")
    f = sub.add_parser("find", help="the /dev node of a partition on an MBR card (macula.mbr= on the kernel line)")
    f.add_argument("name", choices=sorted(PART_NUMBERS))
    args = ap.parse_args(argv)
    if args.cmd == "data-dirs":
        print("\n".join(data_dirs()))
        return 0
    if args.cmd == "mbr-id":
        print(MBR_DISK_ID)
        return 0
    if args.cmd == "find":
        node = find_mbr_partition(args.name, _cmdline_mbr())
        if node is None:
            return 1
        print(node)
        return 0
    try:
        layout = plan(args.squashfs_bytes, esp_mb=args.esp_mb, slot_mb=args.slot_mb, data_mb=args.data_mb,
                      size_mb=args.size_mb)
    except LayoutError as exc:
        print(f"layout: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps({**asdict(layout), "offsets_mb": layout.offsets_mb()}, sort_keys=True))
    elif args.sizes:
        print(layout.esp_mb, layout.slot_mb, layout.data_mb, layout.size_mb, layout.squashfs_mb)
    else:
        print(layout.sfdisk_script(args.fixed_ids, args.data_fills_disk, args.mbr), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
