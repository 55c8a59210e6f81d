"""The dev VM around `vm start`: what to boot for a profile, the checkout's SSH key, the forwards
`vm ssh` finds again."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from . import ui
from .errors import BadInput
from .paths import cache_dir, sdk_root
from .vm import Forward, cow_disk


def vm_dir() -> Path:
    path = cache_dir() / "vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dev_ssh_key() -> Path:
    """This checkout's SSH key for dev VMs (made once, like the dev signing key)."""
    key = cache_dir() / "dev-ssh" / "id_ed25519"
    if not key.exists():
        if shutil.which("ssh-keygen") is None:
            raise BadInput("ssh-keygen not found: the dev VM's SSH key cannot be made", "apt install openssh-client")
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "maculaos-sdk dev VM", "-f", str(key)],
                       check=True)
    return key


def guest_config(key: Path, forwards: tuple[Forward, ...]) -> Path:
    """The node config the dev VM gets through fw_cfg: this checkout's key may log in as root, and the
    forwarded ports are open in the guest's firewall."""
    config = {"ssh_authorized_keys": [key.with_suffix(".pub").read_text().strip()],
              "firewall": {"open_ports": sorted({f"{f.guest}/tcp" for f in forwards if f.guest != 22})}}
    path = vm_dir() / "config.yaml"
    path.write_text("# written by `maculaos-sdk vm start`\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def image_for_profile(name: str, arch: str | None) -> Path:
    """Build the profile (what is cached stays cached) and return what to boot: its ISO, else a
    copy-on-write disk over its A/B disk image (kept between starts while the image is unchanged)."""
    from .build import BuildOptions, build_image
    from .profile import load_profile

    artifacts = build_image(load_profile(name, {"arch": arch}), BuildOptions(output=sdk_root() / "out")).artifacts
    by_suffix = {path.suffix: path for path in artifacts.values()}
    if ".iso" in by_suffix:
        return by_suffix[".iso"]
    if ".qcow2" not in by_suffix:
        raise BadInput(f"profile {name} gives no ISO and no disk image", "add `iso` or `disk` to its outputs")
    base = by_suffix[".qcow2"]
    disk = vm_dir() / base.name
    if not disk.exists() or disk.stat().st_mtime < base.stat().st_mtime:
        disk.unlink(missing_ok=True)
        cow_disk(base, disk)
        ui.info(f"fresh dev disk {disk} over {base.name}")
    return disk


def save_forwards(forwards: tuple[Forward, ...]) -> None:
    (vm_dir() / "forwards.json").write_text(json.dumps({f.name: f.host for f in forwards}) + "\n")


def saved_ssh_port() -> int:
    path = vm_dir() / "forwards.json"
    try:
        return int(json.loads(path.read_text())["ssh"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput("no dev VM started from this checkout", "start one with `maculaos-sdk vm start`, "
                       "or give --port") from exc


def ssh_command(port: int, key: Path, command: list[str]) -> list[str]:
    return ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "root@127.0.0.1",
            *command]
