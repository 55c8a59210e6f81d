"""A MaculaOS node in a temporary folder: file-backed slots, ESP and data folders, a real minisign key."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from maculaos_device import manifest, updater
from maculaos_device.bootenv import BootEnv, EnvStore
from maculaos_device.manifest import SlotRecord
from maculaos_device.system import Device

SLOT_BYTES = 8 << 20


@dataclass
class FileDevice(Device):
    """The real state machine's view of a node whose slots are files; reboots and health are recorded."""

    slots: dict[str, Path] = field(default_factory=dict)
    reboots: list[bool] = field(default_factory=list)
    unhealthy: str | None = None

    def slot_device(self, slot: str) -> Path:
        return self.slots[slot]

    def mount_esp(self) -> None:
        pass

    def reboot(self, force: bool = False) -> None:
        self.reboots.append(force)

    def health(self) -> str | None:
        return self.unhealthy

    # test helpers
    def boot(self, slot: str, version: str) -> None:
        """What a boot of `slot` leaves behind: the initrd's record and that slot's os-release."""
        (self.run / "slot").write_text(slot + "\n")
        write_release(self.os_release, version)

    @property
    def envs(self) -> EnvStore:
        return EnvStore(self.esp / "grub")


def write_release(path: Path, version: str, profile: str = "test", arch: str = "amd64") -> None:
    path.write_text(f'NAME="MaculaOS"\nVERSION_ID="{version}"\nVARIANT_ID="{profile}"\nMACULAOS_ARCH="{arch}"\n'
                    'MACULAOS_BOARD="generic"\n')


def sign(secret: Path, path: Path) -> None:
    subprocess.run(["minisign", "-S", "-s", str(secret), "-m", str(path)], check=True, capture_output=True)


def make_key(folder: Path) -> tuple[Path, Path]:
    secret, public = folder / "test.key", folder / "test.pub"
    subprocess.run(["minisign", "-G", "-W", "-f", "-p", str(public), "-s", str(secret)], check=True,
                   capture_output=True)
    return secret, public


def make_bundle(folder: Path, secret: Path, version: str, rootfs: bytes | None = None,
                overrides: dict | None = None, chunk_bytes: int = 1 << 20) -> Path:
    """A bundle as stages/80-bundle writes it (signed manifest, payload), with fields overridable; with
    chunk_bytes=0, no chunk list for the rootfs (as bundles before the chunk lists)."""
    folder.mkdir(parents=True)
    payload = {"rootfs.squashfs": rootfs if rootfs is not None else os.urandom(3 << 20) + b"end",
               "vmlinuz": b"kernel " + version.encode(), "initrd.img": b"initrd " + version.encode()}
    for name, data in payload.items():
        (folder / name).write_bytes(data)
    m = {"format": 1, "name": "maculaos", "profile": "test", "version": version, "arch": "amd64", "board": "generic",
         "min_version": "0.0.0", "signing_key_id": manifest.key_id(secret.with_suffix(".pub").read_text()),
         "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in payload.items()}}
    if chunk_bytes:
        data = payload["rootfs.squashfs"]
        m["files"]["rootfs.squashfs"].update(chunk_bytes=chunk_bytes, chunk_blake2b=[
            manifest.chunk_digest(data[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)])
    m.update(overrides or {})
    (folder / "manifest.json").write_text(json.dumps(m))
    sign(secret, folder / "manifest.json")
    return folder


def file_device(root: Path, public_key: Path) -> FileDevice:
    """The node whose files are under `root` (as make_node lays them out)."""
    return FileDevice(run=root / "run", esp=root / "esp", state=root / "data/maculaos", data_root=root / "data",
                      os_release=root / "os-release", update_key=public_key, health_dirs=(),
                      cmdline_path=root / "cmdline", config_root=root / "config-root",
                      slots={s: root / f"slot-{s}.img" for s in "AB"})


def make_node(root: Path, public_key: Path, version: str = "0.1.0") -> FileDevice:
    """An installed node booted to slot A, as the disk image or the installer leaves it."""
    dev = file_device(root, public_key)
    for folder in (dev.run, dev.esp / "grub", dev.esp / "A", dev.state, dev.config_root):
        folder.mkdir(parents=True, exist_ok=True)
    (dev.run / "mode").write_text("disk\n")
    dev.cmdline_path.write_text("macula.mode=disk macula.slot=A\n")
    rootfs = os.urandom(2 << 20)
    dev.slots["A"].write_bytes(rootfs.ljust(SLOT_BYTES, b"\0"))
    dev.slots["B"].write_bytes(bytes(SLOT_BYTES))
    for name in ("vmlinuz", "initrd.img"):
        (dev.esp / "A" / name).write_bytes(name.encode())
    record = SlotRecord(version=version, profile="test", size=len(rootfs), sha256=hashlib.sha256(rootfs).hexdigest())
    updater.record_slot(dev.esp / "A", record)
    dev.envs.save(BootEnv())
    dev.boot("A", version)
    return dev
