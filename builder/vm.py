"""QEMU: build the command line for an image, and probe whether KVM really runs a guest."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .arch import Architecture
from .boards import BOARDS, BootFlow
from .errors import BadInput

# A 512-byte boot sector that writes "KVMOK" to COM1 and halts: boots in SeaBIOS in milliseconds.
_PROBE_CODE = bytes.fromhex(
    "ba f8 03"        # mov dx, 0x3f8
    "b0 4b ee"        # mov al, 'K'; out dx, al
    "b0 56 ee"        # 'V'
    "b0 4d ee"        # 'M'
    "b0 4f ee"        # 'O'
    "b0 4b ee"        # 'K'
    "b0 0a ee"        # '\n'
    "fa f4"           # cli; hlt
    "eb fd"           # jmp $-3 (back to hlt)
)


_KVM_ARGS = ["-accel", "kvm", "-cpu", "host"]


@functools.cache
def kvm_usable(timeout: float = 5.0) -> bool:
    """True only if a KVM guest actually runs here (on some hosts /dev/kvm exists but guests hang)."""
    if Architecture.host() is not Architecture.amd64 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        # Probe with exactly the accelerator and CPU a real boot would use.
        cmd = [qemu, *_KVM_ARGS, "-M", "q35", "-m", "32", "-display", "none", "-monitor", "none",
               "-serial", "stdio", "-drive", f"file={disk},format=raw,if=ide", "-no-reboot"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return b"KVMOK" in out


def accel_args(arch: Architecture, accel: str = "auto") -> list[str]:
    """`-accel kvm` when asked and it works (auto: when the probe passes), else TCG."""
    if accel == "kvm" or (accel == "auto" and arch.is_native and kvm_usable()):
        return list(_KVM_ARGS)
    return ["-accel", "tcg,thread=multi", "-cpu", arch.qemu_cpu]


SHARE_TAG = "maculaos-share"  # overlay/etc/init.d/maculaos-vmhost mounts it at /mnt/host
FW_CFG_CONFIG = "opt/io.maculaos/config"  # ... and reads the node config from there


@dataclass(frozen=True)
class Forward:
    """A TCP port of the guest reachable on the host's loopback."""

    name: str
    guest: int
    host: int


# What a dev VM forwards by default: (name, guest port, preferred host port).
DEV_FORWARDS = (("ssh", 22, 2222), ("k3s-api", 6443, 6443), ("console", 443, 8443))


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Some free TCP port on the host's loopback (for a QEMU forward)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cow_disk(base: Path, dest: Path) -> Path:
    """A copy-on-write qcow2 over `base`: the VM writes there and the built image stays pristine."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.resolve()), str(dest)],
                   check=True)
    return dest


def dev_forwards(ssh_port: int | None = None) -> tuple[Forward, ...]:
    """The dev VM's forwards, each on its preferred host port when free, else on any free one."""
    picked: list[Forward] = []
    for name, guest, preferred in DEV_FORWARDS:
        if name == "ssh" and ssh_port:
            preferred = ssh_port
        taken = {f.host for f in picked}
        host = preferred if preferred not in taken and port_is_free(preferred) else free_port()
        picked.append(Forward(name, guest, host))
    return tuple(picked)


@dataclass
class VmConfig:
    """Everything needed to start one VM."""

    image: Path
    arch: Architecture
    memory: str = "1024"
    uefi: bool = False
    accel: str = "auto"
    ssh_port: int | None = None
    cpus: int = 2
    disks: tuple[Path, ...] = ()  # more virtio disks (an install target, say)
    disks_first: tuple[Path, ...] = ()  # disks ahead of the image on the bus (Linux names them first), not booted
    kernel: Path | None = None  # direct kernel boot (no firmware): the image is then a plain disk
    initrd: Path | None = None
    append: str = ""
    forwards: tuple[Forward, ...] = ()  # host ports on 127.0.0.1 forwarded to guest ports
    share: Path | None = None  # a host folder the guest mounts at /mnt/host (9p)
    guest_config: Path | None = None  # a node config handed to the guest through fw_cfg
    nic: str = "virtio-net-pci"  # the NIC model and disk bus the board's hardware is imitated with
    disk_bus: str = "virtio"
    iso_on_usb: bool = False  # an ISO attached as a USB stick (the firmware boots it) instead of a CD
    usb_sticks: tuple[Path, ...] = ()  # raw disk images attached as removable USB sticks (a key disk, say)
    rtc_base: str | None = None  # the RTC's start (QEMU -rtc base=), e.g. a board without a clock: 1970-01-01
    tpm_socket: Path | None = None  # a running swtpm's control socket: the guest gets a TPM 2.0 (TIS) on it

    @classmethod
    def for_image(cls, image: Path, *, arch: str | None = None, **kw: object) -> VmConfig:
        """Config for an image file; the arch comes from the flag, else the file name, else the host. A
        board named in the file name (`-amd64-nuc.qcow2`) brings the NIC and disk bus that imitate it."""
        if not image.is_file():
            raise BadInput(f"{image}: no such image", "build one with `maculaos-sdk build-image`")
        m = re.search(r"-(amd64|arm64)(?:-([a-z0-9]+))?\.", image.name)
        if arch is None:
            arch = m.group(1) if m else Architecture.host().value
        board = BOARDS.get(m.group(2) or "generic") if m else None
        if board is not None:
            kw = {"nic": board.vm_nic, "disk_bus": board.vm_disk, **kw}
        uefi_only = board is not None and board.boot.get(Architecture(arch)) is BootFlow.grub_efi
        if image.suffix != ".iso" or uefi_only:
            kw["uefi"] = True  # installed A/B disks and UEFI-only boards boot only through UEFI
        return cls(image=image, arch=Architecture(arch), **kw)  # type: ignore[arg-type]

    @property
    def is_iso(self) -> bool:
        return self.image.suffix == ".iso"


