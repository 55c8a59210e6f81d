"""Resolve a profile into a plan: the ordered stages (a DAG walked in dependency order)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput
from .profile import Profile
from .stages import StageMeta, load_stages

# Modules the initrd loads so it can find and mount the boot medium (missing ones are builtin).
INITRD_MODULES: dict[str, list[str]] = {
    "amd64": ["loop", "squashfs", "overlay", "isofs", "sr_mod", "ata_piix", "ahci", "sd_mod",
              "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_console", "nvme", "usb_storage", "uas",
              "xhci_pci", "ehci_pci", "ext4", "vfat", "nls_cp437", "nls_iso8859_1",
              # recovery network
              "virtio_net", "e1000", "e1000e"],
    "arm64": ["loop", "squashfs", "overlay", "isofs", "sr_mod", "sd_mod", "virtio_pci", "virtio_mmio",
              "virtio_blk", "virtio_scsi", "virtio_console", "nvme", "usb_storage", "uas", "xhci_pci",
              "ext4", "vfat", "nls_cp437", "nls_iso8859_1", "virtio_net"],
}

# Packages the boot path itself needs, whatever the profile asks for.
BOOT_PACKAGES = ["sysvinit-core", "openrc", "udev", "kmod", "iproute2", "ifupdown", "udhcpc", "procps",
                 "util-linux", "ca-certificates",
                 # `maculaos install`: partition, format, verify
                 "fdisk", "dosfstools", "e2fsprogs",
                 # node config (config.yaml, the schema shared with the host), firewall, ssh
                 "python3-yaml", "nftables", "openssh-server"]


@dataclass(frozen=True)
class Plan:
    """The stages to build, in order, for one profile."""

    profile: Profile
    stages: tuple[StageMeta, ...]

    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def make_plan(profile: Profile, stages: dict[str, StageMeta] | None = None) -> Plan:
    """Pick the stages the profile's outputs need, dependencies first."""
    stages = stages if stages is not None else load_stages()
    providers = {s.provides: s for s in stages.values() if s.provides}
    wanted: list[StageMeta] = []
    for output in profile.get("outputs"):
        if output not in providers:
            raise BadInput(f"{profile.files[0]}: outputs: no stage provides {output!r}",
                           f"available: {', '.join(sorted(providers))}")
        wanted.append(providers[output])

    ordered: list[StageMeta] = []
    visiting: set[str] = set()

    def visit(stage: StageMeta) -> None:
        if stage in ordered:
            return
        if stage.name in visiting:
            raise BadInput(f"{stage.folder}/stage.yaml: inputs: dependency cycle through {stage.name}",
                           "remove the cycle")
        visiting.add(stage.name)
        for dep in sorted((stages[d] for d in stage.inputs), key=lambda s: s.order):
            visit(dep)
        visiting.discard(stage.name)
        ordered.append(stage)

    for stage in sorted(wanted, key=lambda s: s.order):
        visit(stage)
    arch = profile.arch.value
    for stage in ordered:
        if arch not in stage.arches:
            raise BadInput(f"stage {stage.name} does not support arch {arch}",
                           f"it supports: {', '.join(stage.arches)}")
    return Plan(profile=profile, stages=tuple(ordered))
