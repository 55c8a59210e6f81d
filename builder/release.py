"""The release gate: what makes a build a release (asked for, or implied by its key) and what a release must
hold; what a locked image still leaves open on its board."""

from __future__ import annotations

from pathlib import Path

from . import keys
from .boards import BootFlow
from .errors import BadInput
from .profile import Profile

# Services that only test images run: the QEMU test channel is a root shell on a virtio console.
TEST_ONLY_SERVICES = ("maculaos-testchannel",)


def is_release(asked: bool, secret: Path | None) -> bool:
    """A release is asked for (--release), or implied by the key: anything signed with a key other than this
    checkout's development key is something devices will trust, so it gets a release's checks."""
    return asked or (secret is not None and not keys.is_development_key(secret))


def check_release(profile: Profile, secret: Path | None, asked: bool = True) -> None:
    """A release: signed with a real key, no console autologin, a GRUB that cannot be edited freely, no test
    channel, no plain-http updates, no secret baked into the image, every preloaded image pinned by digest."""
    why = "--release" if asked else f"signed with {secret} (not the development key), this build is a release"
    if secret is None or keys.is_development_key(secret):
        raise BadInput(f"{why}: bundles would be signed with this checkout's development key",
                       "pass --signing-key KEY (or set update.signing_key); `maculaos-sdk keys generate` makes one")
    where = profile.files[0]
    if profile.settings.console.autologin:
        raise BadInput(f"{profile.origins['console.autologin'][0]}: console.autologin: {why}: a release image must "
                       "not log root in", "drop console.autologin from the profile (it is for test images)")
    if not profile.settings.console.grub_password:
        raise BadInput(f"{where}: console.grub_password: {why}: a release needs a GRUB password (anyone at the "
                       "console could edit the kernel line or open Recovery)",
                       "set it to the output of `grub-mkpasswd-pbkdf2`")
    for i, service in enumerate(profile.settings.services):
        if service in TEST_ONLY_SERVICES:
            raise BadInput(f"{profile.origins.get('services', (where, 0))[0]}: services[{i}]: {why}: {service} is a "
                           "root shell for tests", "build releases from a profile that does not extend `test`")
    config = profile.settings.config
    origin = profile.origins.get("config", (where, 0))[0]
    if (config.get("upgrade") or {}).get("allow_http"):
        raise BadInput(f"{origin}: config.upgrade.allow_http: {why}: plain-http updates let anyone on the path "
                       "hold updates back", "serve updates over https")
    secrets = [k for k, v in (("wifi.psk", (config.get("wifi") or {}).get("psk")),
                              ("k3s.args", [a for a in (config.get("k3s") or {}).get("args") or []
                                            if str(a).startswith(("--token", "-t", "--agent-token"))])) if v]
    if secrets:
        raise BadInput(f"{origin}: config.{secrets[0]}: {why}: a secret baked into an image is readable by anyone "
                       "holding the image", "give it to each node in its own config.yaml (data partition)")
    for i, ref in enumerate(profile.settings.images):
        if not ref.endswith((".tar", ".tar.gz", ".tgz")) and "@sha256:" not in ref:
            raise BadInput(f"{profile.origins.get('images', (where, 0))[0]}: images[{i}]: {why}: {ref} is not "
                           "pinned by digest", f"name it as {ref.split('@')[0]}@sha256:<digest>")


def open_on_this_board(profile: Profile) -> str | None:
    """What a locked image still leaves open on its board, said at build time (the README's security section)."""
    if profile.board.boot_flow(profile.arch) is not BootFlow.rpi_firmware:
        return None
    uboot = ("U-Boot boots without stopping for a key (overlays/maculaos-locked.dtbo)" if
             profile.settings.console.grub_password else
             "U-Boot's autoboot can be interrupted on the UART or a USB keyboard (console.grub_password locks it)")
    return (f"{profile.board.name}: {uboot}; the Pi firmware reads config.txt, the device trees and U-Boot from the "
            "card's FAT partition unsigned, so whoever holds the card can change them, and the data partition is "
            "not encrypted")
