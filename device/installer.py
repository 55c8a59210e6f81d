"""Install from the live ISO, grow the data partition, schedule a factory reset."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from . import bootenv, encryption, layout, luks, paths, updater
from .bootenv import other
from .manifest import SlotRecord
from .system import Device, DeviceError, disk_of, log
from .updater import invalidate, read_back_sha256, record_slot, write_slot

MEDIUM = Path(paths.MEDIUM)
MEDIUM_FILES = ("maculaos/rootfs.squashfs", "boot/vmlinuz", "boot/initrd.img", "maculaos/esp/grub/grub.cfg")
GROW_MIN_SECTORS = 32768  # 16 MiB
GPT_BACKUP_SECTORS = 34


def run(cmd: list[str], what: str, stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeviceError(f"{what} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def auto_device(dev: Device) -> str:
    """The first disk that is not the boot medium and has a size (an empty card reader has none)."""
    skip = dev.disk_mounted_at(MEDIUM)
    if skip is None:
        raise DeviceError(f"install: cannot tell the boot medium (nothing mounted at {MEDIUM}): refusing to pick "
                          "a disk")
    for name in dev.disks():
        if name != skip and dev.sectors(name) > 0:
            return f"/dev/{name}"
    raise DeviceError("install: no disk found to install to")


def target_disk(dev: Device, device: str) -> str:
    """The name (`vda`) of the whole disk `device` (`auto`, `/dev/vda`, a /dev/disk/by-id link) names, which an
    install may erase: a disk the kernel lists, not a partition, not the boot medium."""
    if device == "auto":
        device = auto_device(dev)
    name = Path(device).resolve().name
    if not device.startswith("/dev/") or not (dev.sys_block / name).is_dir():
        raise DeviceError(f"install: {device} is not a disk this machine has (give /dev/<disk>)")
    if disk_of(dev.sys_block, name) != name:
        raise DeviceError(f"install: {device} is a partition; give the whole disk")
    medium = dev.disk_mounted_at(MEDIUM)
    if medium is None or name == medium:  # the medium, or no way to tell it apart: never written
        raise DeviceError(f"install: {device} is the boot medium" if medium else
                          f"install: cannot tell the boot medium (nothing mounted at {MEDIUM}): refusing to write")
    return name


def disk_plan(dev: Device, name: str, squashfs_bytes: int) -> layout.Layout:
    """The layout for disk `name`: data gets what the slots and ESP leave; refused when they do not fit."""
    disk_mb = dev.sectors(name) * 512 // layout.MIB
    try:  # sizes, names and type GUIDs from the layout module the image build uses too
        return layout.plan(squashfs_bytes, size_mb=disk_mb)
    except layout.LayoutError as exc:
        raise DeviceError(f"install: /dev/{name} ({disk_mb} MiB) is too small: {exc}") from None


def partition_node(disk: str, n: int) -> Path:
    """Partition n of a disk: /dev/vda 1 -> /dev/vda1, /dev/nvme0n1 1 -> /dev/nvme0n1p1."""
    return Path(f"{disk}p{n}" if disk[-1].isdigit() else f"{disk}{n}")


def wait_node(path: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise DeviceError(f"install: {path} did not appear")
        time.sleep(0.1)


def install(dev: Device, device: str, config: str | None, yes: bool) -> None:
    if dev.mode() not in ("live", "install"):
        raise DeviceError(f"install runs from the live ISO (this is mode {dev.mode()})")
    for f in MEDIUM_FILES:
        if not (MEDIUM / f).exists():
            raise DeviceError(f"the boot medium has no {f}: boot the MaculaOS ISO to install")
    name = target_disk(dev, device)
    device = f"/dev/{name}"
    policy, passphrase = data_policy(config)
    tpm_values = tpm_values_for_slot_a(policy)

    squashfs = MEDIUM / "maculaos/rootfs.squashfs"
    sq_size = squashfs.stat().st_size
    plan = disk_plan(dev, name, sq_size)
    if not yes:
        print(f"This erases everything on {device} ({plan.size_mb} MiB). Type yes to continue: ", end="",
              file=sys.stderr, flush=True)
        if sys.stdin.readline().strip() != "yes":
            raise DeviceError("install: cancelled")
    version = dev.release().get("VERSION_ID", "")
    log(f"installing MaculaOS {version} to {device} (ESP {plan.esp_mb} MiB, slots 2 x {plan.slot_mb} MiB, "
        "data the rest)")
    for mountpoint in sorted(dev.mounts_on_disk(name), reverse=True):
        subprocess.run(["umount", mountpoint])
    with open(device, "r+b") as disk:
        disk.write(bytes(2 * layout.MIB))
        os.fsync(disk.fileno())
    run(["sfdisk", "-q", "--wipe", "always", "--wipe-partitions", "always", device], f"install: partitioning {device}",
        stdin=plan.sfdisk_script(fixed_ids=False, data_fills_disk=True))
    subprocess.run(["blockdev", "--rereadpt", device], capture_output=True)
    parts = {part: partition_node(device, n) for part, n in layout.PART_NUMBERS.items()}
    for path in parts.values():
        wait_node(path)

    log(f"slot A: writing the root filesystem ({plan.squashfs_mb} MiB)")
    with open(squashfs, "rb") as stream:
        write_slot(stream, parts[layout.slot_name("A")], sq_size)
    # Slot A is read back from the disk and checked against the sha256 the build recorded on the medium,
    # so a damaged medium and a bad disk both stop the install here.
    try:
        want = (MEDIUM / "maculaos/rootfs.squashfs.sha256").read_text().split()[0]
    except (OSError, IndexError):
        raise DeviceError("install: the medium has no rootfs.squashfs.sha256") from None
    if read_back_sha256(parts[layout.slot_name("A")], sq_size) != want:
        raise DeviceError("install: slot A does not read back as the medium's rootfs.squashfs (sha256 mismatch: "
                          "a damaged medium or disk)")

    log("boot partition: GRUB, its A/B environment, the kernel of slot A")
    run(["mkfs.vfat", "-n", "MACULA_ESP", str(parts[layout.PART_ESP])], "install: mkfs.vfat")
    target = dev.run / "install-target"
    target.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "vfat", str(parts[layout.PART_ESP]), str(target)], "install: mounting the ESP")
    try:
        shutil.copytree(MEDIUM / "maculaos/esp", target, dirs_exist_ok=True, copy_function=shutil.copyfile)
        (target / "A").mkdir(exist_ok=True)
        for f in ("vmlinuz", "initrd.img"):
            shutil.copyfile(MEDIUM / "boot" / f, target / "A" / f)
        record = SlotRecord(version=version, profile=dev.release().get("VARIANT_ID", ""), size=sq_size, sha256=want)
        record_slot(target / "A", record)
        os.sync()
    finally:
        subprocess.run(["umount", str(target)])
    # slot B holds nothing bootable (zeroed start; no boot files, no record on the fresh ESP)
    invalidate(parts[layout.slot_name("B")])

    data = parts[layout.PART_DATA]
    if policy.enabled:
        log(f"data partition: encrypted (LUKS2, {policy.cipher.value}; key sources: "
            f"{', '.join(s.value for s in policy.sources)})")
        data = make_encrypted_data(dev, data, policy, passphrase, tpm_values)
    else:
        log("data partition")
        run(["mkfs.ext4", "-q", "-F", "-L", "MACULA_DATA", str(data)], "install: mkfs.ext4")
    try:
        run(["mount", "-t", "ext4", str(data), str(target)], "install: mounting the data partition")
        try:
            for d in layout.data_dirs():
                (target / d).mkdir(parents=True, exist_ok=True)
            if config:
                store_config(Path(config), target / "maculaos/config.yaml")
            os.sync()
        finally:
            subprocess.run(["umount", str(target)])
    finally:
        if policy.enabled:
            subprocess.run(["cryptsetup", "close", encryption.MAPPER])
    log(f"installed MaculaOS {version} to {device}")


def data_policy(config: str | None) -> tuple[encryption.Policy, str]:
    """What the image's default config and the install config (checked here, before any disk is touched) ask of
    the data partition, and the passphrase to enroll (the config's, else asked on this terminal; "" if none)."""
    from . import nodeconfig

    files = [f for f in (Path(paths.DEFAULT_CONFIG),) if f.is_file()]
    if config:
        problems = nodeconfig.validate_files([Path(config)]) if Path(config).is_file() else None
        if problems is None:
            raise DeviceError(f"install: cannot read the config {config}")
        if problems:
            raise DeviceError(f"install: {config} is not a valid config: {problems[0]}")
        files.append(Path(config))
    try:
        resolved = nodeconfig.resolve(files)
    except nodeconfig.ConfigError as exc:
        raise DeviceError(f"install: {exc.problems[0]}") from None
    policy = encryption.Policy.of(resolved)
    if not policy.enabled:
        return policy, ""
    if policy.problem():
        raise DeviceError(f"install: {policy.problem()}")
    passphrase = resolved["storage"]["encryption"]["passphrase"]
    if encryption.KeySource.passphrase in policy.sources and not passphrase:
        passphrase = ask_passphrase()
    return policy, passphrase


def ask_passphrase() -> str:
    """The data partition's passphrase, typed twice on this terminal."""
    import getpass
    import re

    if not sys.stdin.isatty():
        raise DeviceError("install: storage.encryption lists `passphrase` but no terminal can ask for it: set "
                          "storage.encryption.passphrase in the install config (it is not stored)")
    while True:
        first = getpass.getpass("Passphrase for the data partition (8 to 256 characters): ")
        if not re.fullmatch(encryption.PASSPHRASE_PATTERN, first):
            print("8 to 256 printable ASCII characters, please", file=sys.stderr)
        elif getpass.getpass("Type it again: ") == first:
            return first
        else:
            print("the two differ: again", file=sys.stderr)


def tpm_values_for_slot_a(policy: encryption.Policy) -> bytes:
    """The PCR values (encryption.TPM_INSTALL_PCRS) the installed disk's slot A will boot with on this machine, to
    seal its tpm key to; b"" when the config lists no tpm source. Checked before any disk is touched."""
    if not policy.enabled or encryption.KeySource.tpm not in policy.sources:
        return b""
    from . import measured_boot

    loaders = sorted((MEDIUM / "maculaos/esp/EFI/BOOT").glob("BOOT*.EFI"))
    try:
        if len(loaders) != 1:
            raise measured_boot.MeasurementError("the medium's ESP has no single boot loader")
        return measured_boot.sealing_values_for(encryption.TPM_INSTALL_PCRS, loaders[0], MEDIUM / "boot/vmlinuz")
    except measured_boot.MeasurementError as exc:
        raise DeviceError(f"install: the tpm key source: {exc}") from None


def make_encrypted_data(dev: Device, part: Path, policy: encryption.Policy, passphrase: str,
                        tpm_values: bytes = b"") -> Path:
    """A LUKS2 volume on `part` with its key sources enrolled (luks.sh, as the initrd's crypto-erase makes
    one; a tpm key sealed for slot A, to `tpm_values`), opened, with an empty ext4: its mapper device."""
    secret = luks.secret_file(dev.run / "luks-passphrase", passphrase.encode())
    values = luks.secret_file(dev.run / "luks-tpm-values", tpm_values)
    env = {"MACULAOS_LUKS_PASSPHRASE_FILE": str(secret), "MACULAOS_LUKS_TPM_BOOT": "A",
           "MACULAOS_LUKS_TPM_PCR_VALUES": str(values),
           "MACULAOS_LUKS_TPM_PCR_LIST": encryption.pcr_list(encryption.TPM_INSTALL_PCRS), **policy.shell_env()}
    try:
        made = luks.run_function("luks_create", [str(part), *policy.shell_args()], env)
    finally:
        secret.unlink()
        values.unlink()
    if not made:
        raise DeviceError(f"install: could not make the encrypted data partition on {part}")
    return Path("/dev/mapper") / encryption.MAPPER


def store_config(source: Path, dest: Path) -> None:
    """The install config on the data partition (0600), as given, or without the keys that are never stored
    (the data partition's passphrase)."""
    import yaml

    from . import yamlinput

    data, _ = yamlinput.read(yamlinput.read_text(source))
    kept = encryption.without_secrets(data or {})
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes() if kept == (data or {}) else yaml.safe_dump(kept, sort_keys=False).encode())


