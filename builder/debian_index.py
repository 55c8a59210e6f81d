"""Check a profile's Debian package names against the archive's index before anything is built."""

from __future__ import annotations

import difflib
import lzma
import time
from pathlib import Path

import requests

from . import ui
from .errors import BadInput, BadInputs
from .paths import cache_dir
from .plan import BOOT_PACKAGES
from .profile import Profile

MAX_AGE = 24 * 3600


def _index_file(mirror: str, suite: str, component: str, arch: str) -> Path:
    safe = mirror.split("://", 1)[-1].replace("/", "_")
    return cache_dir() / "debian-index" / f"{safe}-{suite}-{component}-{arch}.names"


def package_names(mirror: str, suite: str, components: list[str], arch: str, *, offline: bool) -> set[str] | None:
    """Every package and virtual package name in the suite (cached a day); None when it cannot be had."""
    names: set[str] = set()
    for component in components:
        path = _index_file(mirror, suite, component, arch)
        fresh = path.is_file() and (offline or time.time() - path.stat().st_mtime < MAX_AGE)
        if not fresh and not offline:
            url = f"{mirror.rstrip('/')}/dists/{suite}/{component}/binary-{arch}/Packages.xz"
            try:
                r = requests.get(url, timeout=60)
                r.raise_for_status()
                found: set[str] = set()
                for line in lzma.decompress(r.content).decode(errors="replace").splitlines():
                    if line.startswith("Package: "):
                        found.add(line[9:].strip())
                    elif line.startswith("Provides: "):
                        found.update(p.split("(")[0].strip() for p in line[10:].split(","))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text("\n".join(sorted(found)) + "\n")
                tmp.replace(path)
            except (requests.RequestException, lzma.LZMAError) as exc:
                if not path.is_file():
                    ui.info(f"[yellow]note:[/] cannot check package names ({url}: {str(exc)[:100]}); apt will")
                    return None
        if not path.is_file():
            ui.info("[yellow]note:[/] no cached package index (--offline): package names are left to apt")
            return None
        names.update(path.read_text().split())
    return names


def check_packages(profile: Profile, *, offline: bool = False) -> None:
    """Report every unknown package name at once (file:line: packages: ... hint), before any build step."""
    deb = profile.settings.debian
    known = package_names(deb.mirror, deb.suite, list(deb.components), profile.arch.value, offline=offline)
    if known is None:
        return
    errors = []
    for name in sorted(set(profile.settings.packages) | set(BOOT_PACKAGES)):
        if name not in known:
            file, line = _where(profile, name)
            close = difflib.get_close_matches(name, [k for k in known if k[:1] == name[:1]], n=1, cutoff=0.7)
            hint = f"did you mean `{close[0]}`?" if close else "search with `apt-cache search` or packages.debian.org"
            errors.append(BadInput(f"{file}:{line}: packages: {name!r} is not a package in Debian {deb.suite} "
                                   f"({', '.join(deb.components)}, {profile.arch.value})", hint))
    if errors:
        raise BadInputs(errors)


def _where(profile: Profile, package: str) -> tuple[str, int]:
    """The profile file and line listing `package` (the sdk's own boot packages: builder/plan.py)."""
    for path in profile.files:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip().lstrip("-").strip().strip("'\"") == package:
                return str(path), number
    return "builder/plan.py (BOOT_PACKAGES)", 1
