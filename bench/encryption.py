#!/usr/bin/env python3
"""What encrypting the data partition costs (issue 25): the same test ISO installed four times in one live boot
(UEFI, with a TPM: swtpm), plain and encrypted three times (LUKS2, unattended: a USB key disk; the node's TPM; a
Tang server on the host, Debian's tangd), then each disk booted N times and timed, under TCG (the TPM disk once
more first, untimed: its first boot re-seals the installer's key).

Prints, plain vs USB key vs TPM vs Tang (the network key source; its unlock includes the initrd's DHCP): seconds
from QEMU's start to the initrd's slot line, to the data partition mounted (the unlock in between), to the test
shell; `maculaos upgrade --apply` of the 0.2.0 bundle; a 64 MiB write with fsync to the data partition; and in
the guest `cryptsetup benchmark` of both ciphers the config offers (the guest CPU is QEMU's `max` model under TCG:
AES instructions emulated in software). Then the initrd's size without what encryption adds (cryptsetup, mke2fs,
their libraries, dm-crypt and cipher modules; tpm2-tools and the libraries only it links: the TSS, libcurl's chain;
jose and its libraries), with the LUKS part only, with the TPM's too, and whole, each recompressed as the build does
(zstd -19).
Needs out/maculaos-test-0.1.0-amd64.iso and out/update/maculaos-test-0.2.0-amd64.bundle (`make test`).
Usage: python bench/encryption.py [--boots 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maculaos_device import encryption  # noqa: E402

from maculaos_sdk.node_machine import MaculaMachine  # noqa: E402
from maculaos_sdk.publish import serve  # noqa: E402
from maculaos_sdk.vm import VmConfig  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from tang_server import TangServer  # noqa: E402

ISO = ROOT / "out" / "maculaos-test-0.1.0-amd64.iso"
BUNDLE = ROOT / "out" / "update" / "maculaos-test-0.2.0-amd64.bundle"
# what the initrd carries only for LUKS (collect.sh, plan.INITRD_MODULES)
LUKS_FILES = re.compile(r"(sbin/(cryptsetup|mke2fs|mkfs\.ext4)|lib/modules/.*(dm-|xts|aesni|adiantum|chacha|"
                              r"nhpoly|poly1305|algif|af_alg).*|.*/lib(cryptsetup|argon2|json-c|devmapper|ssl|crypto|"
                              r"ext2fs|e2p|com_err|popt|blkid|uuid|selinux|pcre2-8|udev|cap|zstd)\.so.*)$")
# what only tpm2-tools brings (its TSS, and libcurl-gnutls with everything it links; libssl and libcrypto are
# cryptsetup's too)
TPM_FILES = re.compile(r"(bin/tpm2|.*/lib(tss2-[a-z-]+|curl-gnutls|gnutls|p11-kit|unistring|idn2|nettle|hogweed|gmp|"
                       r"tasn1|ffi|krb5|krb5support|k5crypto|gssapi_krb5|ldap|lber|sasl2|rtmp|ssh2|psl|nghttp[23]|"
                       r"ngtcp2(_crypto_gnutls)?|brotli(dec|common)|keyutils)\.so.*)$")
# what only the network key source brings (jose; busybox's wget and udhcpc were there before)
NETWORK_FILES = re.compile(r"(bin/jose|.*/lib(jose|jansson)\.so.*)$")


DISKS = {"plain": None, "usb": ["usb"], "tpm": ["tpm"], "network": ["network"]}  # name -> key sources (None: plain)


def install_all(work: Path, tpm: Path, tang: TangServer) -> tuple[dict[str, Path], Path]:
    """One live boot (UEFI, the node's TPM): each of DISKS installed to its own virtio disk."""
    disks = {name: work / f"{name}-amd64.qcow2" for name in DISKS}
    for disk in disks.values():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True)
    stick = work / "key.img"
    subprocess.run(["truncate", "-s", "16M", str(stick)], check=True)
    subprocess.run(["mkfs.vfat", "-n", encryption.USB_LABEL, str(stick)], check=True, capture_output=True)
    cfg = VmConfig.for_image(ISO, disks=tuple(disks.values()), usb_sticks=(stick,), uefi=True)
    m = MaculaMachine("bench-install", cfg, work, tpm_state=tpm)
    m.start()
    try:
        m.wait_for_channel(timeout=300)
        for n, (name, sources) in enumerate(DISKS.items()):
            option = ""
            if sources:
                config = {"storage": {"encryption": {"enabled": True, "key_sources": sources,
                                                     "tang_url": f"http://10.0.2.2:{tang.port}",
                                                     "tang_thp": tang.thumbprint()}}}
                m.write_file(f"/tmp/{name}.yaml", json.dumps(config).encode())
                option = f"--config /tmp/{name}.yaml"
            m.succeed(f"maculaos install --device /dev/vd{'abcd'[n]} {option} --yes", timeout=900)
        m.send_channel_nowait("poweroff")
        m.wait_for_poweroff(timeout=120)
    finally:
        m.close()
    return disks, stick


def timed(m: MaculaMachine, command: str) -> float:
    out = m.succeed(f"s=$(date +%s.%N); {command} >/tmp/bench.out 2>&1 || echo FAILED; e=$(date +%s.%N); "
                    "awk \"BEGIN{print $e-$s}\"", timeout=900)
    if out.startswith("FAILED"):
        raise SystemExit(f"bench: `{command}` failed in the guest:\n{m.succeed('cat /tmp/bench.out')}")
    return float(out.strip().splitlines()[-1])