def unique_ids(dev: Device) -> None:
    """A disk written from a built image carries the image's fixed ids, the same on every copy: give this
    disk its own, so that from the next boot GRUB's macula.esp= names this disk alone (a GPT disk's GUIDs, a
    Raspberry Pi card's MBR signature)."""
    disk = f"/dev/{disk_of(dev.sys_block, dev.partition(layout.PART_ESP).name)}"
    table = run(["sfdisk", "-d", disk], "reading the partition table").splitlines()
    quiet = ["sfdisk", "-q", "--no-reread", "--no-tell-kernel"]
    if dev.card_signature() is not None:
        if f"label-id: 0x{layout.MBR_DISK_ID}" not in table:
            return
        signature = new_card_signature()
        run([*quiet, "--disk-id", disk, f"0x{signature}"], f"giving {disk} its own signature")
        (dev.run / "mbr").write_text(signature + "\n")  # what this boot finds the card's partitions by
        log(f"{disk}: the built image's MBR signature replaced by this card's own ({signature})")
        return
    if f"label-id: {layout.FIXED_DISK_ID}" not in table:
        return
    run([*quiet, "--disk-id", disk, str(uuid.uuid4()).upper()], f"giving {disk} its own id")
    for n in sorted(layout.PART_NUMBERS.values()):
        run([*quiet, "--part-uuid", disk, str(n), str(uuid.uuid4()).upper()], f"giving partition {n} its own id")
    log(f"{disk}: the built image's fixed partition ids replaced by this disk's own")


