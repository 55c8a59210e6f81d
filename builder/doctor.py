"""`maculaos-sdk doctor`: what this host has for building and booting images, and how to fix gaps."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

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


def _buildkit() -> Check:
    ok = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0 \
        if shutil.which("docker") else False
    return Check("BuildKit (buildx)", ok, "available" if ok else "not installed; the SDK uses the engine's "
                 "classic builder through the docker API, so it is not needed", "apt-get install docker-buildx",
                 required=False)


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
        images = gc.stage_images(connect())
        limit = gc.cache_max()
    except Exception as exc:
        return Check("stage-image cache", False, getattr(exc, "message", str(exc)), "see the docker engine check",
                     required=False)
    total = gc.total_size(images)
    return Check("stage-image cache", total <= limit, f"{len(images)} images, {gc.human(total)} "
                 f"(limit {gc.human(limit)}, MACULAOS_SDK_CACHE_MAX)", "maculaos-sdk gc", required=False)


def run_checks() -> list[Check]:
    """Every host check, fastest first."""
    host = Architecture.host()
    foreign = [a for a in Architecture if a is not host]
    return [
        _docker(),
        _buildkit(),
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
    ]


def print_report(checks: list[Check]) -> None:
    table = Table(title="maculaos-sdk doctor", show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    table.add_column("fix")
    for c in checks:
        status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]optional[/]")
        table.add_row(c.name, status, c.detail, "" if c.ok else c.fix)
    ui.console.print(table)
