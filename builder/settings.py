"""The one declarative table of profile settings: it drives validation, defaults and the docs (through the
schema engine the node config uses too, maculaos_device.schema)."""

from __future__ import annotations

from maculaos_device import layout
from maculaos_device.schema import BOOL, INT, LIST, MAP, STR, Field, Schema

from .boards import BOARDS

VERSION = r"[0-9A-Za-z][0-9A-Za-z.+~-]*"  # versions as Debian writes them, nothing a template could misread
# A container image reference (docker's grammar: [domain[:port]/]path[:tag][@sha256:digest]) or a tarball path
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
IMAGE_REF = rf"(?=.{{1,512}}$)(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*{_TAG}"  # 512: no slow match on a long one
TARBALL = r"(?=.{1,512}$)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9._/-]+\.(?:tar|tar\.gz|tgz)"

SETTINGS: tuple[Field, ...] = (
    Field("name", STR, None, "Profile name; part of every output file name.", pattern=r"[a-z0-9][a-z0-9-]*"),
    Field("version", STR, "0.0.0", "MaculaOS version written to /etc/os-release and output names.",
          pattern=VERSION),
    Field("description", STR, "", "Free text shown by `profile show`."),
    Field("extends", STR, None, "Another profile (name in profiles/ or path) this one builds on.", nullable=False),
    Field("base", STR, None, "Custom images: `profile:version` to build on, e.g. `maculaos:1.2.0`. Like `extends`; "
          "the version becomes this image's version unless `version` is set.",
          pattern=r"[a-z0-9][a-z0-9-]*(:" + VERSION + ")?"),
    Field("arch", STR, "amd64", "Target architecture.", choices=("amd64", "arm64")),
    Field("board", STR, "generic", "Target board: " + "; ".join(f"`{b.name}` {b.description}" for b in
          BOARDS.values()) + ".", choices=tuple(BOARDS)),
    Field("outputs", LIST, ["iso"], "Artifacts to produce: iso (live/installer ISO), disk (A/B disk image, raw and "
          "qcow2), sdimage (Raspberry Pi SD card image), bundle (signed update bundle), tar (the root filesystem "
          "as a tarball), oci (the root filesystem as a container image in the engine); the board decides which "
          "can boot.", choices=("iso", "disk", "sdimage", "bundle", "tar", "oci")),
    Field("source_date_epoch", INT, 1735689600,
          "Timestamp for every file in the image (env SOURCE_DATE_EPOCH wins); part of every stage id."),
    Field("base_image", STR, None, "Use this existing local docker image as the base instead of bootstrapping.",
          pattern=r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?(@sha256:[0-9a-f]{64})?"),
    Field("debian.suite", STR, "trixie", "Debian suite the base is bootstrapped from (pinned).",
          pattern=r"[a-z][a-z0-9-]*"),
    Field("debian.mirror", STR, "http://deb.debian.org/debian", "Debian mirror for bootstrap and apt.",
          pattern=r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+-]+)*/?"),
    Field("debian.components", LIST, ["main"], "Archive components (add non-free-firmware for RPi).",
          pattern=r"[a-z][a-z0-9-]*"),
    Field("packages", LIST, [], "Debian packages installed into the root filesystem; `-name` removes one an "
          "extended profile installs.", pattern=r"[a-z0-9][a-z0-9+.-]+"),
    Field("services", LIST, [], "OpenRC services added to the default runlevel.",
          pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*"),
    Field("overlay", MAP, {}, "Files laid over the rootfs: /path -> inline text, or {source: file-or-folder, "
          "mode: '0755'} with the source relative to the YAML file."),
    Field("images", LIST, [], "Container images preloaded into /var/lib/rancher/k3s/agent/images/: a registry "
          "reference (pulled when reachable), an image in the local engine, or a `docker save` tarball path.",
          pattern=IMAGE_REF + "|" + TARBALL),
    Field("firstboot", LIST, [], "Scripts (put in place by `overlay`, absolute paths) run once, on a node's "
          "first boot.", pattern=r"(/[A-Za-z0-9._+-]+)+"),
    Field("config", MAP, {}, "Default node config.yaml baked into the image (docs/config-reference.md); a node's "
          "own /var/lib/maculaos/config.yaml is merged over it."),
    Field("artifacts", LIST, [], "Pinned downloads from artifacts.lock.yaml this image ships (e.g. k3s).",
          pattern=r"[a-z0-9][a-z0-9-]*"),
    Field("kernel.package", STR, "auto", "Debian kernel package; `auto` means linux-image-<arch>.",
          pattern=r"auto|linux-image-[a-z0-9][a-z0-9.+-]*"),
    Field("kernel.args", LIST, [], "Extra kernel command line arguments (no quotes, spaces, `$` or `;`: each "
          "lands in GRUB's config).", pattern=r"[A-Za-z0-9_.,:=/+@-]+"),
    Field("kernel.modules", LIST, [], "Extra kernel modules loaded by the initrd.", pattern=r"[A-Za-z0-9_-]+"),
    Field("kernel.prune", LIST, [], "Module folders (under kernel/) left out of the image to save space.",
          pattern=r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*"),
    Field("squashfs.compression", STR, "zstd", "squashfs compressor.", choices=("zstd", "xz", "gzip")),
    Field("squashfs.level", INT, 10, "Compression level (zstd 1-22, ignored for xz/gzip); bench/squashfs.py "
          "measures the choices."),
    Field("console.autologin", BOOL, False, "Log root in on the serial console and tty1 without a password. "
          "For test and development images only: by default the consoles ask for a login and root has no "
          "password, so a person at the console gets nothing; log in over SSH with a key from the node config."),
    Field("console.grub_password", STR, "", "GRUB superuser password as `grub-mkpasswd-pbkdf2` prints it "
          "(`grub.pbkdf2.sha512.<rounds>.<salt>.<hash>`). Set, the normal entries still boot unattended, but "
          "editing an entry (the kernel line), the GRUB shell and Recovery ask for it. Required by "
          "`build-image --release`. At least 10000 rounds (grub-mkpasswd-pbkdf2's default).",
          pattern=r"grub\.pbkdf2\.sha512\.[1-9][0-9]{4,6}\.[0-9A-F]{16,256}\.[0-9A-F]{16,256}"),
    Field("console.recovery_password", STR, "", "Root password of the recovery shell, as a SHA-512 crypt hash "
          "(`mkpasswd -m sha-512` prints it). Set, Recovery asks for it before the shell; unset, Recovery's console "
          "stays locked unless console.autologin is set (its sshd still takes the node config's keys).",
          pattern=r"\$6\$(rounds=[0-9]{4,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}"),
    Field("iso.volume_id", STR, "MACULAOS", "ISO 9660 volume id.", pattern=r"[A-Z0-9_]{1,32}"),
    Field("iso.timeout", INT, 3, "Seconds the GRUB menu waits before booting the default entry."),
    Field("disk.esp_mb", INT, layout.ESP_MB,
          "Size of the FAT boot partition (GRUB, its env, one kernel+initrd per slot)."),
    Field("disk.slot_mb", INT, 0, f"Size of each rootfs slot; 0 = {layout.SLOT_FACTOR} x the squashfs, rounded up "
          f"to {layout.SLOT_ROUND_MB} MiB, min {layout.MIN_SLOT_MB}."),
    Field("disk.data_mb", INT, layout.DATA_MB,
          "Size of the data partition in the disk image (an installer grows it)."),
    Field("disk.size_mb", INT, 0, "Total disk image size; the build fails early if two slots do not fit (0 = auto)."),
    Field("update.min_version", STR, "0.0.0", "Oldest running version allowed to apply this image's bundle.",
          pattern=VERSION),
    Field("update.signing_key", STR, "", "minisign secret key signing bundles (default: a per-checkout dev key)."),
    Field("install.config", STR, "", "A node config.yaml (path relative to the profile) put on the ISO as "
          "maculaos/config.yaml: the ISO's unattended Install entry installs the node with it."),
    Field("size.iso_max_mb", INT, 0, "Fail the build if the ISO is larger than this (0: no limit)."),
)

SCHEMA = Schema(SETTINGS, reference_hint="see `maculaos-sdk profile keys`", list_removals=True)
SETTINGS_BY_KEY: dict[str, Field] = SCHEMA.by_key

