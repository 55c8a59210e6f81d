"""Target architectures and everything each one implies (docker platform, QEMU, GRUB, kernel)."""

from __future__ import annotations

import enum
import platform
from pathlib import Path


class Architecture(enum.Enum):
    """A CPU architecture MaculaOS is built for, named as Debian names it."""

    amd64 = "amd64"
    arm64 = "arm64"

    @classmethod
    def host(cls) -> Architecture:
        """The architecture of the machine we run on."""
        machine = platform.machine()
        return cls.arm64 if machine in ("aarch64", "arm64") else cls.amd64

    @property
    def docker_platform(self) -> str:
        return f"linux/{self.value}"

    @property
    def qemu_binary(self) -> str:
        return {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}[self.value]

    @property
    def qemu_machine(self) -> str:
        return {"amd64": "q35", "arm64": "virt"}[self.value]

    @property
    def qemu_cpu(self) -> str:
        return {"amd64": "max", "arm64": "cortex-a72"}[self.value]

    @property
    def binfmt_name(self) -> str:
        return {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64"}[self.value]

    @property
    def kernel_package(self) -> str:
        return f"linux-image-{self.value}"

    @property
    def grub_efi_packages(self) -> list[str]:
        """Debian packages grub-mkrescue needs to make a bootable ISO for this arch."""
        return {"amd64": ["grub-pc-bin", "grub-efi-amd64-bin"], "arm64": ["grub-efi-arm64-bin"]}[self.value]

    @property
    def grub_efi_target(self) -> str:
        return {"amd64": "x86_64-efi", "arm64": "arm64-efi"}[self.value]

    @property
    def efi_boot_file(self) -> str:
        """Removable-media EFI loader path name the firmware looks for."""
        return {"amd64": "BOOTX64.EFI", "arm64": "BOOTAA64.EFI"}[self.value]

    @property
    def efi_firmware(self) -> list[Path]:
        """Candidate UEFI firmware images for QEMU, first existing one wins."""
        return {
            "amd64": [Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd")],
            "arm64": [Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"), Path("/usr/share/AAVMF/AAVMF_CODE.fd")],
        }[self.value]

    @property
    def image_extra_mb(self) -> int:
        """What this arch adds to an image over amd64: GRUB on arm64 boots the kernel's uncompressed PE Image
        (Debian's kernels have no EFI_ZBOOT), about 32 MB against amd64's 8 MB bzImage."""
        return {"amd64": 0, "arm64": 32}[self.value]

    @property
    def serial_console(self) -> str:
        return {"amd64": "ttyS0", "arm64": "ttyAMA0"}[self.value]

    @property
    def is_native(self) -> bool:
        return self is Architecture.host()

    def __str__(self) -> str:
        return self.value
