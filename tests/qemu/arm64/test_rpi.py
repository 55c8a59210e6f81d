"""The Raspberry Pi 4 and 5 SD images, opened as files (sfdisk, mtools, debugfs: no loop devices), and their
slot A booted under qemu-system-aarch64 -M virt with the card's own kernel and initrd (QEMU 7.2 has no Pi)."""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from maculaos_device import layout

pytestmark = pytest.mark.qemu
MIB = 1 << 20


# What differs per board on the card: the Pi 4 needs the firmware's start4.elf on the card, the Pi 5's EEPROM
# carries its own (and would refuse a card without os_check=0); device trees of the board's SoC; its UART.
BOARD_CARD = {
    "rpi4": {"firmware": ("start4.elf", "fixup4.dat"), "dtb": "bcm2711-rpi-4-b.dtb", "console": "ttyS1",
             "os_check": False},
    "rpi5": {"firmware": (), "dtb": "bcm2712-rpi-5-b.dtb", "console": "ttyAMA10", "os_check": True},
}


@pytest.fixture(scope="module")
def sd_card(rpi_build, tmp_path_factory) -> Path:
    """The card image, decompressed."""
    board, artifacts = rpi_build
    packed = artifacts[f"maculaos-test-0.1.0-arm64-{board}.img.xz"]
    card = tmp_path_factory.mktemp(board) / "sd.img"
    with lzma.open(packed) as src, card.open("wb") as dest:
        shutil.copyfileobj(src, dest, 4 * MIB)
    return card


def _table(card: Path) -> dict:
    out = subprocess.run(["sfdisk", "--json", str(card)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]


def _fat(card: Path, *args: str) -> subprocess.CompletedProcess:
    """An mtools command on the card's first partition (FAT at 1 MiB)."""
    return subprocess.run([args[0], "-i", f"{card}@@{MIB}", *args[1:]], capture_output=True, check=True)


def _fat_file(card: Path, path: str) -> bytes:
    return _fat(card, "mtype", f"::{path}").stdout


def _sha256_of_range(card: Path, start: int, size: int) -> str:
    h = hashlib.sha256()
    with card.open("rb") as f:
        f.seek(start)
        left = size
        while left:
            chunk = f.read(min(left, 4 * MIB))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def test_rpi_card_layout_firmware_and_slot_a_match_the_bundle(rpi_build, sd_card):
    board, artifacts = rpi_build
    expect = BOARD_CARD[board]
    table = _table(sd_card)
    assert table["label"] == "dos" and table["id"] == f"0x{layout.MBR_DISK_ID}"
    parts = table["partitions"]
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"] and parts[0].get("bootable") is True

    names = _fat(sd_card, "mdir", "-b", "-/", "::/").stdout.decode().split()
    for required in ("::/u-boot.bin", "::/config.txt", "::/cmdline.txt", f"::/{expect['dtb']}",
                     "::/EFI/BOOT/BOOTAA64.EFI", "::/grub/grub.cfg", "::/grub/grubenv", "::/A/vmlinuz",
                     "::/A/initrd.img", *(f"::/{f}" for f in expect["firmware"])):
        assert required in names, required
    other_socs = {"bcm2711", "bcm2712"} - {expect["dtb"].split("-")[0]}
    assert not [n for n in names if n.endswith(".dtb") and n.split("/")[-1].split("-")[0] in other_socs]
    if not expect["firmware"]:
        assert not [n for n in names if n.endswith(".elf")]  # nothing that would shadow the EEPROM's start.elf
    config = _fat_file(sd_card, "config.txt").decode().splitlines()
    assert {"arm_64bit=1", "enable_uart=1", "kernel=u-boot.bin"} <= set(config)
    assert ("os_check=0" in config) is expect["os_check"]
    cmdline = _fat_file(sd_card, "cmdline.txt").decode()
    assert f"macula.mbr={layout.MBR_DISK_ID}" in cmdline.split()
    assert f"console={expect['console']},115200" in cmdline.split()
    grub_cfg = _fat_file(sd_card, "grub/grub.cfg").decode()
    assert f"macula.mbr={layout.MBR_DISK_ID}" in grub_cfg  # what GRUB passes: the slots are found by number
    env = dict(line.split("=", 1) for line in _fat_file(sd_card, "grub/grubenv").decode().splitlines()
               if "=" in line and not line.startswith("#"))
    assert (env["active"], env["trial"], env["tries"]) == ("A", "", "0")

    # slot A's kernel, initrd and root filesystem are byte for byte the bundle's
    manifest = json.loads((artifacts[f"maculaos-test-0.1.0-arm64-{board}.bundle"] / "manifest.json").read_text())
    files = manifest["files"]
    assert (manifest["arch"], manifest["board"]) == ("arm64", board)
    assert hashlib.sha256(_fat_file(sd_card, "A/vmlinuz")).hexdigest() == files["vmlinuz"]["sha256"]
    assert hashlib.sha256(_fat_file(sd_card, "A/initrd.img")).hexdigest() == files["initrd.img"]["sha256"]
    slot_a = parts[1]["start"] * 512
    assert _sha256_of_range(sd_card, slot_a, files["rootfs.squashfs"]["size"]) == files["rootfs.squashfs"]["sha256"]
    assert _sha256_of_range(sd_card, parts[2]["start"] * 512, MIB) == hashlib.sha256(bytes(MIB)).hexdigest()

    # the data partition holds the layout's folders
    data = sd_card.parent / "data.ext4"
    with sd_card.open("rb") as src, data.open("wb") as dest:
        src.seek(parts[3]["start"] * 512)
        shutil.copyfileobj(src, dest, parts[3]["size"] * 512)
    listing = subprocess.run(["debugfs", "-R", "ls -p /overlay/etc", str(data)], capture_output=True, text=True,
                             check=True).stdout
    assert "/upper/" in listing and "/work/" in listing


def _card_machine(make_machine, name: str, card: Path, boot_from: Path, signature: str, **kw):
    """The card's slot A kernel and initrd booted directly, with the kernel line GRUB gives it: the image's
    macula.mbr= and macula.esp=<signature>-01, the signature GRUB read off the card it was loaded from."""
    kernel, initrd = card.parent / f"{name}-vmlinuz", card.parent / f"{name}-initrd.img"
    kernel.write_bytes(_fat_file(boot_from, "A/vmlinuz"))
    initrd.write_bytes(_fat_file(boot_from, "A/initrd.img"))
    return make_machine(card, name, kernel=kernel, initrd=initrd,
                        append=f"console=ttyAMA0,115200 macula.mode=disk macula.slot=A macula.mbr={layout.MBR_DISK_ID} "
                               f"macula.esp={signature}-01 net.ifnames=0 panic=10", **kw)


def _qcow2(raw: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)], check=True)
    return dest


