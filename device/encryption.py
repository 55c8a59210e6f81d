"""Encryption at rest of the data partition (LUKS2): the facts the installer, the initrd and the docs share.

The data partition is a LUKS2 volume whose volume key cryptsetup draws at random when it is made; each key
source the node config lists (`storage.encryption.key_sources`, in unlock order) gets a key slot of its own
and a LUKS2 token that records the source, so the initrd unlocks from the header alone, with no config file
readable before the unlock. One shell library (`/usr/lib/maculaos/luks.sh`, in the profile layer, so the
initrd has it too) makes, unlocks and crypto-erases volumes; `shell_file()` renders this module's facts for it
and for the initrd. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .schema import BOOL, LIST, STR, Field


class KeySource(Enum):
    """Where a key slot's key comes from; the value is the token type's suffix (`maculaos-<value>`)."""

    passphrase = "passphrase"  # typed on the consoles (serial and screen) at every boot
    usb = "usb"  # a key file on a removable disk with a given filesystem label, read and forgotten
    tpm = "tpm"  # a random key sealed to this node's TPM 2.0 and its boot loader and kernel (TPM_PCRS), per slot
    network = "network"  # a random key encrypted to a Tang server (clevis's tang pin format), released by it at boot

    @property
    def token_type(self) -> str:
        return f"maculaos-{self.value}"


class Cipher(Enum):
    """Data segment ciphers: AES-XTS where the CPU has AES instructions (x86-64, most arm64 SoCs), Adiantum
    where it has not (the Raspberry Pi 4's Cortex-A72 as Broadcom ships it): several times faster there."""

    aes_xts = "aes-xts-plain64"
    adiantum = "xchacha12,aes-adiantum-plain64"


MAPPER = "maculaos-data"  # /dev/mapper/<MAPPER>: the unlocked data partition
USB_LABEL = "MACULA_KEY"  # the key disk's filesystem label (default)
USB_LABEL_PATTERN = r"[A-Z0-9_]{1,11}"  # FAT labels: 11 characters; also what findfs matches literally
USB_KEY_FILE = "maculaos/data.key"  # on the key disk
KEY_BYTES = 64  # a generated key file: 512 random bits (no stretching needed: PBKDF2 with 1000 iterations)
PASSPHRASE_TRIES = 3  # then the recovery shell (locked by its own password)
PASSPHRASE_PATTERN = r"[\x20-\x7e]{8,256}"  # printable ASCII: typeable on any console keymap
USB_WAIT_SECONDS = 5  # how long the initrd waits for the key disk to show up before the next source
MAX_TOKENS = 8  # LUKS2 has 32 token slots; the initrd looks at this many
# The PCRs (SHA-256 bank) a tpm key is sealed to. 4: the firmware's digest of every EFI application it starts,
# here GRUB and the kernel GRUB loads (maculaos_device.measured_boot predicts it for a slot before it boots); 7:
# the Secure Boot state and keys. Another machine has another TPM; another boot loader or kernel (a USB stick, a
# slot rewritten by hand) gives another PCR 4. Not 0-3 (firmware updates would lock the node out), not 8-9 (GRUB
# does not measure, and the kernel's initrd measurement changes with every update).
TPM_PCRS = (4, 7)
# What the installer seals slot A's key to: PCR 4 of the installed disk's boot cannot be predicted from the
# installer's boot (the firmware's failed boot options before the disk's are in PCR 4, and the installer boots from
# another device). The initrd of the first boot that this key unlocks seals a TPM_PCRS key in its place.
TPM_INSTALL_PCRS = (7,)
# The network key source: a Tang server, reached over plain HTTP from the initrd (busybox wget, jose). The exchange
# needs no TLS: the node trusts the server's advertisement through the thumbprint of a key that signed it, and what
# it sends the server is blinded (the McCallum-Relyea exchange): the server never sees the key.
TANG_URL_PATTERN = r"http://[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?(/[A-Za-z0-9._~-]{1,64}){0,8}"  # POSIX ERE too
TANG_THP_PATTERN = r"[A-Za-z0-9_-]{43}"  # a signing key's SHA-256 JWK thumbprint (`tang-show-keys` prints it)
NETWORK_TRIES = 3  # tries of the key server at boot (a second apart), then the next key source
HTTP_TIMEOUT_SECONDS = 5  # per request to the key server
# How long a running system (the installer just booted, say) waits for the key server to answer before it seals a
# key to it: its network may still be coming up. The initrd brings its own network up first and does not wait.
NETWORK_WAIT_SECONDS = 120
HTTP_MAX_BYTES = 65536  # a larger answer from the key server is refused, not cut
TPM_PCR_LIST_PATTERN = r"sha256:[0-9]{1,2}(,[0-9]{1,2}){0,7}"  # a token's "pcrs", as tpm2 spells a selection


def pcr_list(pcrs: tuple[int, ...]) -> str:
    return "sha256:" + ",".join(map(str, pcrs))

FIELDS: tuple[Field, ...] = (
    Field("storage.encryption.enabled", BOOL, False,
          "Encrypt the data partition (LUKS2) with a fresh random volume key, made by `maculaos install` (a "
          "profile building disk or SD images may not set it yet: their first boot would keep it plain). Read "
          "when the volume is made: a node already installed keeps what it has; a factory reset makes a new one."),
    Field("storage.encryption.method", STR, "luks2", "The on-disk format.", choices=("luks2",)),
    Field("storage.encryption.key_sources", LIST, ["passphrase"],
          "Key sources, each with a key slot of its own, tried in this order at boot: `passphrase` (asked "
          f"on the consoles, {PASSPHRASE_TRIES} tries, then the recovery shell), `usb` (the key file "
          f"`{USB_KEY_FILE}` on a disk labelled `storage.encryption.usb_label`; made there when absent), `tpm` "
          f"(a key sealed to the node's TPM 2.0 and PCRs {'+'.join(map(str, TPM_PCRS))}: its boot loader and kernel; "
          "sealed anew for a slot when an update writes it; the installer's, to PCR "
          f"{'+'.join(map(str, TPM_INSTALL_PCRS))} only, is replaced at the first boot; needs UEFI), `network` "
          "(a key the Tang server `storage.encryption.tang_url` releases at boot, over the network the initrd "
          f"brings up with DHCP; {NETWORK_TRIES} tries).",
          choices=tuple(s.value for s in KeySource)),
    Field("storage.encryption.cipher", STR, Cipher.aes_xts.value,
          "Data cipher: `aes-xts-plain64` where the CPU has AES instructions, "
          "`xchacha12,aes-adiantum-plain64` where it has not (Raspberry Pi 4).",
          choices=tuple(c.value for c in Cipher)),
    Field("storage.encryption.usb_label", STR, USB_LABEL, "Filesystem label of the USB key disk.",
          pattern=USB_LABEL_PATTERN),
    Field("storage.encryption.tang_url", STR, "",
          "The Tang server of the `network` key source, e.g. `http://tang.example:7500`. Plain `http://`: Tang needs "
          "no TLS (what the node sends is blinded, and the server is trusted through `tang_thp`); no IPv6 literals.",
          pattern=TANG_URL_PATTERN),
    Field("storage.encryption.tang_thp", STR, "",
          "The SHA-256 thumbprint of a signing key of that Tang server (`tang-show-keys` on the server prints it): "
          "its advertisement must carry that key's signature, or no key is made.", pattern=TANG_THP_PATTERN),
    Field("storage.encryption.passphrase", STR, "",
          "The passphrase `maculaos install` enrolls (8-256 printable characters). Never stored: the "
          "installed config.yaml has it removed, and a profile or an image may not carry it; without it "
          "the installer asks on its terminal.",
          pattern=PASSPHRASE_PATTERN, secret=True),
)
SECRET_KEYS = ("storage.encryption.passphrase",)  # removed from any config that is stored or built in


@dataclass(frozen=True)
class Policy:
    """What a node's config asks of its data partition."""

    enabled: bool
    sources: tuple[KeySource, ...]
    cipher: Cipher
    usb_label: str
    tang_url: str = ""
    tang_thp: str = ""

    @classmethod
    def of(cls, config: dict[str, Any]) -> Policy:
        """From a resolved node config (nodeconfig.resolve: every key present, every value checked)."""
        enc = config["storage"]["encryption"]
        return cls(enabled=enc["enabled"], sources=tuple(dict.fromkeys(KeySource(s) for s in enc["key_sources"])),
                   cipher=Cipher(enc["cipher"]), usb_label=enc["usb_label"], tang_url=enc["tang_url"],
                   tang_thp=enc["tang_thp"])

    def problem(self) -> str | None:
        """Why this policy cannot make a volume, or None."""
        if self.enabled and not self.sources:
            return "storage.encryption.key_sources is empty: nothing could unlock the data partition"
        if self.enabled and KeySource.network in self.sources and not (self.tang_url and self.tang_thp):
            return ("storage.encryption.key_sources lists `network`: set storage.encryption.tang_url and tang_thp "
                    "(the server's signing key thumbprint, from `tang-show-keys`)")
        return None

    def shell_env(self) -> dict[str, str]:
        """What luks.sh's `luks_create` reads of the network key source (validated by the schema)."""
        if KeySource.network not in self.sources:
            return {}
        assert re.fullmatch(TANG_URL_PATTERN, self.tang_url) and re.fullmatch(TANG_THP_PATTERN, self.tang_thp)
        return {"MACULAOS_LUKS_TANG_URL": self.tang_url, "MACULAOS_LUKS_TANG_THP": self.tang_thp}

    def shell_args(self) -> list[str]:
        """The arguments of luks.sh's `luks_create`: cipher, label, then the sources in unlock order."""
        for value in (self.cipher.value, self.usb_label, *(s.value for s in self.sources)):
            assert re.fullmatch(r"[A-Za-z0-9_,-]+", value), value  # validated by the schema: never shell syntax
        return [self.cipher.value, self.usb_label, *(s.value for s in self.sources)]


def secrets_in(config: dict[str, Any]) -> list[str]:
    """The SECRET_KEYS a config mapping sets (to anything but null or "")."""
    found = []
    for key in SECRET_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, ""):
            found.append(key)
    return found


