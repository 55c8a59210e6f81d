"""Fixtures for the arm64 and Raspberry Pi tests: arm64 builds on this host (only the root filesystem is
emulated) and the QEMU machine factory of tests/qemu. Run with `make test-arm64`; not part of `make test`
yet: on a fresh 2-core machine these builds and TCG boots add about 25 minutes to CI's 35."""

from __future__ import annotations

from pathlib import Path

import pytest

from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.profile import load_profile

from ..conftest import OUT

QEMU_PROFILES = Path(__file__).parents[1] / "profiles"


@pytest.fixture(scope="session")
def arm64_build() -> dict[str, Path]:
    """The test profile for arm64 (UEFI ISO, A/B disk, bundle): only its root filesystem is built emulated."""
    return build_image(load_profile("test", {"arch": "arm64"}), BuildOptions(output=OUT / "arm64")).artifacts


@pytest.fixture(scope="session")
def arm64_update_bundle() -> Path:
    """A signed 0.2.0 arm64 bundle of the test profile."""
    profile = load_profile(str(QEMU_PROFILES / "test-update.yaml"), {"arch": "arm64"})
    return build_image(profile, BuildOptions(output=OUT / "arm64-update")).artifacts[
        "maculaos-test-0.2.0-arm64.bundle"]


@pytest.fixture(scope="session")
def rpi4_build() -> dict[str, Path]:
    """The test profile for the Raspberry Pi 4: SD image and bundle."""
    return build_image(load_profile("test", {"arch": "arm64", "board": "rpi4"}),
                       BuildOptions(output=OUT / "rpi4")).artifacts