def test_rpi_slot_a_boots_to_a_shell_under_virt(rpi_build, sd_card, make_machine, tmp_path, record_property):
    """The card's own kernel and initrd, its MBR slots found by signature: the same squashfs boots. The first
    boot grows the data partition and gives the card a signature of its own (a card flashed from the same
    image, a USB stick say, then supplies nothing at the next boot)."""
    card = _qcow2(sd_card, tmp_path / "card-arm64.qcow2")
    subprocess.run(["qemu-img", "resize", "-q", str(card), "+1G"], check=True)  # a bigger card than the image
    board = rpi_build[0]
    m = _card_machine(make_machine, f"{board}-virt", card, sd_card, layout.MBR_DISK_ID)
    m.start()
    assert m.wait_for_boot(timeout=400) == "A"
    record_property("seconds_to_shell", round(time.monotonic() - m.started_at, 1))
    release = m.succeed("cat /etc/os-release")
    assert f'MACULAOS_BOARD="{board}"' in release and 'MACULAOS_ARCH="arm64"' in release
    mounts = {x.split()[1]: x.split()[0] for x in m.succeed("cat /proc/mounts").splitlines()}
    assert mounts["/run/maculaos/lower"] == "/dev/vda2" and mounts["/var/lib/maculaos"] == "/dev/vda4"
    # the data partition grew into the rest of the card at first boot, and its ext4 with it
    m.wait_until_succeeds("rc-service maculaos-growdata status", timeout=120)
    data_mb = int(m.succeed("cat /sys/class/block/vda4/size")) * 512 // MIB
    card_mb = int(m.succeed("cat /sys/block/vda/size")) * 512 // MIB
    assert int(m.succeed("cat /sys/class/block/vda4/start")) * 512 // MIB + data_mb == card_mb
    fs_mb = int(m.succeed("df -m --output=size /var/lib/maculaos | tail -n 1"))
    assert fs_mb > 1024 and data_mb > 1024
    # ... and the card got a signature of its own, which this boot's `maculaos` finds its slots by
    own = m.succeed("sfdisk -d /dev/vda | sed -n 's/^label-id: 0x//p'").strip()
    assert own not in (layout.MBR_DISK_ID, "") and m.succeed("cat /run/maculaos/mbr").strip() == own
    s = m.upgrade_status()
    assert (s["mode"], s["booted"], s["active"], s["slots"]["A"]["version"]) == ("disk", "A", "A", "0.1.0")

    # Next boot, with a freshly flashed card (the image's signature) ahead of it on the bus: GRUB names the card
    # it was loaded from, and the stick supplies neither the root, the data partition nor anything maculaos uses
    m.shutdown()
    stick = _qcow2(sd_card, tmp_path / "stick.qcow2")
    m = _card_machine(make_machine, f"{board}-virt-stick", card, sd_card, own, disks_first=(stick,))
    m.start()
    assert m.wait_for_boot(timeout=400) == "A"
    mounts = {x.split()[1]: x.split()[0] for x in m.succeed("cat /proc/mounts").splitlines()}
    assert (mounts["/run/maculaos/lower"], mounts["/var/lib/maculaos"]) == ("/dev/vdb2", "/dev/vdb4")
    assert m.succeed("cat /run/maculaos/mbr").strip() == own
    assert m.succeed("sfdisk -d /dev/vda | sed -n 's/^label-id: 0x//p'").strip() == layout.MBR_DISK_ID
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["slots"]["A"]["version"]) == ("A", "A", "0.1.0")
