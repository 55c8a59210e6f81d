"""Where things are on a node: the one list of on-device paths.

The device code imports it; the SDK renders the stage templates from it (`paths` in every template: the initrd's
/init) and writes it as a shell file (`/usr/share/maculaos/paths.sh`, the one path fixed here and in the
OpenRC services that source it) so no script spells a path of its own. Standard library only.
"""

from __future__ import annotations

from pathlib import PurePath
from pathlib import PurePosixPath as P

# -- the read-only root (squashfs and the profile layer) ---------------------------------------------------------
SHARE = P("/usr/share/maculaos")
LIB = P("/usr/lib/maculaos")  # the on-device tool: LIB/maculaos_device/
SHELL_PATHS = SHARE / "paths.sh"  # this module for shell (shell_file below)
ENCRYPTION_SH = SHARE / "encryption.sh"  # maculaos_device.encryption's facts for shell
LUKS_LIB = LIB / "luks.sh"  # make, unlock and crypto-erase the data partition's LUKS2 volume (initrd and installer)
UPDATE_KEY = SHARE / "update.pub"  # what bundles are checked against: in the read-only root, never /etc
DEFAULT_CONFIG = SHARE / "config.yaml"  # the profile's `config:`
FIRSTBOOT_LIST = SHARE / "firstboot"  # the profile's `firstboot:` commands
PINNED_LIST = SHARE / "pinned-files"  # the pinned artifacts and preloaded images the image holds
FIREWALL_BOOT = SHARE / "firewall-boot.nft"  # loaded before any interface is up
K3S_IMAGES = P("/var/lib/rancher/k3s/agent/images")  # preloaded container images, imported by k3s

# -- this boot (tmpfs; the initrd writes most of it) ---------------------------------------------------------------
RUN = P("/run/maculaos")
MODE_FILE = RUN / "mode"  # live | install | disk | recovery
SLOT_FILE = RUN / "slot"  # the booted slot (disk mode)
MBR_FILE = RUN / "mbr"  # the card's MBR signature (Raspberry Pi)
ESP = RUN / "esp"
DATA = RUN / "data"  # the data partition itself (factory reset keeps what layout.RESET_KEEPS names)
LOWER = RUN / "lower"  # the root squashfs
MEDIUM = RUN / "medium"  # the live/install medium GRUB booted from
VM_CONFIG = RUN / "vm-config.yaml"  # a dev VM's node config, handed over by the host (maculaos-vmhost)
K3S_TOKEN = RUN / "k3s-token"  # the join token, out of k3s's argv (0600)
CONFIG_APPLIED = RUN / "config.applied"  # what maculaos-config applied this boot (0600: it names k3s args)
DNS_STATIC = RUN / "dns.static"  # present: udhcpc's lease script leaves resolv.conf alone
MESH_STATE = RUN / "mesh.json"
FIREWALL_RULES = RUN / "firewall.nft"  # the node config's ruleset, replacing the boot table
WPA_CONF = RUN / "wpa_supplicant.conf"

# -- the node's state (the data partition, bound over /var/lib/maculaos) ------------------------------------------
STATE = P("/var/lib/maculaos")
NODE_CONFIG = STATE / "config.yaml"
CONFIG_DROPINS = STATE / "config.d"
LAST_GOOD_CONFIG = STATE / "config.last-good.json"
FIRSTBOOT_DONE = STATE / "firstboot.done"
RECOVERY_KEYS = STATE / "ssh/authorized_keys"  # recovery's sshd reads these

# -- /etc (the persistent /etc overlay) and logs ---------------------------------------------------------------
ETC = P("/etc/maculaos")
HEALTH_DIRS = (ETC / "health.d", STATE / "health.d")
CONFIG_LOG = P("/var/log/maculaos-config.log")


def under(root: str | PurePath, path: P) -> P:
    """`path` inside another root (an image being built, a test's folder)."""
    return P(root) / path.relative_to("/")


def shell_file() -> str:
    """This module as shell assignments (MACULAOS_<NAME>=...), for the OpenRC services."""
    lines = ["# maculaos_device.paths, rendered by the SDK: source it, never edit it",
             "# shellcheck disable=SC2034  # each script reads only some of them", "{"]
    for name, value in sorted(globals().items()):
        if name.isupper() and isinstance(value, P):
            lines.append(f"  MACULAOS_{name}={value}")
    return "\n".join([*lines, "}"]) + "\n"
