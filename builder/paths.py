"""Where the SDK finds its own tree (stages/, overlay/, profiles/) and where it writes."""

from __future__ import annotations

import os
from pathlib import Path


def sdk_root() -> Path:
    """The repository root holding stages/, overlay/ and profiles/ (override: MACULAOS_SDK_ROOT)."""
    env = os.environ.get("MACULAOS_SDK_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent


def stages_dir() -> Path:
    return sdk_root() / "stages"


def profiles_dir() -> Path:
    return sdk_root() / "profiles"


def overlay_dir() -> Path:
    return sdk_root() / "overlay"


def cache_dir() -> Path:
    """Scratch space for build contexts and bootstrap tarballs (override: MACULAOS_SDK_CACHE)."""
    env = os.environ.get("MACULAOS_SDK_CACHE")
    return Path(env).resolve() if env else sdk_root() / ".cache"


def state_dir() -> Path:
    """Per-machine state shared by every checkout, e.g. which stage images builds used last
    (override: MACULAOS_SDK_STATE; default $XDG_STATE_HOME/maculaos-sdk or ~/.local/state/maculaos-sdk)."""
    env = os.environ.get("MACULAOS_SDK_STATE")
    if env:
        return Path(env).resolve()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "maculaos-sdk"
