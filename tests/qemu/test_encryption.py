"""Encryption at rest (issue 25): `maculaos install` makes the data partition a LUKS2 volume whose key sources
(the node's TPM, a Tang server on the host, a USB key disk, then a passphrase) the initrd unlocks from the header
alone; what the node writes
is not on the raw disk; an update (its new slot sealed a TPM key of its own) and a rollback keep unlocking
unattended; a factory reset crypto-erases the volume and makes a new one; another TPM releases nothing, and
the key server down, three wrong passphrases end in the recovery shell, which unlocks by hand; a node without a TPM
unlocks with the key server; the Adiantum cipher opens too."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest
from maculaos_device import encryption, layout, paths
from tang_server import TangServer

pytestmark = pytest.mark.qemu

PASSPHRASE = "correct horse battery staple"
NEW_PASSPHRASE = "a new node, a new passphrase"
DATA = "/dev/vda4"


def _key_disk(path: Path) -> Path:
    """An empty FAT disk labelled as the key source expects, as an operator prepares a USB stick."""
    subprocess.run(["truncate", "-s", "16M", str(path)], check=True)
    subprocess.run(["mkfs.vfat", "-n", encryption.USB_LABEL, str(path)], check=True, capture_output=True)
    return path


def _boot_code(m, slot: str | None = None) -> str:
    """PCR 4 (SHA-256) as measured this boot, or as predicted for the next boot of `slot` from this boot's event
    log and the slot's boot loader and kernel (maculaos_device.measured_boot)."""
    if slot is None:
        return m.succeed("cat /sys/class/tpm/tpm0/pcr-sha256/4").strip().lower()
    return m.succeed("python3 -I -c 'import sys; sys.path.insert(0, \"/usr/lib/maculaos\"); "
                     "from pathlib import Path; from maculaos_device import measured_boot as mb, paths; "
                     f"print(mb.predict_slot_boot_code(\"{slot}\", Path(paths.ESP)).hex())'").strip()


def _header(m) -> dict:
    return json.loads(m.succeed(f"cryptsetup luksDump --dump-json-metadata {DATA}"))


def _sources(m) -> list[tuple[str, list[str], str | None]]:
    """The header's tokens in order: (key source type, key slots, the boot slot a tpm key is sealed for)."""
    tokens = _header(m)["tokens"]
    return [(t["type"], t["keyslots"], t.get("boot")) for _, t in sorted(tokens.items(), key=lambda i: int(i[0]))]


def _disk_holds(image: Path, needles: list[bytes], work: Path) -> dict[bytes, bool]:
    """Which of `needles` occur anywhere in the disk's raw bytes (read while the guest runs, after its sync)."""
    raw = work / "raw.img"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    found = dict.fromkeys(needles, False)
    overlap = max(map(len, needles))
    tail = b""
    with raw.open("rb") as f:
        while chunk := f.read(16 << 20):
            window = tail + chunk
            for n in needles:
                found[n] = found[n] or n in window
            tail = window[-overlap:]
    raw.unlink()
    return found


@pytest.fixture
def tang(tmp_path):
    """Debian's tangd on the host; the guests reach it as 10.0.2.2."""
    server = TangServer(tmp_path / "tang").start()
    yield server
    server.stop()


