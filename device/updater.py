"""The update state machine of an installed node (RAUC-like, over the GRUB env of `bootenv`).

    committed(active=X)  --apply-->     trial(Y)      Y written, read back, boot files checked; GRUB
                                                      boots Y at most 3 times, counting each boot
    trial(Y), booted Y   --confirm-->   committed(Y)  health checks passed
    trial(Y), booted Y   --unhealthy--> reboot        (GRUB gives up after 3 tries: committed(X), rolledback=Y)
    committed(X)         --rollback-->  trial(Y)      only a verified Y; the same counting and health gate

A slot is "verified" when `<esp>/<slot>/slot.json` exists: it is written after the slot read back as its
signed sha256, and removed (with the slot's kernel and initrd, and the slot's first MiB zeroed) before a
single byte of a new image is written. Every failure of an apply leaves the target in that state."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import bootenv, luks, manifest, versions
from .bootenv import EnvStore, other
from .manifest import Manifest, SlotRecord
from .system import Device, DeviceError, log

if TYPE_CHECKING:
    from .source import Source, Stream

CHUNK = 4 << 20
ALIGN = 4096
INVALIDATE_BYTES = 1 << 20
BOOT_FILES = ("vmlinuz", "initrd.img")
DEFAULT_CONFIRM_SECONDS = 600


def store(dev: Device) -> EnvStore:
    dev.mount_esp()
    return EnvStore(dev.esp / "grub")


def need_disk(dev: Device) -> None:
    if dev.mode() != "disk":
        raise DeviceError(f"not an installed system (mode {dev.mode()}): nothing to do")


# --- slot records --------------------------------------------------------------------------------
def slot_record(dev: Device, slot: str) -> SlotRecord | None:
    """The verified content of `slot`, or None when the slot holds nothing bootable."""
    folder = dev.esp / slot
    if not all((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in BOOT_FILES):
        return None
    try:
        return manifest.parse_slot_record((folder / "slot.json").read_bytes())
    except (OSError, manifest.ManifestError):
        return None


def record_slot(folder: Path, record: SlotRecord) -> None:
    """The one writer of a slot record (`<esp>/<slot>/slot.json`), once the slot read back as its signed sha256
    (`apply`, the installer); atomic, so a power cut leaves no record or the whole one."""
    bootenv.write_atomic(folder / "slot.json", record.to_json().encode())


def forget_slot(dev: Device, slot: str, device: Path) -> None:
    """Nothing of `slot` stays bootable: record and boot files removed, the filesystem's start zeroed."""
    folder = dev.esp / slot
    for name in ("slot.json", *BOOT_FILES):
        (folder / name).unlink(missing_ok=True)
    bootenv.remove_leftovers(folder)
    invalidate(device)


def invalidate(device: Path) -> None:
    """No filesystem is found at the start of `device` any more."""
    with open(device, "r+b") as f:
        f.write(bytes(INVALIDATE_BYTES))
        f.flush()
        os.fsync(f.fileno())


def slot_version(dev: Device, slot: str) -> str | None:
    if slot == dev.booted():
        return dev.release().get("VERSION_ID")
    record = slot_record(dev, slot)
    return record.version if record else None


# --- status and bundle checks --------------------------------------------------------------------
def status(dev: Device) -> dict:
    version = dev.release().get("VERSION_ID", "")
    if dev.mode() != "disk":
        return {"mode": dev.mode(), "version": version, "booted": None, "active": None, "trial": None, "tries": 0,
                "rolledback": None, "slots": {}}
    env = store(dev).load()
    return {"mode": "disk", "version": version, "booted": dev.booted() or None, "active": env.active,
            "trial": env.trial or None, "tries": env.tries, "rolledback": env.rolledback or None,
            "slots": {s: {"version": slot_version(dev, s)} for s in ("A", "B")}}


def highest_committed(dev: Device) -> str | None:
    try:
        value = dev.highest_file.read_text().strip()
    except OSError:
        return None
    return value if versions.PATTERN.fullmatch(value) else None


def record_committed(dev: Device) -> None:
    """Raise the anti-rollback floor to the running version (never lowers it)."""
    running = dev.release().get("VERSION_ID", "")
    highest = highest_committed(dev)
    if not versions.PATTERN.fullmatch(running) or (highest and not versions.newer(running, highest)):
        return
    bootenv.write_atomic(dev.highest_file, (running + "\n").encode())


