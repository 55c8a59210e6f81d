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
