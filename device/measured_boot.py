"""What the firmware measures into the TPM, read and predicted: the UEFI event log (TCG PC Client,
crypto-agile format) replayed into PCR values, and the PE/COFF Authenticode digest the firmware extends
into PCR 4 for every EFI application it loads (GRUB, then the kernel GRUB loads through LoadImage).

A key sealed to PCR 4 is bound to the boot loader and the kernel; the value a slot will boot with is
predicted from this boot's event log with the application digests swapped for those of the slot's GRUB
and kernel, so a key can be sealed for a slot before that slot has ever booted (an install, an update).
Pure Python, no TPM needed: unit-tested on files."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
TPM_ALG_SHA256 = 0x000B
PCR_BOOT_CODE = 4  # the boot loader and every EFI application it starts (the kernel)
MAX_EVENT_LOG = 1 << 20  # a firmware's log is tens of KiB: more is not a log
MAX_EVENT_DATA = 1 << 16


class MeasurementError(ValueError):
    """An event log or a PE image that cannot be read as one."""


@dataclass(frozen=True)
class Event:
    pcr: int
    type: int
    digests: dict[int, bytes]  # algorithm id -> digest
    data: bytes


def _unpack(fmt: str, buf: bytes, off: int) -> tuple:
    size = struct.calcsize(fmt)
    if off + size > len(buf):
        raise MeasurementError(f"truncated at byte {off}")
    return struct.unpack_from(fmt, buf, off)


def parse_event_log(log: bytes) -> list[Event]:
    """The events of a crypto-agile log (the first, SHA-1-format event names the digest sizes)."""
    if len(log) > MAX_EVENT_LOG:
        raise MeasurementError(f"{len(log)} bytes is not an event log")
    _pcr, _type, _sha1, size = _unpack("<II20sI", log, 0)
    spec = log[32:32 + size]
    if not spec.startswith(b"Spec ID Event03\0"):
        raise MeasurementError("not a crypto-agile (TCG2) event log")
    (count,) = _unpack("<I", spec, 24)
    sizes = dict(_unpack("<HH", spec, 28 + 4 * i) for i in range(min(count, 16)))
    events, off = [], 32 + size
    while off < len(log):
        pcr, etype, ndigests = _unpack("<III", log, off)
        off += 12
        digests = {}
        for _ in range(min(ndigests, 16)):
            (alg,) = _unpack("<H", log, off)
            if alg not in sizes:
                raise MeasurementError(f"digest algorithm {alg:#x} not in the log's header")
            digests[alg] = log[off + 2:off + 2 + sizes[alg]]
            off += 2 + sizes[alg]
        (dsize,) = _unpack("<I", log, off)
        if dsize > MAX_EVENT_DATA or off + 4 + dsize > len(log):
            raise MeasurementError(f"event data of {dsize} bytes at byte {off}")
        events.append(Event(pcr, etype, digests, log[off + 4:off + 4 + dsize]))
        off += 4 + dsize
    return events


def replay(events: list[Event], pcr: int, alg: int = TPM_ALG_SHA256) -> bytes:
    """The value `pcr` holds after `events` (SHA-256 bank): each digest extended in order."""
    value = bytes(32)
    for event in events:
        if event.pcr == pcr:
            value = hashlib.sha256(value + event.digests[alg]).digest()
    return value


def with_applications(events: list[Event], digests: list[bytes]) -> list[Event]:
    """`events` with the PCR 4 application digests swapped, in load order, for `digests`: the log of a
    boot through other binaries on the same firmware. The number of applications must match."""
    apps = [i for i, e in enumerate(events) if e.pcr == PCR_BOOT_CODE and e.type == EV_EFI_BOOT_SERVICES_APPLICATION]
    if len(apps) != len(digests):
        raise MeasurementError(f"this boot loaded {len(apps)} EFI applications, not {len(digests)} "
                               "(boot loader and kernel)")
    out = list(events)
    for index, digest in zip(apps, digests, strict=True):
        out[index] = Event(PCR_BOOT_CODE, EV_EFI_BOOT_SERVICES_APPLICATION, {TPM_ALG_SHA256: digest}, b"")
    return out


def authenticode_sha256(image: bytes) -> bytes:
    """The PE/COFF Authenticode SHA-256 digest, as UEFI firmware measures a loaded image: the headers
    without the checksum and the certificate-table entry, the sections in file order, then what follows
    them except the certificate table."""
    if image[:2] != b"MZ":
        raise MeasurementError("not a PE image (no MZ header)")
    (pe,) = _unpack("<I", image, 0x3C)
    if image[pe:pe + 4] != b"PE\0\0":
        raise MeasurementError("not a PE image (no PE signature)")
    nsections, opt_size = _unpack("<2xH12xH", image, pe + 4)
    opt = pe + 24
    (magic,) = _unpack("<H", image, opt)
    if magic not in (0x10B, 0x20B):
        raise MeasurementError(f"unknown optional header magic {magic:#x}")
    checksum = opt + 64
    cert_entry = opt + (112 if magic == 0x20B else 96) + 4 * 8  # data directory 4: the certificate table
    (headers_size,) = _unpack("<I", image, opt + 60)
    cert_offset, cert_size = _unpack("<II", image, cert_entry)
    h = hashlib.sha256()
    h.update(image[:checksum])
    h.update(image[checksum + 4:cert_entry])
    h.update(image[cert_entry + 8:headers_size])
    table = opt + opt_size
    sections = [_unpack("<II", image, table + 40 * i + 16) for i in range(nsections)]  # SizeOfRawData, Pointer
    hashed = headers_size
    for raw_offset, raw_size in sorted((offset, size) for size, offset in sections):
        if raw_size:
            h.update(image[raw_offset:raw_offset + raw_size])
            hashed += raw_size
    end = len(image) - (cert_size if cert_offset else 0)
    if end > hashed:
        h.update(image[hashed:end])
    return h.digest()


def boot_code_pcr(events: list[Event], loader: bytes, kernel: bytes) -> bytes:
    """PCR 4 of a boot on this firmware through `loader` (GRUB) and `kernel`, from this boot's events."""
    return replay(with_applications(events, [authenticode_sha256(loader), authenticode_sha256(kernel)]), PCR_BOOT_CODE)


