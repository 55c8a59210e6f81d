"""Boards as data: one table saying, per board, how it boots and what it needs.

A board narrows an architecture to a machine family: which boot flow its firmware runs, which Debian
firmware packages and archive components it needs, which kernel modules its initrd loads and which
module folders it must keep when a profile prunes, which outputs make sense for it, its serial console
and its default disk size. Everything that differs per board is read from here, nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .arch import Architecture

# The root filesystem as files or as a container image: no boot flow involved, so every board has them.
ROOTFS_OUTPUTS = ("tar", "oci")


class BootFlow(enum.Enum):
    """How the firmware reaches our kernel; each flow fixes which outputs can boot."""

    grub_bios_efi = "grub-bios+efi"  # PC firmware, legacy BIOS or UEFI: GRUB either way
    grub_efi = "grub-efi"  # UEFI only: GRUB EFI loader
    rpi_firmware = "rpi-firmware"  # Raspberry Pi firmware -> U-Boot (EFI loader only) -> GRUB EFI

    @property
    def outputs(self) -> tuple[str, ...]:
        """What a build can produce for a board booting this way."""
        if self is BootFlow.rpi_firmware:
            return ("sdimage", "bundle", *ROOTFS_OUTPUTS)
        return ("iso", "disk", "bundle", *ROOTFS_OUTPUTS)


@dataclass(frozen=True)
class Board:
    """One row of the board table."""

    name: str
    description: str
    boot: dict[Architecture, BootFlow]  # the arches it exists for, and how each boots
    firmware_packages: tuple[str, ...] = ()  # unpacked by the kernel stage; firmware_keep picks what is kept
    firmware_renamed: dict[str, dict[str, str]] = field(default_factory=dict)  # suite -> {package: its name there}
    components: tuple[str, ...] = ()  # archive components those packages need
    initrd_modules: tuple[str, ...] = ()  # loaded by the initrd before it looks for the root
    keep_modules: tuple[str, ...] = ()  # module folders kept even when the profile prunes a parent
    serial: dict[Architecture, str] = field(default_factory=dict)  # default: the arch's console
    firmware_keep: tuple[str, ...] = ()  # top-level /usr/lib/firmware entries kept (globs); the rest is removed
    image_extra_mb: int = 0  # what its firmware adds to an image: size.iso_max_mb is raised by this much
    early_microcode: bool = False  # intel-microcode as an early cpio in front of the initrd (no late loading)
    disk_mb: int = 0  # default total disk / SD image size (0: just big enough; data grows on first boot)
    wireless: bool = False  # keeps wireless drivers and installs WIRELESS_PACKAGES: node-config `wifi:` applies
    suites: tuple[str, ...] = ()  # Debian suites whose kernel and U-Boot can boot it (empty: any)
    kernel_pocket: str = ""  # the kernel comes from <suite><pocket> (e.g. -backports) instead of the suite
    vm_nic: str = "virtio-net-pci"  # how QEMU imitates its hardware (the dev VM and the boot tests):
    vm_disk: str = "virtio"  # the NIC model and the disk bus (virtio or nvme)

    @property
    def packages(self) -> tuple[str, ...]:
        """Userland the board needs in its root filesystem besides the profile's packages."""
        return WIRELESS_PACKAGES if self.wireless else ()

    def firmware_packages_for(self, suite: str) -> tuple[str, ...]:
        """The firmware packages by the names `suite` gives them (trixie split firmware-misc-nonfree)."""
        renamed = self.firmware_renamed.get(suite, {})
        return tuple(renamed.get(p, p) for p in self.firmware_packages)

    @property
    def arches(self) -> tuple[Architecture, ...]:
        return tuple(self.boot)

    def boot_flow(self, arch: Architecture) -> BootFlow:
        return self.boot[arch]

    def outputs(self, arch: Architecture) -> tuple[str, ...]:
        return self.boot[arch].outputs

    def translate_outputs(self, arch: Architecture, outputs: list[str]) -> list[str]:
        """`outputs` with each one this board cannot boot replaced by its own bootable image (iso -> sdimage)."""
        if arch not in self.boot:
            return outputs
        supported = self.outputs(arch)
        return list(dict.fromkeys(o if o in supported else supported[0] for o in outputs))

    def serial_console(self, arch: Architecture) -> str:
        return self.serial.get(arch, arch.serial_console)

    def suffix(self) -> str:
        """Part of output names: `maculaos-core-0.1.0-arm64-rpi4.img.xz`; none for generic."""
        return "" if self.name == "generic" else f"-{self.name}"