def signed(dev: Device, data: bytes, signature: bytes) -> bool:
    """`signature` is a minisign signature of exactly `data` by the update key in the read-only root."""
    if not dev.update_key.is_file() or dev.update_key.stat().st_size == 0:
        raise DeviceError(f"no update key at {dev.update_key}: refusing unsigned updates")
    with tempfile.TemporaryDirectory(dir=dev.run, prefix="verify.") as tmp:
        (Path(tmp) / "data").write_bytes(data)
        (Path(tmp) / "data.minisig").write_bytes(signature)
        proc = subprocess.run(["minisign", "-Vqm", f"{tmp}/data", "-p", str(dev.update_key)], capture_output=True)
    return proc.returncode == 0


def verify_pointer(dev: Device, raw: bytes, signature: bytes, channel: str, now: int) -> manifest.Pointer:
    """A channel pointer this node may follow: signed, for its profile, arch and channel, not expired, and not
    older than the last one it followed (kept on the data partition)."""
    if not signed(dev, raw, signature):
        raise DeviceError(f"the {channel} channel pointer's signature does not verify against {dev.update_key}")
    try:
        p = manifest.parse_pointer(raw)
    except manifest.ManifestError as exc:
        raise DeviceError(f"the {channel} channel pointer is not valid ({exc})") from None
    rel = dev.release()
    if (p.profile, p.arch, p.channel) != (rel.get("VARIANT_ID"), rel.get("MACULAOS_ARCH"), channel):
        raise DeviceError(f"the {channel} channel pointer is for {p.profile}-{p.arch} on {p.channel}: refused")
    floor = clock_floor(dev, p)
    if now < floor:
        raise DeviceError(f"this node's clock ({now}) is behind {floor}, a time it already trusts (the image's build "
                          f"or a signed channel pointer): it cannot tell whether the {channel} channel is current; "
                          "wait for the clock to be set (chronyc tracking) or set it, then try again")
    if p.expires <= now:
        raise DeviceError(f"the {channel} channel pointer expired {now - p.expires} s ago: the update server is stale "
                          "or replays an old state (publish again to refresh it)")
    seen = _seen_pointers(dev)
    if p.published < seen.get(channel, 0):
        raise DeviceError(f"the {channel} channel pointer (published {p.published}) is older than one this node "
                          f"already followed ({seen[channel]}): a replay, refused")
    if p.published > seen.get(channel, 0):
        seen[channel] = p.published
        bootenv.write_atomic(dev.seen_pointers_file, (json.dumps(seen, sort_keys=True) + "\n").encode())
    return p


# How far behind a publisher's clock a node's may be before a pointer's signing time says it is wrong.
CLOCK_SKEW = 3600


def clock_floor(dev: Device, pointer: manifest.Pointer | None = None) -> int:
    """The earliest time this node's clock can truly show: when its image was built, and (less a skew) when the
    newest channel pointer it followed, or the one in hand, was signed. Below it, expiry dates mean nothing."""
    build = dev.release().get("MACULAOS_BUILD_TIME", "")
    signed_times = [*_seen_pointers(dev).values(), *([pointer.published] if pointer else [])]
    return max([int(build) if build.isascii() and build.isdigit() else 0,
                *(t - CLOCK_SKEW for t in signed_times)])


