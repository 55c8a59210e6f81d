"""The README's build command for real: the core ISO, its cache behaviour, a killed build, a boot."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import pytest
import yaml

from maculaos_sdk.engine import LABEL_STAGE_ID
from maculaos_sdk.paths import sdk_root

from .conftest import OUT, once_per_run

pytestmark = pytest.mark.qemu
CLI = [sys.executable, "-m", "maculaos_sdk.cli"]
CORE_ISO = OUT / "maculaos-core-0.1.0-amd64.iso"
CORE_STAGES = ("base", "tools", "kernel", "initrd", "rootfs", "layer", "squashfs", "bootloader", "iso")


def _build(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "build-image", *args], cwd=sdk_root(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def core_build(tmp_path_factory) -> None:
    """The README's build command, run once per test run (parallel workers share it)."""

    def build() -> dict[str, Path]:
        proc = _build("--profile", "core", "--arch", "amd64", "-o", str(OUT))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {CORE_ISO.name: CORE_ISO}

    once_per_run(tmp_path_factory, "core-amd64", build)


def test_core_iso_artifacts(core_build):
    assert CORE_ISO.is_file()
    limit = yaml.safe_load((sdk_root() / "profiles" / "core.yaml").read_text())["size"]["iso_max_mb"]
    assert CORE_ISO.stat().st_size <= limit * 1024 * 1024  # one limit: the profile's, the build enforces it too
    digest, name = (OUT / f"{CORE_ISO.name}.sha256").read_text().split()
    assert name == CORE_ISO.name
    assert digest == hashlib.sha256(CORE_ISO.read_bytes()).hexdigest()
    manifest = json.loads((OUT / "maculaos-core-0.1.0-amd64.manifest.json").read_text())
    assert manifest["profile"] == "core" and manifest["version"] == "0.1.0" and manifest["arch"] == "amd64"
    assert set(manifest["stages"]) == set(CORE_STAGES)
    assert manifest["packages"]["openrc"] and manifest["packages"]["htop"]
    assert manifest["kernel"]["package"].startswith("linux-image-")
    assert manifest["artifacts"][CORE_ISO.name]["sha256"] == digest
    # every stage the manifest names is the engine's image of that id, labelled with it
    engine = docker.from_env()
    for key, stage in manifest["stages"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", stage["id"]) and stage["image"].endswith(":" + stage["id"][:32])
        assert engine.images.get(stage["image"]).labels[LABEL_STAGE_ID] == stage["id"], key


def test_no_change_rebuild_is_all_cached(core_build):
    start = time.monotonic()
    proc = _build("--profile", "core", "-o", str(OUT))
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    stages = json.loads((OUT / "maculaos-core-0.1.0-amd64.manifest.json").read_text())["stages"]
    assert {key: stage["cached"] for key, stage in stages.items()} == dict.fromkeys(CORE_STAGES, True), proc.stderr
    print(f"no-change rebuild: {took:.2f}s")


def test_killed_build_leaves_cache_usable(core_build, tmp_path):
    """An overlay edit rebuilds only the layer and the ISO; killing that build mid-stage loses nothing."""
    profile = tmp_path / "edited.yaml"
    profile.write_text(f"name: core\nextends: {sdk_root() / 'profiles' / 'core.yaml'}\n"
                       f"overlay:\n  /etc/maculaos-kill-test: '{uuid.uuid4()}'\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "build-image", "--config", str(profile), "-o", str(out)], cwd=sdk_root(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # what the killed build leaves stays here
    iso_log = out / "logs" / "60-iso.log"
    deadline = time.monotonic() + 1500  # it may first wait for another worker's build to finish
    while not (iso_log.exists() and " ---> Running in " in iso_log.read_text()):  # a RUN step of the ISO stage
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "iso stage never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate()[0]
    for stage in ("base", "tools", "kernel", "initrd", "rootfs", "squashfs"):  # the edit leaves the OS alone
        assert any(line.split()[:2] == [stage, "cached"] for line in first.splitlines()), first

    again = _build("--config", str(profile), "-o", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((out / "maculaos-core-0.1.0-amd64.manifest.json").read_text())["stages"]
    cached = {key: stage["cached"] for key, stage in stages.items()}
    assert cached == {**dict.fromkeys(CORE_STAGES, True), "iso": False}, \
        again.stderr  # the layer finished before the kill and is kept; the ISO, cut off, is built again
    assert (out / "maculaos-core-0.1.0-amd64.iso").is_file()


def test_core_iso_boots_to_a_login_that_refuses_passwordless_root(core_build, make_machine):
    """The release image (no test channel, no autologin) boots under BIOS to a login prompt on the serial
    console, where root without a password gets nothing."""
    m = make_machine(CORE_ISO, "core-bios", test_channel=False)
    m.start()
    m.wait_for_console_text(r"\n\S+ login: ", timeout=180)
    m.send_console("root\n")
    m.wait_for_console_text(r"Password: ", timeout=30)
    m.send_console("\n")
    assert m.wait_for_console_text(r"Login incorrect|root@\S+:~# ", timeout=60).group(0) == "Login incorrect"
