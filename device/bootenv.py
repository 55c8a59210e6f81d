"""The GRUB A/B environment: what GRUB reads at every boot (`stages/55-bootloader/grub.cfg.j2`).

    active     A|B     the committed slot
    trial      ''|A|B  a slot on probation (GRUB boots it at most MAX_TRIES times, counting each)
    tries      0-3     boots of the trial so far
    rolledback ''|A|B  the slot last rolled back from (by GRUB after MAX_TRIES, or by the operator)

Two copies on the ESP, `grubenv` and `grubenv.bak`, each a 1024-byte GRUB environment block. Reads
validate like GRUB does (garbage means "slot A, no trial"); writes go backup first, each through a
temporary file, fsync and rename, so a power cut at any point leaves one valid copy."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

HEADER = "# GRUB Environment Block\n"
BLOCK_BYTES = 1024
SLOTS = ("A", "B")
MAX_TRIES = 3


def other(slot: str) -> str:
    return "B" if slot == "A" else "A"


@dataclass(frozen=True)
class BootEnv:
    active: str = "A"
    trial: str = ""
    tries: int = 0
    rolledback: str = ""

    def normalized(self) -> BootEnv:
        """The state GRUB acts on for these values (grub.cfg validates the same way)."""
        active = self.active if self.active == "B" else "A"
        trial = self.trial if self.trial in SLOTS and self.trial != active else ""
        tries = (self.tries if 0 <= self.tries <= MAX_TRIES else MAX_TRIES) if trial else 0  # no trial: no count
        rolledback = self.rolledback if self.rolledback in SLOTS else ""
        return replace(self, active=active, trial=trial, tries=tries, rolledback=rolledback)

    def render(self) -> bytes:
        body = HEADER + "".join(f"{k}={v}\n" for k, v in (("active", self.active), ("trial", self.trial),
                                                          ("tries", self.tries), ("rolledback", self.rolledback)))
        return body.encode().ljust(BLOCK_BYTES, b"#")


def parse(raw: bytes) -> BootEnv | None:
    """The environment in a block, or None when the block is not a GRUB environment block. As GRUB's
    load_env, the first assignment of each variable counts."""
    if not raw.startswith(HEADER.encode()):
        return None
    values: dict[str, str] = {}
    for line in raw[len(HEADER):].decode("latin-1").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key in ("active", "trial", "tries", "rolledback"):
            values.setdefault(key, value)
    tries = values.get("tries", "0")
    return BootEnv(active=values.get("active", "A"), trial=values.get("trial", ""),
                   tries=int(tries) if tries.isdigit() and len(tries) == 1 else MAX_TRIES,
                   rolledback=values.get("rolledback", "")).normalized()


def fault_point(name: str) -> None:
    """Power-cut tests: MACULAOS_FAULT_PAUSE=<name> stops the command here for an hour."""
    if os.environ.get("MACULAOS_FAULT_PAUSE") == name:
        from .system import log

        log(f"fault injection: paused at {name}")
        import time

        time.sleep(3600)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as `path`, or the old file: tmp file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_leftovers(folder: Path) -> None:
    """Remove the `*.tmp` files an interrupted write left in `folder` (on the ESP they take space)."""
    for tmp in folder.glob("*.tmp") if folder.is_dir() else []:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EnvStore:
    """Both copies of the environment in `grub_dir` (the ESP's /grub)."""

    def __init__(self, grub_dir: Path) -> None:
        self.primary = grub_dir / "grubenv"
        self.backup = grub_dir / "grubenv.bak"

    def _read(self, path: Path) -> BootEnv | None:
        try:
            return parse(path.read_bytes()[:BLOCK_BYTES])
        except OSError:
            return None

    def load(self) -> BootEnv:
        """The copy GRUB would read: the primary, else the backup, else the default state."""
        return self._read(self.primary) or self._read(self.backup) or BootEnv()

    def save(self, env: BootEnv) -> None:
        block = env.normalized().render()
        write_atomic(self.backup, block)
        fault_point("env-backup-written")
        write_atomic(self.primary, block)

    def repair(self) -> str | None:
        """After a power cut between the two writes (or a try count GRUB saved to one copy), make both
        copies equal again, taking the one GRUB reads. Returns what was done, None if nothing."""
        remove_leftovers(self.primary.parent)
        primary = self.primary.read_bytes() if self.primary.is_file() else b""
        backup = self.backup.read_bytes() if self.backup.is_file() else b""
        if parse(primary[:BLOCK_BYTES]) is not None:
            if primary == backup:
                return None
            write_atomic(self.backup, primary)
            return "grubenv.bak resynced from grubenv"
        if parse(backup[:BLOCK_BYTES]) is not None:
            write_atomic(self.primary, backup)
            return "grubenv restored from grubenv.bak"
        return None