def _seen_pointers(dev: Device) -> dict[str, int]:
    try:
        data = json.loads(dev.seen_pointers_file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def verify_bundle(dev: Device, src: Source) -> Manifest:
    """Fetch the manifest and its signature, check both; nothing is written to any slot."""
    raw = src.read("manifest.json", manifest.MAX_MANIFEST_BYTES)
    if not signed(dev, raw, src.read("manifest.json.minisig", manifest.MAX_SIGNATURE_BYTES)):
        raise DeviceError(f"bundle signature does not verify against {dev.update_key}: refused, nothing written")
    pinned = src.pinned
    if pinned and hashlib.sha256(raw).hexdigest() != pinned.manifest_sha256:
        raise DeviceError(f"{src.where('manifest.json')} is not the manifest the {pinned.channel} channel pointer "
                          f"names (sha256 {pinned.manifest_sha256[:16]}...): another signed bundle in its place, "
                          "refused, nothing written")
    try:
        m = manifest.parse(raw)
    except manifest.ManifestError as exc:
        raise DeviceError(f"manifest.json is not a valid bundle manifest ({exc}): refused") from None
    if pinned and m.version != pinned.version:  # same digest, so only a pointer signed wrongly gets here
        raise DeviceError(f"the {pinned.channel} channel pointer names {pinned.version}, the bundle is {m.version}: "
                          "refused")
    ours = manifest.key_id(dev.update_key.read_text(errors="replace"))
    if m.signing_key_id and m.signing_key_id != ours:
        raise DeviceError(f"manifest names signing key {m.signing_key_id}, but this node's key is {ours}: refused")
    rel = dev.release()
    if m.arch != rel.get("MACULAOS_ARCH"):
        raise DeviceError(f"bundle is for {m.arch}, this machine is {rel.get('MACULAOS_ARCH')}: refused")
    if m.board != rel.get("MACULAOS_BOARD"):
        raise DeviceError(f"bundle is for board {m.board}, not {rel.get('MACULAOS_BOARD')}: refused")
    if m.profile != rel.get("VARIANT_ID"):
        raise DeviceError(f"bundle is for profile {m.profile}, this node runs {rel.get('VARIANT_ID')}: refused")
    running = rel.get("VERSION_ID", "")
    if versions.newer(m.min_version, running):
        raise DeviceError(f"bundle needs version >= {m.min_version}, running {running}: refused")
    return m


def downgrade_reason(dev: Device, m: Manifest) -> str | None:
    """Why applying `m` would not move this node forward, or None."""
    running = dev.release().get("VERSION_ID", "")
    if not versions.newer(m.version, running):
        return f"bundle version {m.version} is not newer than the running {running}"
    highest = highest_committed(dev)
    if highest and not versions.newer(m.version, highest):
        return f"bundle version {m.version} is not newer than {highest}, the highest this node ever committed"
    return None


def check(dev: Device, src: Source) -> dict:
    m = verify_bundle(dev, src)
    return {"current": dev.release().get("VERSION_ID", ""), "available": m.version,
            "update": downgrade_reason(dev, m) is None}


# --- apply ----------------------------------------------------------------------------------------
def _is_block(path: Path) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def _fill(stream: Stream, view: memoryview) -> int:
    """Read until `view` is full or the stream ends; returns the bytes read."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def write_slot(stream: Stream, device: Path, size: int, step: int = CHUNK,
               written: Callable[[int], None] | None = None) -> None:
    """Exactly `size` bytes of `stream` to the start of `device` in `step`-byte chunks, with direct I/O on block
    devices; `written(i)` is called once chunk i is on the device. A stream that ends early or runs past `size`
    fails."""
    direct = _is_block(device)
    fd = os.open(device, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, step)  # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    try:
        done = 0
        while done < size:
            want = min(step, size - done)
            n = _fill(stream, view[:want])
            if n < want:
                raise DeviceError(f"the download ended after {done + n} of {size} bytes")
            padded = -(-n // ALIGN) * ALIGN if direct else n
            view[n:padded] = bytes(padded - n)
            os.write(fd, view[:padded])
            if written:
                written(done // step)
            done += n
        if stream.read(1):
            raise DeviceError(f"the download is longer than the signed {size} bytes")
        os.fsync(fd)
    finally:
        view.release()
        buf.close()
        os.close(fd)


def read_back_sha256(device: Path, size: int) -> str:
    """sha256 of the first `size` bytes as the device holds them, not as a cache remembers them."""
    direct = _is_block(device)
    fd = os.open(device, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    if not direct:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    digest = hashlib.sha256()
    try:
        done = 0
        while done < size:
            want = min(CHUNK, -(-(size - done) // ALIGN) * ALIGN)
            n = os.readv(fd, [view[:want]])
            if n <= 0:
                break
            take = min(n, size - done)
            digest.update(view[:take])
            done += take
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return digest.hexdigest() if done == size else ""


class ChunkChecker:
    """Reads chunks of the slot back from the device (not from a cache) and checks each against the signed
    chunk list, on one worker thread per CPU (at most 4): hashing and reads run outside the GIL, so the workers
    check while the main thread downloads and writes the next chunk. `submit(i)` queues chunk i; `finish()`
    says whether every chunk was checked and matched."""

    def __init__(self, device: Path, entry: manifest.FileEntry, workers: int = 0) -> None:
        self.entry = entry
        self.todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.good: list[int] = []
        self.bad: list[int] = []
        count = max(1, min(workers or os.cpu_count() or 1, 4))
        self.threads = [threading.Thread(target=self._work, args=(device,), daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, index: int) -> None:
        self.todo.put(index)

    def finish(self) -> bool:
        for _ in self.threads:
            self.todo.put(None)
        for thread in self.threads:
            thread.join()
        return not self.bad and sorted(self.good) == list(range(len(self.entry.chunks)))

    def _work(self, device: Path) -> None:
        entry, direct = self.entry, _is_block(device)
        fd = os.open(device, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        buf = mmap.mmap(-1, entry.chunk_bytes)
        view = memoryview(buf)
        try:
            while (i := self.todo.get()) is not None:
                if self.bad or not 0 <= i < len(entry.chunks):
                    self.bad.append(i)
                    continue
                offset = i * entry.chunk_bytes
                want = min(entry.chunk_bytes, entry.size - offset)
                if not direct:  # a file (tests): past the page cache as far as the kernel lets us
                    os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
                got = os.preadv(fd, [view[: -(-want // ALIGN) * ALIGN]], offset)
                ok = got >= want and manifest.chunk_digest(view[:want]) == entry.chunks[i]
                (self.good if ok else self.bad).append(i)
        except OSError:
            self.bad.append(-1)
        finally:
            view.release()
            buf.close()
            os.close(fd)


def write_checked(stream: Stream, device: Path, entry: manifest.FileEntry) -> bool:
    """write_slot, each chunk read back and checked against the signed chunk list while the next one is
    downloaded; whether all of them matched. A read right after the write is as strong a check as one after
    fsync: with O_DIRECT both come from the device, whose own cache may serve either."""
    checker = ChunkChecker(device, entry)
    try:
        write_slot(stream, device, entry.size, step=entry.chunk_bytes, written=checker.submit)
    finally:
        ok = checker.finish()
    return ok


def fetch_boot_files(src: Source, m: Manifest, folder: Path) -> None:
    """The bundle's kernel and initrd into `folder`, each checked against its signed sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in BOOT_FILES:
        entry = m.files[name]
        data = src.read(name, entry.size)
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DeviceError(f"{name} does not match the signed sha256: refused")
        tmp = folder / f"{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    for name in BOOT_FILES:
        os.replace(folder / f"{name}.tmp", folder / name)
    bootenv.fsync_dir(folder)


def write_payload(src: Source, m: Manifest, device: Path, boot_folder: Path) -> None:
    """The signed rootfs into the slot device, read back and checked, and the kernel and initrd into the slot's
    boot folder, fetched and checked at the same time on a thread of their own; raises DeviceError or OSError."""
    rootfs = m.files["rootfs.squashfs"]
    boot_failed: list[BaseException] = []

    def fetch_boot() -> None:
        try:
            fetch_boot_files(src, m, boot_folder)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            boot_failed.append(exc)

    fetcher = threading.Thread(target=fetch_boot)
    fetcher.start()
    try:
        stream, _ = src.open("rootfs.squashfs", rootfs.size)
        with stream:
            if rootfs.chunks:  # each chunk is read back while the next one downloads
                verified = write_checked(stream, device, rootfs)
            else:  # a bundle without a chunk list: written, then read back whole
                write_slot(stream, device, rootfs.size)
                verified = read_back_sha256(device, rootfs.size) == rootfs.sha256
    finally:
        fetcher.join()
    if boot_failed:
        raise boot_failed[0]
    if not verified:
        raise DeviceError("the slot does not read back as the signed rootfs.squashfs (a corrupt or tampered "
                          "download, or bad storage)")


def apply(dev: Device, src: Source, allow_downgrade: bool = False) -> str:
    """Write the bundle to the standby slot and put it on trial; returns the slot."""
    need_disk(dev)
    envs = store(dev)
    env = envs.load()
    booted = dev.booted()
    if booted != env.active:
        raise DeviceError(f"booted slot {booted} is not the committed slot {env.active}: confirm or roll back first")
    if env.trial:
        raise DeviceError(f"an update to slot {env.trial} is pending: reboot into it or roll back first")
    m = verify_bundle(dev, src)
    reason = downgrade_reason(dev, m)
    if reason and not allow_downgrade:
        raise DeviceError(f"{reason}: refused (maculaos upgrade --apply ... --allow-downgrade to force)")
    target = other(env.active)
    device = dev.slot_device(target)
    rootfs = m.files["rootfs.squashfs"]
    capacity = _capacity(device)
    if rootfs.size > capacity:
        raise DeviceError(f"rootfs ({rootfs.size} bytes) is larger than slot {target} ({capacity} bytes)")
    forget_slot(dev, target, device)
    log(f"writing {m.version} to slot {target} ({device})")
    try:
        write_payload(src, m, device, dev.esp / target)
        record = SlotRecord(version=m.version, profile=m.profile, size=rootfs.size, sha256=rootfs.sha256)
        record_slot(dev.esp / target, record)
        luks.seal_for_slot(dev, target, booted)
        envs.save(replace(env, trial=target, tries=0, rolledback=""))
    except BaseException as exc:
        forget_slot(dev, target, device)
        if isinstance(exc, DeviceError):
            raise DeviceError(f"{exc}: slot {target} invalidated, boot state unchanged") from None
        if isinstance(exc, OSError):
            raise DeviceError(f"writing slot {target} failed ({exc}): slot {target} invalidated, "
                              "boot state unchanged") from None
        raise
    log(f"slot {target} holds {m.version} on trial; it is committed after a healthy boot")
    return target


def _capacity(device: Path) -> int:
    with open(device, "rb") as f:
        return f.seek(0, os.SEEK_END)


# --- rollback, confirm, watchdog ------------------------------------------------------------------
def rollback(dev: Device, force: bool = False) -> str:
    """Put the other slot on trial (counted and health-gated like an update); returns the slot."""
    need_disk(dev)
    envs = store(dev)
    env = envs.load()
    booted = dev.booted()
    if booted != env.active or env.trial:
        raise DeviceError(f"rollback needs a committed system (booted {booted}, active {env.active}, "
                          f"trial {env.trial or 'none'})")
    target = other(booted)
    record = slot_record(dev, target)
    if record is None:
        raise DeviceError(f"slot {target} holds no verified system to roll back to")
    if env.rolledback == target and not force:
        raise DeviceError(f"slot {target} is the one last rolled back from: refused (--force to boot it anyway)")
    if read_back_sha256(dev.slot_device(target), record.size) != record.sha256:
        raise DeviceError(f"slot {target} no longer reads back as the {record.version} it was verified as: refused")
    envs.save(replace(env, trial=target, tries=0, rolledback=booted))
    log(f"slot {target} ({record.version}) is on trial; it is committed after a healthy boot")
    return target


def confirm(dev: Device) -> str:
    """Boot service: repair the env, then commit a healthy trial (or reboot an unhealthy one)."""
    if dev.mode() != "disk":
        return "not an installed system"
    envs = store(dev)
    done = envs.repair()
    if done:
        log(done)
    for slot in ("A", "B"):
        bootenv.remove_leftovers(dev.esp / slot)
    env = envs.load()
    booted = dev.booted()
    if not env.trial or env.trial != booted:
        if booted == env.active:
            record_committed(dev)
        return "nothing on trial"
    why = dev.health()
    if why:
        log(f"slot {booted} failed its health check ({why}): rebooting (try {env.tries} of {bootenv.MAX_TRIES})")
        dev.reboot()
        return "rebooting"
    envs.save(replace(env, active=booted, trial="", tries=0))
    record_committed(dev)
    log(f"slot {booted} passed its health checks: committed")
    return "committed"


def confirm_seconds(dev: Device) -> int:
    for arg in dev.cmdline().split():
        if arg.startswith("macula.confirm_timeout=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return DEFAULT_CONFIRM_SECONDS


def trial_booted(dev: Device) -> bool:
    if dev.mode() != "disk":
        return False
    env = store(dev).load()
    return bool(env.trial) and env.trial == dev.booted()


def watchdog_expired(dev: Device, seconds: int) -> None:
    """Called once the deadline passed: a trial still unconfirmed is rebooted."""
    if trial_booted(dev):
        log(f"trial slot {dev.booted()} not confirmed within {seconds} s: rebooting")
        dev.reboot(force=True)
