"""Resolve a profile into a typed build plan: the stages to build, each for its architecture, in order.

The plan is what every consumer reads (render, dry run, build, manifest, tests): the resolved profile, its
board and arch, SOURCE_DATE_EPOCH, the output names, and the stages as a DAG walked dependencies first.
A stage input written `base@host` is that stage built for the machine we run on: the image-assembly
tools run natively, so for an arm64 image only the root filesystem itself is built under emulation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .arch import Architecture
from .boards import Board
from .errors import BadInput, BuildFailed
from .profile import Profile
from .stages import StageMeta, load_stages

# An encrypted data partition (maculaos_device.encryption): the ciphers by their crypto API aliases (whichever
# modules provide them in this kernel: aesni or the arm64 CE ones, chacha's generic or SIMD code), then
# dm-crypt, so they load with it. The initrd has no modprobe for the kernel to ask for them later. `?`: where the
# kernel has it (7.x folded nhpoly1305 into a library adiantum links, so no module answers to that alias).
_ENCRYPTION = ["algif-skcipher", "crypto-aes", "crypto-xts", "?crypto-xchacha12", "?crypto-nhpoly1305",
               "crypto-adiantum", "dm_crypt"]
# Modules the initrd loads so it can find and mount the boot medium (missing ones are builtin).
INITRD_MODULES: dict[str, list[str]] = {
    "amd64": ["loop", "squashfs", "overlay", "isofs", "sr_mod", "ata_piix", "ahci", "sd_mod",
              "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_console", "nvme", "usb_storage", "uas",
              "xhci_pci", "ehci_pci", "ext4", "vfat", "nls_cp437", "nls_iso8859_1", "nls_ascii",
              # recovery: its network, and USB keyboards (the console's, once xhci took the controller from the BIOS)
              "virtio_net", "e1000", "e1000e", "usbhid", "hid_generic",
              *_ENCRYPTION],
    "arm64": ["loop", "squashfs", "overlay", "isofs", "sr_mod", "sd_mod", "virtio_pci", "virtio_mmio",
              "virtio_blk", "virtio_scsi", "virtio_console", "nvme", "usb_storage", "uas", "xhci_pci",
              "ext4", "vfat", "nls_cp437", "nls_iso8859_1", "nls_ascii", "virtio_net", "usbhid", "hid_generic",
              *_ENCRYPTION],
}

# Packages the boot path itself needs, whatever the profile asks for.
BOOT_PACKAGES = ["sysvinit-core", "openrc", "udev", "kmod", "iproute2", "ifupdown", "udhcpc", "procps",
                 "util-linux", "ca-certificates",
                 # udev and openssh-server want a sysusers: this one, not trixie's whole systemd (10 MB)
                 "systemd-standalone-sysusers",
                 # `maculaos install`: partition, format, verify
                 "fdisk", "dosfstools", "e2fsprogs",
                 # an encrypted data partition (maculaos_device.encryption): made by the installer, opened by the initrd
                 "cryptsetup-bin",
                 # ... and its tpm key source: sealed by the installer and by an update for the slot it writes
                 "tpm2-tools",
                 # ... and its network key source (a Tang server's: jose; the HTTP: busybox's wget, which udhcpc brings)
                 "jose",
                 # node config (config.yaml, the schema shared with the host), firewall, ssh
                 "python3-yaml", "nftables", "openssh-server",
                 # `maculaos upgrade`: bundle signatures
                 "minisign",
                 # the clock: boards without an RTC start in 1970, and TLS and pointer expiry need the time
                 "chrony"]

HOST = "@host"


@dataclass(frozen=True)
class PlannedStage:
    """One stage to build: its metadata, the arch its result is for, and the plan keys of its inputs."""

    key: str  # `base`, or `base@host` for the host-arch twin of a target stage in a cross build
    meta: StageMeta
    arch: Architecture
    inputs: tuple[tuple[str, str], ...]  # (name the template uses, plan key)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build will do, decided before anything runs."""

    profile: Profile
    sde: int
    stages: tuple[PlannedStage, ...]

    @property
    def arch(self) -> Architecture:
        return self.profile.arch

    @property
    def board(self) -> Board:
        return self.profile.board

    @property
    def basename(self) -> str:
        return self.profile.artifact_basename()

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.profile.settings.outputs

    @property
    def cross(self) -> bool:
        """True when the target arch is not the host's: only target stages run under emulation."""
        return not self.arch.is_native

    def names(self) -> list[str]:
        return [s.key for s in self.stages]


def source_date_epoch(profile: Profile) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the profile's fixed value."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise BuildFailed(f"SOURCE_DATE_EPOCH={env!r} is not a number", "unset it or give seconds since 1970")
        return int(env)
    return profile.settings.source_date_epoch


def make_plan(profile: Profile, stages: dict[str, StageMeta] | None = None, sde: int | None = None) -> BuildPlan:
    """Pick the stages the profile's outputs need, dependencies first, each for its arch."""
    stages = stages if stages is not None else load_stages()
    providers = {s.provides: s for s in stages.values() if s.provides}
    wanted: list[StageMeta] = []
    for output in profile.settings.outputs:
        if output not in providers:
            raise BadInput(f"{profile.files[0]}: outputs: no stage provides {output!r}",
                           f"available: {', '.join(sorted(providers))}")
        wanted.append(providers[output])
    target, host = profile.arch, Architecture.host()

    ordered: dict[str, PlannedStage] = {}
    visiting: set[str] = set()

    def visit(stage: StageMeta, arch: Architecture) -> str:
        key = stage.name if arch is target else stage.name + HOST
        if key in ordered:
            return key
        if key in visiting:
            raise BadInput(f"{stage.folder}/stage.yaml: inputs: dependency cycle through {stage.name}",
                           "remove the cycle")
        visiting.add(key)
        inputs = []
        for dep in sorted(stage.inputs, key=lambda d: stages[d.removesuffix(HOST)].order):
            dep_name = dep.removesuffix(HOST)
            inputs.append((dep_name, visit(stages[dep_name], host if dep.endswith(HOST) else arch)))
        visiting.discard(key)
        if arch.value not in stage.arches:
            raise BadInput(f"stage {stage.name} does not support arch {arch}",
                           f"it supports: {', '.join(stage.arches)}")
        ordered[key] = PlannedStage(key=key, meta=stage, arch=arch, inputs=tuple(inputs))
        return key

    for stage in sorted(wanted, key=lambda s: s.order):
        visit(stage, target)
    return BuildPlan(profile=profile, sde=source_date_epoch(profile) if sde is None else sde,
                     stages=tuple(ordered.values()))