def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with the keys that must never be stored taken out."""
    import copy

    out = copy.deepcopy(config)
    for key in SECRET_KEYS:
        *parents, leaf = key.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def shell_file() -> str:
    """This module's facts as shell assignments (MACULAOS_LUKS_<NAME>=...), for luks.sh and the initrd."""
    facts = {
        "MAPPER": MAPPER, "USB_LABEL": USB_LABEL, "USB_KEY_FILE": USB_KEY_FILE, "KEY_BYTES": KEY_BYTES,
        "TRIES": PASSPHRASE_TRIES,
        "USB_WAIT": USB_WAIT_SECONDS, "MAX_TOKENS": MAX_TOKENS, "USB_LABEL_RE": USB_LABEL_PATTERN,
        "TPM_PCRS": pcr_list(TPM_PCRS),
        "TPM_PCR_LIST_RE": TPM_PCR_LIST_PATTERN,
        "TANG_URL_RE": TANG_URL_PATTERN, "TANG_THP_RE": TANG_THP_PATTERN, "NETWORK_TRIES": NETWORK_TRIES,
        "NETWORK_WAIT": NETWORK_WAIT_SECONDS,
        "HTTP_TIMEOUT": HTTP_TIMEOUT_SECONDS, "HTTP_MAX": HTTP_MAX_BYTES,
        "SOURCES": " ".join(s.value for s in KeySource), "CIPHERS": " ".join(c.value for c in Cipher),
    }
    lines = ["# maculaos_device.encryption, rendered by the SDK: source it, never edit it",
             "# shellcheck disable=SC2034  # each script reads only some of them", "{"]
    lines += [f"  MACULAOS_LUKS_{name}='{value}'" for name, value in facts.items()]
    return "\n".join([*lines, "}"]) + "\n"
