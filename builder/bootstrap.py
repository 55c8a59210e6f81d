"""Bootstrap the Debian base from Debian's archive with mmdebstrap (no Docker Hub needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import IO, Any

from .arch import Architecture
from .errors import BuildFailed

NODOC = ["path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
         "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
         "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias"]
# No fsync per unpacked file: an interrupted bootstrap is redone anyway, and with other stages writing beside it
# each fsync waited on their data too (the arm64 bootstrap took 221 s beside them, 170 s alone). mmdebstrap keeps
# its dpkg options in the base (99mmdebstrap), so the later stages' installs run unsafe-io as well;
# configure-rootfs.sh takes the option out of the image.
DPKG_OPTIONS = [*NODOC, "force-unsafe-io"]


# The only keys the bootstrap trusts: Debian's archive keys, not every key the build host's apt trusts (a third
# party's repository key there could otherwise sign a Debian mirror's Release file).
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def mmdebstrap_command(params: dict[str, Any], tarball: Path) -> list[str]:
    """The mmdebstrap invocation for the base params (see render.bootstrap_params)."""
    cmd = ["mmdebstrap", "--mode=root", f"--variant={params['variant']}", f"--arch={params['arch']}",
           f"--components={','.join(params['components'])}", "--skip=output/mknod",
           f"--keyring={DEBIAN_KEYRING}", "--aptopt=Acquire::Retries \"5\""]
    if params["include"]:
        cmd.append(f"--include={','.join(params['include'])}")
    cmd += [f"--dpkgopt={opt}" for opt in params["dpkg_options"]]
    cmd += [params["suite"], str(tarball), *params["sources"]]
    return cmd


def check_foreign_arch(arch: str) -> None:
    """A foreign-arch bootstrap needs arch-test (mmdebstrap asks it) and a working binfmt handler: say which is
    missing, instead of letting mmdebstrap fail in a way that looks like an unreachable mirror."""
    if Architecture(arch).is_native:
        return
    if shutil.which("arch-test") is None:
        raise BuildFailed(f"arch-test is not installed: mmdebstrap needs it to bootstrap {arch} on this host",
                          "run `make setup` (apt-get install arch-test)")
    probe = subprocess.run(["arch-test", arch], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise BuildFailed(f"this host cannot run {arch} programs ({probe.stdout.strip() or probe.stderr.strip()})",
                          "run `make setup` (qemu-user-static, binfmt-support; `update-binfmts --enable "
                          f"{Architecture(arch).binfmt_name}`)")


def bootstrap(params: dict[str, Any], tarball: Path, log: IO[str]) -> None:
    """Create the base rootfs tarball; atomic (a killed run leaves no half tarball behind)."""
    if shutil.which("mmdebstrap") is None:
        raise BuildFailed("mmdebstrap is not installed", "run `make setup` (apt-get install mmdebstrap)")
    if not DEBIAN_KEYRING.is_file():
        raise BuildFailed(f"{DEBIAN_KEYRING} is missing: the bootstrap trusts Debian's archive keys alone",
                          "run `make setup` (apt-get install debian-archive-keyring)")
    check_foreign_arch(params["arch"])
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f"{tarball.name}.{os.getpid()}.partial.tar")
    cmd = mmdebstrap_command(params, partial)
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(params["sde"]))
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"mmdebstrap failed with exit code {proc.returncode}",
                          f"is {params['mirror']} reachable? see the base stage log")
    os.replace(partial, tarball)
