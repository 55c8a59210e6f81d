"""`maculaos-sdk doctor`: what this host has for building and booting images, and how to fix gaps."""

from __future__ import annotations

import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from . import ui
from .arch import Architecture
from .paths import cache_dir

SETUP = "make setup"


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _docker() -> Check:
    try:
        from .engine import connect

        version = connect().version().get("Version", "?")
        return Check("docker engine", True, f"reachable, server {version}")
    except Exception as exc:
        msg = getattr(exc, "message", str(exc))
        return Check("docker engine", False, msg, f"{SETUP} (installs docker.io and starts dockerd)")


def _tool(name: str, package: str, required: bool = True) -> Check:
    path = shutil.which(name)
    return Check(name, path is not None, path or "missing", f"{SETUP} (apt-get install {package})", required)


def _kvm() -> Check:
    from .vm import kvm_usable

    ok = kvm_usable()
    detail = "a KVM guest runs" if ok else "not usable (no /dev/kvm, or a probe guest failed); VMs use TCG"
    return Check("KVM", ok, detail, "none needed: TCG works, only slower", required=False)


def _binfmt(arch: Architecture) -> Check:
    entry = Path("/proc/sys/fs/binfmt_misc") / arch.binfmt_name
    ok = entry.exists() and "enabled" in entry.read_text()
    return Check(f"binfmt {arch.value}", ok, "enabled" if ok else "not registered (foreign-arch builds fail)",
                 f"{SETUP} (qemu-user-static + binfmt_misc)", required=False)


def _firmware(arch: Architecture) -> Check:
    found = next((p for p in arch.efi_firmware if p.exists()), None)
    pkg = "ovmf" if arch is Architecture.amd64 else "qemu-efi-aarch64"
    return Check(f"UEFI firmware {arch.value}", found is not None, str(found or "missing"),
                 f"{SETUP} (apt-get install {pkg})", required=arch is Architecture.amd64)


def _disk() -> Check:
    target = cache_dir()
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free / 2**30
    docker_root = Path("/var/lib/docker")
    if docker_root.exists():
        free = min(free, shutil.disk_usage(docker_root).free / 2**30)
    return Check("disk space", free >= 10, f"{free:.0f} GiB free", "free at least 10 GiB (maculaos-sdk gc, "
                 "docker system df)")


def _stage_images() -> Check:
    from . import gc
    from .engine import connect

    try:
        listing = gc.list_images(connect())
        limit = gc.cache_max()
    except Exception as exc:
        return Check("stage-image cache", False, getattr(exc, "message", str(exc)), "see the docker engine check",
                     required=False)
    total = listing.held(listing.images)
    return Check("stage-image cache", total <= limit, f"{len(listing.images)} images, {gc.human(total)} "
                 f"(limit {gc.human(limit)}, MACULAOS_SDK_CACHE_MAX)", "maculaos-sdk gc", required=False)


def run_checks() -> list[Check]:
    """Every host check, fastest first."""
    host = Architecture.host()
    foreign = [a for a in Architecture if a is not host]
    return [
        _docker(),
        _tool("mmdebstrap", "mmdebstrap"),
        _tool("minisign", "minisign"),
        _tool("qemu-img", "qemu-utils"),
        _tool("qemu-system-x86_64", "qemu-system-x86"),
        _tool("qemu-system-aarch64", "qemu-system-arm", required=False),
        _firmware(Architecture.amd64),
        _firmware(Architecture.arm64),
        _kvm(),
        *[_binfmt(a) for a in foreign],
        _disk(),
        _stage_images(),
        *_registry(),
    ]


def _registry() -> list[Check]:
    """The stage cache registry named by MACULAOS_SDK_CACHE_REGISTRY, when it names one."""
    from .errors import SdkError
    from .registry import ENV, StageRegistry

    url = os.environ.get(ENV, "")
    if not url:
        return []
    try:
        StageRegistry.parse(url, where=ENV).check()
    except SdkError as exc:
        return [Check("cache registry", False, exc.message, exc.hint or f"fix or unset {ENV}")]
    return [Check("cache registry", True, f"{url} answers")]


WIDTH = 80  # the report fits a standard terminal
NAME, STATUS = 21, 10  # column widths


def print_report(checks: list[Check]) -> None:
    """One line per check (wrapped under its detail column), and the fix below any that failed."""
    indent = " " * (2 + NAME + STATUS)
    ui.console.print("maculaos-sdk doctor", highlight=False)
    for c in checks:
        status, colour = ("ok", "green") if c.ok else (("missing", "red") if c.required else ("optional", "yellow"))
        lines = textwrap.wrap(c.detail, WIDTH - len(indent)) or [""]
        ui.console.print(f"  {c.name:<{NAME}}[{colour}]{status:<{STATUS}}[/]{lines[0]}", highlight=False)
        for line in lines[1:]:
            ui.console.print(indent + line, highlight=False)
        if not c.ok and c.fix:
            for i, line in enumerate(textwrap.wrap(c.fix, WIDTH - len(indent) - 3)):
                ui.console.print(f"{indent}{'-> ' if i == 0 else '   '}{line}", highlight=False)
