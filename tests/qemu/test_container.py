"""The root filesystem as a tarball and a container image (outputs tar and oci), built through the docker engine
from core's stages, and the container image started with its own init. Checked: the tarball's entries and owners,
and the runlevel OpenRC reached in the container (rc-status), not what anything printed."""

from __future__ import annotations

import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.profile import load_profile

from .conftest import OUT

pytestmark = pytest.mark.qemu
TAG = "maculaos-container:0.1.0-amd64"


def _services(container: str) -> dict[str, str]:
    """service -> state in the default runlevel, as `rc-status default` lists them."""
    out = subprocess.run(["docker", "exec", container, "rc-status", "default"], capture_output=True, text=True).stdout
    return {parts[0]: parts[-2] for line in out.splitlines() if len(parts := line.split()) >= 4 and parts[-1] == "]"}


def test_the_rootfs_as_a_tarball_and_a_container_that_boots_its_own_init(tmp_path):
    profile = load_profile(str(Path(__file__).parent / "profiles" / "container.yaml"))
    out = OUT / "container"
    result = build_image(profile, BuildOptions(output=out))
    tarball = result.artifacts["maculaos-container-0.1.0-amd64.rootfs.tar"]
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar}
    # the squashfs's packages with the profile layer over them, as a node sees its root
    assert members["./usr/bin/python3"].isfile() or members["./usr/bin/python3"].issym()
    assert members["./etc/runlevels/default/maculaos-config"].linkname == "/etc/init.d/maculaos-config"
    assert members["./usr/sbin/maculaos"].mode & 0o111 and members["./etc/shadow"].mode & 0o777 == 0o640
    assert {m.mtime for m in members.values()} == {profile.settings.source_date_epoch}
    assert (members["./etc/shadow"].uid, members["./etc/shadow"].gname) == (0, "")  # numeric owners only
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", TAG], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert result.manifest and f'"image_id": "{image_id}"' in result.manifest.read_text()
    release = subprocess.run(["docker", "run", "--rm", "--entrypoint", "cat", TAG, "/usr/lib/os-release"],
                             capture_output=True, text=True, check=True).stdout
    assert 'NAME="MaculaOS"' in release
    # its init: sysvinit, then OpenRC's default runlevel. Unprivileged, the firewall cannot load its table, so
    # the node fails closed there too: no networking, no sshd.
    container = subprocess.run(["docker", "run", "-d", TAG], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline, services = time.monotonic() + 120, {}
        while time.monotonic() < deadline and services.get("maculaos-confirm") != "started":
            time.sleep(2)
            services = _services(container)
        assert services.get("chrony") == "started" and services.get("maculaos-log") == "started", services
        assert services.get("maculaos-firewall") != "started" and services.get("ssh") != "started", services
        assert subprocess.run(["docker", "exec", container, "cat", "/proc/1/comm"], capture_output=True,
                              text=True).stdout.strip() == "init"
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