_PI_MODULES = ("sdhci-iproc", "mmc_block", "bcm2835-dma", "bcm2835_wdt", "genet", "broadcom", "xhci_pci",
               "reset-raspberrypi", "pcie-brcmstb")
WIRELESS_PACKAGES = ("wpasupplicant",)  # node-config `wifi:` (`maculaos config apply` starts it)
_PI_FIRMWARE = ("firmware-brcm80211",)
_PI_FIRMWARE_KEEP = ("brcm", "cypress", "regulatory.db*")

BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("generic", "PCs and VMs (amd64: BIOS and UEFI), arm64 UEFI machines and QEMU virt",
          boot={Architecture.amd64: BootFlow.grub_bios_efi, Architecture.arm64: BootFlow.grub_efi}),
    Board("nuc", "Intel NUC and similar x86 mini PCs: UEFI, Intel NIC/Wi-Fi/GPU firmware, early microcode",
          boot={Architecture.amd64: BootFlow.grub_efi},
          firmware_packages=("firmware-misc-nonfree", "firmware-iwlwifi", "firmware-realtek"),
          firmware_renamed={"trixie": {"firmware-misc-nonfree": "firmware-intel-graphics"}},  # i915 moved there
          components=("non-free-firmware",),
          initrd_modules=("nvme", "ahci", "sd_mod", "e1000e", "igc", "r8169", "iTCO_wdt"),
          keep_modules=("drivers/net/wireless/intel", "drivers/gpu/drm/i915", "net/wireless", "net/mac80211"),
          # GPU (GuC/HuC/DMC), the Wi-Fi chips NUCs ship (8265, 9260/9560, AX200/201/210/211), Realtek NICs
          firmware_keep=("i915", "iwlwifi-8265-*", "iwlwifi-9000-*", "iwlwifi-9260-*", "iwlwifi-cc-a0-*",
                         "iwlwifi-Qu*", "iwlwifi-so-a0-*", "iwlwifi-ty-a0-*", "rtl_nic", "rtw88", "rtw89",
                         "regulatory.db*"),
          image_extra_mb=48,
          early_microcode=True, wireless=True,
          vm_nic="e1000e", vm_disk="nvme"),  # QEMU's Intel 82574L (e1000e) and an NVMe drive, as in a NUC
    Board("rpi4", "Raspberry Pi 4 / 400 / CM4: Pi firmware, then U-Boot's EFI loader, then GRUB (A/B in grubenv)",
          boot={Architecture.arm64: BootFlow.rpi_firmware},
          firmware_packages=_PI_FIRMWARE, components=("non-free-firmware",), firmware_keep=_PI_FIRMWARE_KEEP,
          initrd_modules=_PI_MODULES,
          keep_modules=("drivers/net/wireless/broadcom", "net/wireless", "net/mac80211"),
          serial={Architecture.arm64: "ttyS1"}, wireless=True),
    Board("rpi5", "Raspberry Pi 5 (experimental: trixie's U-Boot and trixie-backports' kernel for SD, RP1, Ethernet)",
          boot={Architecture.arm64: BootFlow.rpi_firmware},
          firmware_packages=_PI_FIRMWARE, components=("non-free-firmware",), firmware_keep=_PI_FIRMWARE_KEEP,
          initrd_modules=("sdhci-brcmstb", "mmc_block", "xhci_pci", "pcie-brcmstb"),
          keep_modules=("drivers/net/wireless/broadcom", "net/wireless", "net/mac80211"),
          serial={Architecture.arm64: "ttyAMA10"}, wireless=True, suites=("trixie",), kernel_pocket="-backports"),
)}


def board_problem(board: str, arch: str, outputs: list[str], suite: str) -> tuple[str, str, str] | None:
    """(key, problem, hint) when the board cannot be built for this arch, outputs or suite, else None."""
    b = BOARDS.get(board)
    if b is None:
        return "board", f"unknown board {board!r}", f"one of: {', '.join(BOARDS)}"
    a = Architecture(arch)
    if a not in b.boot:
        arches = ", ".join(x.value for x in b.arches)
        return "board", f"{board} is not built for {arch}", f"set `arch: {arches.split(', ')[0]}` ({board}: {arches})"
    if b.suites and suite not in b.suites:
        return ("board", f"{board} does not boot with Debian {suite}'s kernel and U-Boot",
                f"set `debian.suite: {b.suites[0]}` ({board} needs {', '.join(b.suites)})")
    unsupported = [o for o in outputs if o not in b.outputs(a)]
    if unsupported:
        return ("outputs", f"{unsupported[0]!r} cannot boot on {board} ({b.boot_flow(a).value})",
                f"{board} on {arch} supports: {', '.join(b.outputs(a))}")
    return None