def predict_slot_boot_code(slot: str, esp: Path, event_log: Path = EVENT_LOG) -> bytes:
    """PCR 4 the next boot of `slot` will have: this boot's log, the ESP's boot loader, the slot's kernel."""
    loaders = sorted((esp / "EFI/BOOT").glob("BOOT*.EFI"))
    if len(loaders) != 1:
        raise MeasurementError(f"{esp}/EFI/BOOT holds {len(loaders)} boot loaders, not one")
    try:
        log = event_log.read_bytes()
    except OSError as e:
        raise MeasurementError(f"no firmware event log ({e.strerror}): a TPM and a UEFI boot are needed") from None
    return boot_code_pcr(parse_event_log(log), loaders[0].read_bytes(), (esp / slot / "vmlinuz").read_bytes())


PCR_SYSFS = Path("/sys/class/tpm/tpm0/pcr-sha256")


def measured_pcr(pcr: int, sysfs: Path = PCR_SYSFS) -> bytes:
    """This boot's value of `pcr` (SHA-256 bank), as the kernel reads it from the TPM."""
    try:
        return bytes.fromhex((sysfs / str(pcr)).read_text().strip())
    except (OSError, ValueError) as e:
        raise MeasurementError(f"cannot read PCR {pcr} ({e}): no TPM 2.0?") from None


def sealing_values(pcrs: tuple[int, ...], loader: bytes, kernel: bytes, log: bytes,
                   measured: dict[int, bytes]) -> bytes:
    """The values of `pcrs` (ascending), concatenated as `tpm2 createpolicy -f` reads them, that a boot through
    `loader` and `kernel` on this machine will have: PCR 4 predicted, the others as this boot has them. The
    log must replay to what the TPM holds, or it is not the whole story and nothing is predicted from it."""
    events = parse_event_log(log)
    for pcr in pcrs:
        if replay(events, pcr) != measured[pcr]:
            raise MeasurementError(f"the firmware's event log does not replay to PCR {pcr}: cannot predict from it")
    return b"".join(boot_code_pcr(events, loader, kernel) if pcr == PCR_BOOT_CODE else measured[pcr]
                    for pcr in sorted(pcrs))


def sealing_values_for(pcrs: tuple[int, ...], loader: Path, kernel: Path) -> bytes:
    """sealing_values on this machine: its event log and its TPM's PCRs."""
    try:
        log = EVENT_LOG.read_bytes()
    except OSError as e:
        raise MeasurementError(f"no firmware event log ({e.strerror}): a TPM and a UEFI boot are needed") from None
    return sealing_values(pcrs, loader.read_bytes(), kernel.read_bytes(), log, {p: measured_pcr(p) for p in pcrs})