def new_card_signature() -> str:
    """8 random hex digits, neither 0 (no signature) nor the image's own."""
    while True:
        signature = secrets.token_hex(4)
        if signature not in ("00000000", layout.MBR_DISK_ID):
            return signature


def grow_data(dev: Device) -> None:
    """Grow the data partition into the free space after it, then its ext4 (online)."""
    if dev.mode() != "disk":
        return
    unique_ids(dev)
    part = dev.partition(layout.PART_DATA)
    name = part.name
    disk = disk_of(dev.sys_block, name)
    sys_part = dev.sys_block / name
    n = int((sys_part / "partition").read_text())
    start, size = int((sys_part / "start").read_text()), int((sys_part / "size").read_text())
    total = dev.sectors(disk)
    free = total - start - size - GPT_BACKUP_SECTORS
    if free < GROW_MIN_SECTORS:
        return
    disk_node = f"/dev/{disk}"
    log(f"data partition {part}: growing by {free // 2048} MiB")
    if "label: gpt" in run(["sfdisk", "-d", disk_node], "reading the partition table"):
        subprocess.run(["sfdisk", "-q", "--relocate", "gpt-bak-std", disk_node], capture_output=True)
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "-N", str(n), disk_node], f"growing partition {n} of "
        f"{disk_node}", stdin=", +\n")
    new = None
    for line in run(["sfdisk", "-d", disk_node], "reading the partition table").splitlines():
        if line.startswith(f"{part} "):
            fields = dict(f.strip().split("=", 1) for f in line.split(":", 1)[1].split(",") if "=" in f)
            new = int(fields["size"].strip())
    if new is None:
        raise DeviceError(f"{part} is gone from the partition table of {disk_node}")
    # partx (util-linux proper; resizepart moved to util-linux-extra in trixie) re-reads the table for partition n
    # and resizes the kernel's view of it in place (BLKPG), while it is mounted
    run(["partx", "--update", "--nr", str(n), disk_node], f"telling the kernel the new size of {part}")
    run(["resize2fs", str(part)], f"resize2fs {part}")
    log(f"data partition {part}: now {new // 2048} MiB")


def factory_reset(dev: Device, keep_data: bool) -> None:
    """Node state is wiped by the initrd at the next boot (it alone sees the data partition unused); the other
    slot, which may hold an older or a pending system, is forgotten now: the node comes back on the system it
    runs, and on nothing else."""
    if dev.mode() != "disk":
        raise DeviceError(f"not an installed system (mode {dev.mode()}): nothing to do")
    env = updater.store(dev).load()
    booted = dev.booted()
    if booted != env.active:
        raise DeviceError(f"slot {booted} is on trial: confirm it (maculaos confirm) or roll back before a factory "
                          "reset")
    standby = other(booted)
    if env.trial:
        updater.store(dev).save(replace(env, trial="", tries=0))
    updater.forget_slot(dev, standby, dev.slot_device(standby))
    # atomic: the initrd takes a marker that is not "keep-data" for a wipe, and a power cut during a plain write can
    # leave an empty file (tests/test_crash_matrix.py found it)
    bootenv.write_atomic(dev.data_root / ".factory-reset", b"keep-data\n" if keep_data else b"wipe-data\n")
    os.sync()
    log("factory reset scheduled: node state is wiped at the next boot; rebooting")
    dev.reboot()

