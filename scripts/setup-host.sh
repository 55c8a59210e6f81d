#!/usr/bin/env bash
# Prepare a Debian 12 host for maculaos-sdk from nothing: packages, a running docker engine,
# binfmt for foreign arches, and the Python venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(docker.io mmdebstrap qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64
          qemu-user-static binfmt-support arch-test minisign python3-venv fdisk mtools dosfstools xz-utils openssh-client
          debian-archive-keyring shellcheck cryptsetup-bin device-tree-compiler swtpm tpm2-tools tang clevis jose wget
          grub-emu docker-registry)
# lint: shellcheck; unit tests: a LUKS2 header in a file, the Pi's locking overlay, a key sealed to a swtpm
# (tpm2-tools), a key encrypted to a Tang server (tangd; clevis, to check our format against; jose and wget, as
# luks.sh uses them), GRUB's own boot decision on each cut of the crash matrix (grub-emu); QEMU tests: swtpm, a
# guest's TPM 2.0; tangd, the network key source's server; the shared stage cache: an OCI registry (docker-registry)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A docker engine: use the one that answers, else start dockerd and wait for its socket.
if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd"
  $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start, see /var/log/dockerd.log" >&2; exit 1; }
fi

# binfmt for arm64 userland (foreign-arch stage builds).
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || echo "setup: cannot mount binfmt_misc (arm64 builds will fail)"
fi
if [ -e /proc/sys/fs/binfmt_misc/status ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  $SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi

# Python environment with the SDK installed in editable mode.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: done ($(docker version --format '{{.Server.Version}}' 2>/dev/null) engine; .venv ready)"