def boot_once(name: str, disk: Path, stick: Path, work: Path, tpm: Path, url: str | None) -> dict[str, float]:
    """Boot `disk` (DISKS[name]) once: milestones, and with `url` the update apply and the data write."""
    m = MaculaMachine("bench-boot", VmConfig.for_image(disk, usb_sticks=(stick,)), work, tpm_state=tpm)
    m.start()
    try:
        m.wait_for_console_text(r"maculaos-init: slot A", timeout=300)
        seen = {"slot line (s)": time.monotonic() - m.started_at}
        if DISKS[name]:  # encrypted: the unlock
            m.wait_for_console_text(r"maculaos-luks: unlocked with", timeout=300)
            seen["unlock (s)"] = time.monotonic() - m.started_at - seen["slot line (s)"]
        m.wait_for_channel(timeout=300)
        seen["test shell (s)"] = time.monotonic() - m.started_at
        if url:
            m.wait_until_booted()  # the boot's own confirm is done: an apply now is not refused for its lock
            seen["upgrade --apply (s)"] = timed(m, f"maculaos upgrade --apply {url} --no-reboot")
            env = "/run/maculaos/esp/grub/grubenv"  # no trial: the next boots are of slot A again
            m.succeed(f"sed -i 's/^trial=B$/trial=#/' {env} {env}.bak && sync")
            seen["64 MiB write + fsync (s)"] = timed(m, "dd if=/dev/zero of=/var/lib/data/bench bs=1M count=64 "
                                                        "conv=fsync && rm /var/lib/data/bench")
        return seen
    finally:
        m.close()


def ciphers(disk: Path, stick: Path, work: Path) -> dict[str, str]:
    m = MaculaMachine("bench-ciphers", VmConfig.for_image(disk, usb_sticks=(stick,)), work)  # the USB key
    m.start()
    try:
        m.wait_for_boot()
        out = {}
        for cipher in encryption.Cipher:
            size = 512 if cipher is encryption.Cipher.aes_xts else 256
            text = m.succeed(f"cryptsetup benchmark --cipher {cipher.value} --key-size {size} 2>&1 | tail -n 1",
                             timeout=300)
            out[cipher.value] = " ".join(text.split()[-4:])  # encryption and decryption speed
        return out
    finally:
        m.close()


def cpio_entries(data: bytes) -> list[tuple[str, bytes]]:
    """(name, raw bytes of the entry) for each entry of a newc cpio archive, the trailer left out."""
    entries, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 110]
        namesize, filesize = int(header[94:102], 16), int(header[54:62], 16)
        name_end = pos + 110 + namesize
        data_start = (name_end + 3) & ~3
        end = (data_start + filesize + 3) & ~3
        name = data[pos + 110:name_end - 1].decode()
        if name == "TRAILER!!!":
            break
        entries.append((name, data[pos:end]))
        pos = end
    return entries


def initrd_sizes() -> tuple[int, int, int, int]:
    """The build's initrd recompressed as the build does: whole, without the network key source's files, without
    the TPM's too, without every encryption file (bytes)."""
    initrd = ISO.with_name(ISO.name.replace(".iso", ".bundle")) / "initrd.img"
    raw = subprocess.run(["zstd", "-dc", str(initrd)], check=True, capture_output=True).stdout
    entries = cpio_entries(raw)
    trailer = b"070701" + b"0" * 8 * 11 + b"0000000B" + b"0" * 8 + b"TRAILER!!!\0"

    def packed(kept: list[tuple[str, bytes]]) -> int:
        cpio = b"".join(e for _, e in kept) + trailer
        return len(subprocess.run(["zstd", "-19", "-q", "-c"], input=cpio, check=True, capture_output=True).stdout)

    def without(*patterns: re.Pattern[str]) -> int:
        return packed([e for e in entries if not any(p.match(e[0].removeprefix("./")) for p in patterns)])

    return (packed(entries), without(NETWORK_FILES), without(NETWORK_FILES, TPM_FILES),
            without(NETWORK_FILES, TPM_FILES, LUKS_FILES))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--boots", type=int, default=2)
    args = ap.parse_args()
    for path in (ISO, BUNDLE):
        if not path.exists():
            print(f"missing {path}: run `make test` first", file=sys.stderr)
            return 2
    server = serve(BUNDLE.parent)
    url = f"http://10.0.2.2:{server.server_address[1]}/{BUNDLE.name}"
    full, no_net, no_tpm, bare = initrd_sizes()
    with tempfile.TemporaryDirectory() as tmp:
        work, tpm = Path(tmp), Path(tmp) / "tpm"
        tang = TangServer(work / "tang").start()
        disks, stick = install_all(work, tpm, tang)
        boot_once("tpm", disks["tpm"], stick, work, tpm, None)  # the first boot re-seals the installer's key: untimed
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in disks}
        for n in range(args.boots):
            for name, disk in disks.items():
                runs[name].append(boot_once(name, disk, stick, work, tpm, url if n == 0 else None))
        speeds = ciphers(disks["usb"], stick, work)
        tang.stop()
    server.shutdown()
    print(f"{'TCG, amd64, ' + str(args.boots) + ' boots each (medians)':<34}" + "".join(f"{n:>10}" for n in runs))
    for key in runs["usb"][0]:
        values = [statistics.median([r[key] for r in runs[name] if key in r] or [0.0]) for name in runs]
        print(f"{key:<34}" + "".join(f"{v:>10.2f}" for v in values))
    for cipher, speed in speeds.items():
        print(f"{'cryptsetup benchmark ' + cipher:<50} {speed}")
    print(f"{'initrd (zstd -19), bytes':<34}{bare:>10}{no_tpm:>10}{no_net:>10}{full:>10}  (none, LUKS, + TPM, "
          f"+ Tang: +{(no_tpm - bare) / 1e6:.2f} MB, +{(no_net - no_tpm) / 1e6:.2f} MB, "
          f"+{(full - no_net) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
