"""Fixtures for the arm64 and Raspberry Pi tests: arm64 builds on this host (only the root filesystem is
emulated) and the QEMU machine factory of tests/qemu. Part of `make test`; `make test-arm64` runs only these."""

from __future__ import annotations

from pathlib import Path

import pytest

from maculaos_sdk.profile import load_profile

from ..conftest import OUT, build_once

QEMU_PROFILES = Path(__file__).parents[1] / "profiles"


@pytest.fixture(scope="session")
def arm64_build(tmp_path_factory) -> dict[str, Path]:
    """The test profile for arm64 (UEFI ISO, A/B disk, bundle): only its root filesystem is built emulated."""
    return build_once(tmp_path_factory, "test-arm64", load_profile("test", {"arch": "arm64"}), OUT / "arm64")


@pytest.fixture(scope="session")
def arm64_update_bundle(tmp_path_factory) -> Path:
    """A signed 0.2.0 arm64 bundle of the test profile."""
    profile = load_profile(str(QEMU_PROFILES / "test-update.yaml"), {"arch": "arm64"})
    return build_once(tmp_path_factory, "update-arm64", profile, OUT / "arm64-update")[
        "maculaos-test-0.2.0-arm64.bundle"]


@pytest.fixture(scope="session", params=["rpi4", "rpi5"])
def rpi_build(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """The test profile for a Raspberry Pi board: (board, its SD image and bundle)."""
    board = request.param
    profile = load_profile("test", {"arch": "arm64", "board": board})
    return board, build_once(tmp_path_factory, f"test-{board}", profile, OUT / board)
