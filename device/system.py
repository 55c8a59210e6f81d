"""A node as the update code sees it: paths, slot devices, the booted slot, rebooting.

`Device` is the real machine. Every path is a field, and the few hardware actions are methods, so unit
tests run the whole state machine on a temporary folder with file-backed slots (tests/test_device_*)."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import layout, paths

# Every program the device code runs. tests/test_device_commands.py checks that each run([...]) in the device
# code names one of these; the rootfs stage refuses to build an image that lacks one of them.
COMMANDS = ("blockdev", "cryptsetup", "df", "dmesg", "hostname", "ip", "minisign", "mkfs.ext4", "mkfs.vfat",
            "modprobe", "mount", "nft", "partx", "poweroff", "rc-service", "reboot", "resize2fs", "sfdisk", "sh",
            "ssh-keygen", "sync", "udhcpc", "umount")
# Run only where the image has them, after checking (boards with Wi-Fi: boards.WIRELESS_PACKAGES).
OPTIONAL_COMMANDS = ("wpa_supplicant", "logread")  # logread: the layer's wrapper (overlay/usr/sbin)
HEALTH_HOOK_SECONDS = 120
DISK_PATTERNS = ("vd*", "sd*", "nvme*n*", "mmcblk[0-9]*")  # virtio, SCSI/SATA/USB, NVMe, MMC (sysfs names)
LOCK_SECONDS = 600


class Mount(NamedTuple):
    """One line of /proc/mounts."""

    source: str
    target: str
    kind: str
    options: str


class DeviceError(Exception):
    """A refused or failed command: the message is printed as `maculaos: <message>`, exit 1."""


def log(msg: str) -> None:
    print(f"maculaos: {msg}", file=sys.stderr, flush=True)
    try:
        import syslog

        syslog.openlog("maculaos")
        syslog.syslog(msg)
    except OSError:
        pass


def read_os_release(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


@dataclass
class Device:
    run: Path = Path(paths.RUN)
    esp: Path = Path(paths.ESP)
    state: Path = Path(paths.STATE)          # node state on the data partition (factory reset wipes it)
    data_root: Path = Path(paths.DATA)       # the data partition itself (factory reset keeps this)
    os_release: Path = Path("/etc/os-release")
    update_key: Path = Path(paths.UPDATE_KEY)  # in the read-only root, never the /etc overlay
    health_dirs: tuple[Path, ...] = tuple(Path(d) for d in paths.HEALTH_DIRS)
    cmdline_path: Path = Path("/proc/cmdline")
    proc_mounts: Path = Path("/proc/mounts")
    config_root: Path = Path("/")
    sys_block: Path = Path("/sys/class/block")  # disks and partitions (a partition's folder has `partition`)

    # --- what the initrd recorded ------------------------------------------------------------------
    def mode(self) -> str:
        try:
            return (self.run / "mode").read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def booted(self) -> str:
        try:
            slot = (self.run / "slot").read_text().strip()
        except OSError:
            return ""
        return slot if slot in layout.SLOTS else ""

    def cmdline(self) -> str:
        try:
            return self.cmdline_path.read_text()
        except OSError:
            return ""

    def release(self) -> dict[str, str]:
        return read_os_release(self.os_release)

    def card_signature(self) -> str | None:
        """The MBR signature of the Raspberry Pi card this node booted from; None on GPT disks. The initrd
        records what GRUB read off the card (run/mbr), and grow_data what it gave a fresh card; the kernel
        line's macula.mbr= (the image's own) is the fallback."""
        try:
            recorded = (self.run / "mbr").read_text().strip()
        except OSError:
            recorded = ""
        if re.fullmatch(r"[0-9a-f]{8}", recorded):
            return recorded
        if " macula.mbr=" in f" {self.cmdline()}":
            return _cmdline_value(self.cmdline(), "macula.mbr") or layout.MBR_DISK_ID
        return None

    @property
    def seen_pointers_file(self) -> Path:
        """Per channel, when the newest channel pointer this node followed was published (anti-replay)."""
        return self.data_root / "channels.json"

    @property
    def highest_file(self) -> Path:
        """The highest version ever committed on this node: kept through factory resets."""
        return self.data_root / layout.HIGHEST_VERSION_FILE

    # --- hardware --------------------------------------------------------------------------------
    def mounts(self) -> list[Mount]:
        """The mount table; empty when it cannot be read."""
        try:
            lines = self.proc_mounts.read_text().splitlines()
        except OSError:
            return []
        return [Mount(*f[:4]) for f in (line.split() for line in lines) if len(f) >= 4]

    def mounted(self, path: Path) -> bool:
        return any(m.target == str(path) for m in self.mounts())

    def disk_mounted_at(self, path: Path) -> str | None:
        """The whole disk (`vda`) whose partition or self is mounted at `path`."""
        for m in self.mounts():
            if m.target == str(path) and m.source.startswith("/dev/"):
                return disk_of(self.sys_block, m.source[5:])
        return None

    def mounts_on_disk(self, disk: str) -> list[str]:
        """The mount points of disk `disk` itself and of its partitions."""
        return [m.target for m in self.mounts()
                if m.source.startswith("/dev/") and disk_of(self.sys_block, m.source[5:]) == disk]

    def disks(self) -> list[str]:
        """The whole disks an install may go to, in DISK_PATTERNS order (virtio first), each sorted; no partitions."""
        found: list[str] = []
        for pattern in DISK_PATTERNS:
            found += sorted(d.name for d in self.sys_block.glob(pattern) if not (d / "partition").exists())
        return found

    def sectors(self, name: str) -> int:
        """The size of block device `name` in 512-byte sectors (0 when the kernel gives none)."""
        try:
            return int((self.sys_block / name / "size").read_text())
        except (OSError, ValueError):
            return 0

    def boot_disk(self) -> str | None:
        """The disk holding the booted slot (`vda`), from the mount of the running root squashfs."""
        return self.disk_mounted_at(self.run / "lower")

    def partition(self, name: str) -> Path:
        """The /dev node of partition `name` (`esp`, `rootfs-A`, ...) on the boot disk."""
        signature = self.card_signature()
        if signature:  # Raspberry Pi cards: MBR, found by number on the card carrying this signature
            found = layout.find_mbr_partition(name, signature)
            if found:
                return Path(found)
            raise DeviceError(f"no partition {name} on the MaculaOS card")
        disk = self.boot_disk()
        if disk is None:  # never a partition of that name on whichever disk comes first
            raise DeviceError(f"cannot tell the boot disk (nothing mounted at {self.run / 'lower'}): refusing to "
                              f"pick a partition named {name} on any disk")
        for uevent in sorted(self.sys_block.glob("*/uevent")):
            try:
                lines = uevent.read_text().splitlines()
            except OSError:
                continue
            dev = uevent.parent.name
            if f"PARTNAME={name}" in lines and disk_of(self.sys_block, dev) == disk:
                return Path("/dev") / dev
        raise DeviceError(f"no partition named {name} on the boot disk {disk or '(unknown)'}")

    def slot_device(self, slot: str) -> Path:
        return self.partition(layout.slot_name(slot))

    def mount_esp(self) -> None:
        if self.mounted(self.esp):
            return
        self.esp.mkdir(parents=True, exist_ok=True)
        dev = self.partition(layout.PART_ESP)
        # root's alone: the ESP holds GRUB's password hash and the initrd with recovery's
        options = "rw,noatime,nosuid,nodev,noexec,uid=0,gid=0,fmask=0077,dmask=0077"
        proc = subprocess.run(["mount", "-t", "vfat", "-o", options, str(dev), str(self.esp)],
                              capture_output=True, text=True)
        if proc.returncode != 0 and not self.mounted(self.esp):
            raise DeviceError(f"cannot mount the boot partition {dev}: {proc.stderr.strip()}")

    def reboot(self, force: bool = False) -> None:
        subprocess.run(["sync"])
        subprocess.run(["reboot", "-f"] if force else ["reboot"])

    def root_mounted(self) -> str | None:
        """The first missing mount a healthy installed system has, or None."""
        mounts = self.mounts()
        if not any(m.target == str(self.run / "lower") and m.kind == "squashfs" and "ro" in m.options.split(",")
                   for m in mounts):
            return "root squashfs not mounted"
        if not any(m.target == str(self.state) for m in mounts):
            return "data partition not mounted"
        return None

    def health(self) -> str | None:
        """Every check must pass: None, or the first failure."""
        why = self.root_mounted()
        if why:
            return why
        for folder in self.health_dirs:
            for hook in sorted(folder.glob("*")) if folder.is_dir() else []:
                if not (hook.is_file() and os.access(hook, os.X_OK)):
                    continue
                try:
                    proc = subprocess.run([str(hook)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, timeout=HEALTH_HOOK_SECONDS)
                except subprocess.TimeoutExpired:
                    return f"health hook {hook} timed out"
                if proc.returncode != 0:
                    return f"health hook {hook} failed"
        return None

    def lock(self) -> int:
        """One maculaos command at a time touches the boot state (boot-time confirm vs. a user's apply)."""
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / "maculaos.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeviceError("another maculaos command holds the lock") from None
                time.sleep(0.2)


def disk_of(sys_block: Path, dev: str) -> str:
    """The whole disk holding block device `dev` (itself when it is a disk): vda2 -> vda."""
    node = sys_block / dev
    if (node / "partition").exists():
        return node.resolve().parent.name
    return dev


def _cmdline_value(cmdline: str, key: str) -> str | None:
    for arg in cmdline.split():
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return None

