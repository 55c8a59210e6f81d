"""The event log replay and the Authenticode digest that PCR 4 predictions rest on (the QEMU encryption test
checks a prediction against what OVMF measured)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from maculaos_device import measured_boot as mb

ALIGN = 0x200


def _pe(sections: list[bytes], *, cert: bytes = b"", checksum: int = 0, reverse_table: bool = False) -> bytes:
    """A PE32+ image: DOS stub, COFF and optional headers, a section table, raw sections, a certificate table."""
    table_at = 0x40 + 4 + 20 + 240
    headers = ALIGN * ((table_at + 40 * len(sections)) // ALIGN + 1)
    offsets, pos = [], headers
    for data in sections:
        offsets.append(pos)
        pos += len(data)
    image = bytearray(headers)
    image[:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x40)
    image[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", image, 0x44, 0x8664, len(sections), 0, 0, 0, 240, 0x22)
    opt = 0x58
    struct.pack_into("<H", image, opt, 0x20B)
    struct.pack_into("<II", image, opt + 60, headers, checksum)
    struct.pack_into("<I", image, opt + 108, 16)
    if cert:
        struct.pack_into("<II", image, opt + 112 + 32, pos, len(cert))
    order = list(range(len(sections)))[::-1] if reverse_table else range(len(sections))
    for slot, i in enumerate(order):
        struct.pack_into("<8sIIII", image, table_at + 40 * slot, f".s{i}".encode(), len(sections[i]), 0x1000 * (i + 1),
                         len(sections[i]), offsets[i])
    return bytes(image) + b"".join(sections) + cert


def _reference(image: bytes) -> bytes:
    """The digest by the spec's recipe, for the images _pe makes (headers then sections in file order)."""
    opt = 0x58
    headers = struct.unpack_from("<I", image, opt + 60)[0]
    cert_at, cert_size = struct.unpack_from("<II", image, opt + 144)
    end = cert_at if cert_size else len(image)
    return hashlib.sha256(image[:opt + 64] + image[opt + 68:opt + 144] + image[opt + 152:headers]
                          + image[headers:end]).digest()


SECTIONS = [b"\x90" * 0x400, b"data" * 0x100, b"\x00" * 0x200]


def test_authenticode_digest_follows_the_recipe():
    image = _pe(SECTIONS, cert=b"C" * 64)
    assert mb.authenticode_sha256(image) == _reference(image)
    assert mb.authenticode_sha256(image) != hashlib.sha256(image).digest()


def test_authenticode_digest_ignores_checksum_and_signature_but_not_code():
    base = mb.authenticode_sha256(_pe(SECTIONS))
    assert mb.authenticode_sha256(_pe(SECTIONS, checksum=0xDEADBEEF)) == base
    signed = _pe(SECTIONS, cert=b"S" * 128)
    assert mb.authenticode_sha256(signed) == mb.authenticode_sha256(_pe(SECTIONS, cert=b"T" * 128))
    assert mb.authenticode_sha256(_pe([b"\x91" + SECTIONS[0][1:], *SECTIONS[1:]])) != base
    # the sections are hashed in file order, whatever order the table lists them in
    reordered = _pe(SECTIONS, reverse_table=True)
    assert mb.authenticode_sha256(reordered) == _reference(reordered)


@pytest.mark.parametrize("image", [b"", b"ZM" + bytes(200), b"MZ" + bytes(58) + struct.pack("<I", 0x40) + b"NE\0\0"])
def test_not_a_pe_image_is_refused(image):
    with pytest.raises(mb.MeasurementError):
        mb.authenticode_sha256(image)


def _log(events: list[tuple[int, int, bytes]]) -> bytes:
    """A crypto-agile log: the Spec ID event (SHA-1 format) naming SHA-256, then TCG_PCR_EVENT2 records."""
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBB", 0, 0, 2, 0, 2) + struct.pack("<IHH", 1, mb.TPM_ALG_SHA256, 32)
    spec += b"\0"
    out = struct.pack("<II20sI", 0, 3, bytes(20), len(spec)) + spec
    for pcr, etype, digest in events:
        out += struct.pack("<IIIH", pcr, etype, 1, mb.TPM_ALG_SHA256) + digest + struct.pack("<I", 3) + b"evt"
    return out


def _digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_replay_extends_each_digest_of_its_pcr_in_order():
    app = mb.EV_EFI_BOOT_SERVICES_APPLICATION
    events = mb.parse_event_log(_log([(4, 0x80000007, _digest("call")), (7, 1, _digest("sb")),
                                      (4, 4, _digest("sep")), (4, app, _digest("grub"))]))
    assert [e.pcr for e in events] == [4, 7, 4, 4] and events[0].data == b"evt"
    want = bytes(32)
    for label in ("call", "sep", "grub"):
        want = hashlib.sha256(want + _digest(label)).digest()
    assert mb.replay(events, 4) == want
    assert mb.replay(events, 8) == bytes(32)  # nothing measured: the reset value


def test_boot_code_prediction_swaps_the_applications_in_load_order():
    loader, kernel, other = _pe(SECTIONS), _pe([b"kernel" * 100]), _pe([b"other" * 100])
    booted = [(4, 0x80000007, _digest("call")), (4, 4, _digest("sep")),
              (4, mb.EV_EFI_BOOT_SERVICES_APPLICATION, mb.authenticode_sha256(loader)),
              (4, mb.EV_EFI_BOOT_SERVICES_APPLICATION, mb.authenticode_sha256(kernel))]
    events = mb.parse_event_log(_log(booted))
    assert mb.boot_code_pcr(events, loader, kernel) == mb.replay(events, 4)
    assert mb.boot_code_pcr(events, loader, other) != mb.replay(events, 4)
    with pytest.raises(mb.MeasurementError, match="loaded 1 EFI applications"):
        mb.boot_code_pcr(mb.parse_event_log(_log(booted[:3])), loader, kernel)


@pytest.mark.parametrize("log", [b"", _log([(4, 1, _digest("x"))])[:-5], b"\0" * 64,
                                 _log([]) + b"\xff" * (mb.MAX_EVENT_LOG + 1)])
def test_a_broken_event_log_is_refused(log):
    with pytest.raises(mb.MeasurementError):
        mb.parse_event_log(log)