def firmware_path(arch: Architecture) -> Path:
    for candidate in arch.efi_firmware:
        if candidate.exists():
            return candidate
    raise BadInput(f"no UEFI firmware for {arch} found ({', '.join(map(str, arch.efi_firmware))})",
                   "run `make setup` (installs ovmf / qemu-efi-aarch64)")


def qemu_command(cfg: VmConfig, *, interactive: bool = False, extra: list[str] | None = None) -> list[str]:
    """The qemu-system command line: serial console on stdio, user networking, the image attached."""
    arch = cfg.arch
    cmd = [arch.qemu_binary, "-M", arch.qemu_machine, "-m", cfg.memory, "-smp", str(cfg.cpus),
           *accel_args(arch, cfg.accel), "-no-user-config", "-nodefaults", "-display", "none",
           "-serial", "mon:stdio" if interactive else "stdio"]
    if not interactive:
        cmd += ["-monitor", "none"]
    if cfg.kernel is not None:
        cmd += ["-kernel", str(cfg.kernel), "-append", cfg.append]
        cmd += ["-initrd", str(cfg.initrd)] if cfg.initrd else []
    elif cfg.uefi or arch is Architecture.arm64:
        cmd += ["-bios", str(firmware_path(arch))]
    forwards = [*cfg.forwards, *([Forward("ssh", 22, cfg.ssh_port)] if cfg.ssh_port else [])]
    netdev = "user,id=net0" + "".join(f",hostfwd=tcp:127.0.0.1:{f.host}-:{f.guest}" for f in forwards)
    cmd += ["-netdev", netdev, "-device", f"{cfg.nic},netdev=net0"]
    if cfg.share is not None:
        cmd += ["-virtfs", f"local,path={cfg.share},mount_tag={SHARE_TAG},security_model=none,id=share"]
    if cfg.guest_config is not None:
        cmd += ["-fw_cfg", f"name={FW_CFG_CONFIG},file={cfg.guest_config}"]
    if (cfg.is_iso and cfg.iso_on_usb) or cfg.usb_sticks:
        cmd += ["-device", "qemu-xhci"]
    for n, stick in enumerate(cfg.usb_sticks):
        cmd += ["-drive", f"file={stick},format=raw,if=none,id=usb{n}",
                "-device", f"usb-storage,drive=usb{n},removable=on"]
    if cfg.is_iso and cfg.iso_on_usb:
        cmd += ["-drive", f"file={cfg.image},format=raw,readonly=on,if=none,id=stick",
                "-device", "usb-storage,drive=stick,bootindex=0"]
    elif cfg.is_iso:
        if arch is Architecture.amd64:
            cmd += ["-drive", f"file={cfg.image},media=cdrom,readonly=on,if=ide"]
        else:
            cmd += ["-drive", f"file={cfg.image},media=cdrom,readonly=on,if=none,id=cd0",
                    "-device", "virtio-scsi-pci", "-device", "scsi-cd,drive=cd0"]
    disks = cfg.disks if cfg.is_iso else (cfg.image, *cfg.disks)
    for n, disk in enumerate((*cfg.disks_first, *disks)):
        fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
        if not cfg.disks_first and cfg.disk_bus == "virtio":
            cmd += ["-drive", f"file={disk},format={fmt},if=virtio"]
            continue
        # the firmware boots the image, whatever sits ahead of it on the bus
        boot = ",bootindex=0" if disk == cfg.image and cfg.disks_first else ""
        device = f"nvme,serial=maculaos{n}" if cfg.disk_bus == "nvme" else "virtio-blk-pci"
        cmd += ["-drive", f"file={disk},format={fmt},if=none,id=disk{n}", "-device", f"{device},drive=disk{n}{boot}"]
    cmd += ["-device", "virtio-rng-pci"]
    if cfg.tpm_socket is not None:
        tis = "tpm-tis" if arch is Architecture.amd64 else "tpm-tis-device"
        cmd += ["-chardev", f"socket,id=chrtpm,path={cfg.tpm_socket}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", f"{tis},tpmdev=tpm0"]
    cmd += ["-rtc", f"base={cfg.rtc_base}"] if cfg.rtc_base else []
    return cmd + (extra or [])


def wait_for_file(path: Path, timeout: float) -> bool:
    """Poll until `path` exists (QEMU creates its sockets asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False