def test_encrypted_install_usb_key_passphrase_and_crypto_erase(test_iso, make_machine, bundle_server, tang, tmp_path):
    target, second = tmp_path / "target-amd64.qcow2", tmp_path / "adiantum-amd64.qcow2"
    for disk in (target, second):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True)
    stick, tpm = _key_disk(tmp_path / "key.img"), tmp_path / "tpm"

    # 1. install from the live ISO, booted through UEFI on the node (its TPM), with a TPM key sealed for slot A, a
    #    key the Tang server releases, a USB key disk (its key is made by the installer) and a passphrase; and a
    #    second disk with the other cipher and the same key disk (its key is reused)
    live = make_machine(test_iso, "installer", uefi=True, disks=(target, second), usb_sticks=(stick,), tpm_state=tpm)
    live.start()
    live.wait_for_channel(timeout=240)
    tang_url = f"http://10.0.2.2:{tang.port}"
    config = {"storage": {"encryption": {"enabled": True, "key_sources": ["tpm", "network", "usb", "passphrase"],
                                         "tang_url": tang_url, "tang_thp": tang.thumbprint(),
                                         "passphrase": PASSPHRASE}},
              "maculaos": {"hostname": "sealed"}}
    live.write_file("/tmp/node.yaml", json.dumps(config).encode())  # JSON is YAML
    live.succeed("maculaos install --device /dev/vda --config /tmp/node.yaml --yes", timeout=600)
    header = _header(live)
    assert _sources(live) == [("maculaos-tpm", ["0"], "A"), ("maculaos-network", ["1"], None),
                              ("maculaos-usb", ["2"], None), ("maculaos-passphrase", ["3"], None)]
    assert header["tokens"]["2"]["label"] == encryption.USB_LABEL
    assert header["tokens"]["1"]["url"] == tang_url
    # the installed disk's PCR 4 is unknown from the live boot: the installer's key is bound to PCR 7 alone
    assert header["tokens"]["0"]["pcrs"] == encryption.pcr_list(encryption.TPM_INSTALL_PCRS)
    kdfs = [header["keyslots"][str(n)]["kdf"]["type"] for n in range(4)]
    assert kdfs == ["pbkdf2", "pbkdf2", "pbkdf2", "argon2id"]  # random keys: nothing to stretch; a passphrase:
    #                                                            memory-hard
    assert header["segments"]["0"]["encryption"] == encryption.Cipher.aes_xts.value
    adiantum = {"storage": {"encryption": {"enabled": True, "key_sources": ["usb"],
                                           "cipher": encryption.Cipher.adiantum.value}}}
    live.write_file("/tmp/adiantum.yaml", json.dumps(adiantum).encode())
    live.succeed("maculaos install --device /dev/vdb --config /tmp/adiantum.yaml --yes", timeout=600)
    live.send_channel_nowait("poweroff")
    live.wait_for_poweroff(timeout=120)
    key = subprocess.run(["mtype", "-i", str(stick), f"::{encryption.USB_KEY_FILE}"], check=True,
                         capture_output=True).stdout
    assert len(key) == encryption.KEY_BYTES

    # 2. the installed disk on the same node: unlocked unattended by its TPM; this first boot seals slot A's key to
    #    PCRs 4 and 7 as measured, in place of the installer's; a marker written there is not on the raw disk
    m = make_machine(target, "tpm", usb_sticks=(stick,), tpm_state=tpm)
    m.start()
    assert m.wait_for_boot() == "A"
    m.wait_for_console_text(r"maculaos-luks: unlocked with the TPM \(the key sealed for slot A\)", timeout=5)
    m.wait_for_console_text(r"maculaos-luks: sealed a key for slot A to the TPM \(key slot 4\)", timeout=5)
    assert _sources(m) == [("maculaos-network", ["1"], None), ("maculaos-usb", ["2"], None),
                           ("maculaos-passphrase", ["3"], None), ("maculaos-tpm", ["4"], "A")]
    assert _header(m)["tokens"]["4"]["pcrs"] == encryption.pcr_list(encryption.TPM_PCRS)
    assert _boot_code(m, "A") == _boot_code(m)  # OVMF measured GRUB and the kernel as predicted from its log
    status = m.succeed(f"cryptsetup status {encryption.MAPPER}")
    assert "type:    LUKS2" in status and f"device:  {DATA}" in status
    mounts = [line.split()[:2] for line in m.succeed("cat /proc/mounts").splitlines()]
    assert [f"/dev/mapper/{encryption.MAPPER}", "/var/lib/maculaos"] in mounts
    stored = m.succeed("cat /var/lib/maculaos/config.yaml")
    assert "sealed" in stored and PASSPHRASE not in stored and "passphrase:" not in stored  # its secret taken out
    marker = f"maculaos-marker-{secrets.token_hex(8)}"
    m.succeed(f"echo {marker} > /var/lib/data/marker && echo {marker} > /var/lib/maculaos/marker && sync")
    assert m.succeed("cat /var/lib/data/marker").strip() == marker
    found = _disk_holds(target, [marker.encode(), PASSPHRASE.encode(), b"sealed", b"LUKS\xba\xbe"], tmp_path)
    assert found == {marker.encode(): False, PASSPHRASE.encode(): False, b"sealed": False, b"LUKS\xba\xbe": True}
    uuid = m.succeed(f"cryptsetup luksUUID {DATA}").strip()

    # an update to B (its own initrd opens the volume A's made, with the TPM key the update sealed for B) and a
    # rollback keep unlocking unattended
    url, _ = bundle_server
    m.wait_for_network()  # a fresh boot: the channel answers while DHCP still runs
    m.succeed(f"maculaos upgrade --apply {url}/good --no-reboot", timeout=300)
    assert _sources(m) == [("maculaos-tpm", ["0"], "B"), ("maculaos-network", ["1"], None),
                           ("maculaos-usb", ["2"], None), ("maculaos-passphrase", ["3"], None),
                           ("maculaos-tpm", ["4"], "A")]
    predicted = {"B": _boot_code(m, "B"), "A": _boot_code(m, "A")}  # from slot A's boot, before B ever booted
    for slot in ("B", "A"):
        assert m.reboot() == slot
        m.wait_for_console_text(rf"maculaos-luks: unlocked with the TPM \(the key sealed for slot {slot}\)", timeout=5)
        assert _boot_code(m) == predicted[slot]
        m.wait_until_succeeds(f"maculaos upgrade --status | jq -e '.active == \"{slot}\" and .trial == null'",
                              timeout=120)
        assert m.succeed("cat /var/lib/data/marker").strip() == marker
        if slot == "B":
            m.succeed("maculaos upgrade --rollback --no-reboot")
    floor = f"/run/maculaos/data/{layout.HIGHEST_VERSION_FILE}"
    highest = m.wait_until_succeeds(f"cat {floor}", timeout=120)  # the confirm service records it

    # 3. factory reset: the volume is crypto-erased and made anew (the key disk kept, a new key from the key server,
    #    which the initrd reaches over its own network, a new passphrase chosen)
    m.send_channel_nowait("maculaos factory-reset --confirm")
    assert m.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=240).group(1) == "A"
    m.wait_for_console_text(r"factory reset: crypto-erasing the data partition", timeout=120)
    for prompt in ("Choose the passphrase for the data partition", "Type it again"):
        m.wait_for_console_text(prompt, timeout=60)
        m.send_console(NEW_PASSPHRASE + "\r")
    m.wait_for_console_text(r"maculaos-luks: made an encrypted data partition on /dev/vda4", timeout=120)
    m.wait_for_channel(timeout=240)
    assert m.succeed(f"cryptsetup luksUUID {DATA}").strip() != uuid
    m.succeed("test ! -e /var/lib/data/marker && test ! -e /var/lib/maculaos/marker")
    assert m.succeed(f"cat {floor}") == highest  # the anti-rollback floor survives the reset
    assert _sources(m) == [("maculaos-tpm", ["0"], "A"), ("maculaos-network", ["1"], None),
                           ("maculaos-usb", ["2"], None), ("maculaos-passphrase", ["3"], None)]  # B's TPM key went
    assert m.console_text().count("maculaos-init: network eth0 ") == 1  # the crypto-erase's: no unlock needed it
    # the new volume's TPM key (sealed in the initrd, to this boot's PCRs) is released to this boot
    m.succeed(f". {paths.SHELL_PATHS}; . {paths.ENCRYPTION_SH}; . {paths.LUKS_LIB}; "
              f"luks_tpm_unseal {DATA} 0 /run/tpm.key && cryptsetup open --test-passphrase --key-slot 0 "
              f"--key-file /run/tpm.key {DATA}; rc=$?; rm -f /run/tpm.key; exit $rc")
    m.shutdown()

    # 4. another machine's TPM (a fresh swtpm state), the key server down and no key disk: the passphrase, asked on
    #    the console; the old one opens nothing any more, and after three wrong tries the recovery shell (the volume
    #    locked) unlocks it by hand with the passphrase slot
    tang.stop()
    p = make_machine(target, "passphrase", tpm_state=tmp_path / "other-tpm")
    p.start()
    assert p.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=240).group(1) == "A"
    p.wait_for_console_text(r"the TPM does not release the key sealed for slot A", timeout=60)
    p.wait_for_console_text(rf"the key server {tang_url} did not unlock the data partition: trying", timeout=60)
    p.wait_for_console_text(rf"no disk labelled {encryption.USB_LABEL}: trying the next key source", timeout=60)
    for n in (1, 2, 3):
        p.wait_for_console_text(rf"Passphrase for the data partition \({n}/3\): ", timeout=60)
        p.send_console(PASSPHRASE + "\r")
        p.wait_for_console_text(r"maculaos-luks: wrong passphrase", timeout=60)
    p.wait_for_console_text(r"no key source unlocked the data partition /dev/vda4: it stays locked", timeout=30)
    p.wait_for_console_text(r"The data partition /dev/vda4 is encrypted: 'cryptsetup open", timeout=60)
    p.wait_for_console_text(r"\(recovery\) # ", timeout=60)
    p.send_console(f"cryptsetup open {DATA} data\r")
    p.wait_for_console_text(rf"Enter passphrase for {DATA}: ", timeout=60)
    p.send_console(NEW_PASSPHRASE + "\r")
    p.wait_for_console_text(r"\(recovery\) # ", timeout=120)
    p.send_console(f"mount -t ext4 /dev/mapper/data /mnt && echo floor:$(cat /mnt/{layout.HIGHEST_VERSION_FILE})\r")
    # (the typed line is echoed too: the value starts with a digit, the echo with `$`; the line's end is waited
    # for, or a value still arriving would match in part)
    assert p.wait_for_console_text(r"floor:(\d\S*)\r", timeout=60).group(1) == highest.strip()
    p.send_console("umount /mnt && cryptsetup close data && reboot -f\r")
    assert p.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=240).group(1) == "A"
    p.wait_for_console_text(r"Passphrase for the data partition \(1/3\): ", timeout=60)
    p.send_console(NEW_PASSPHRASE + "\r")
    p.wait_for_console_text(r"maculaos-luks: unlocked with the passphrase", timeout=60)
    p.wait_for_channel(timeout=240)
    assert NEW_PASSPHRASE not in p.console_text() and PASSPHRASE not in p.console_text()  # never echoed
    s = p.upgrade_status()
    assert (s["mode"], s["booted"], s["active"]) == ("disk", "A", "A")
    p.shutdown()

    # 5. a node without a TPM, the key server back: it unlocks unattended, and gives the initrd's network back
    tang.start()
    n = make_machine(target, "network")
    n.start()
    assert n.wait_for_boot() == "A"
    n.wait_for_console_text(r"maculaos-luks: no TPM \(/dev/tpmrm0\)", timeout=5)
    n.wait_for_console_text(rf"maculaos-luks: unlocked with the key server {tang_url}", timeout=5)
    assert f"/dev/mapper/{encryption.MAPPER} /var/lib/maculaos " in n.succeed("cat /proc/mounts")
    n.wait_for_network()  # the booted system's own DHCP, after the initrd's address went
    n.shutdown()

    # 6. the other cipher (boards without AES instructions), opened in the initrd with the same key disk
    a = make_machine(second, "adiantum", usb_sticks=(stick,))
    a.start()
    assert a.wait_for_boot() == "A"
    a.wait_for_console_text(rf"maculaos-luks: unlocked with the key on /dev/sd\w+ \({encryption.USB_LABEL}\)",
                            timeout=5)
    assert f"cipher:  {encryption.Cipher.adiantum.value}" in a.succeed(f"cryptsetup status {encryption.MAPPER}")
