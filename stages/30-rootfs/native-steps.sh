#!/bin/sh
# What stand-ins.sh kept the (possibly emulated) package install from making, made here with the build host's
# own tools: the same files, for any target CPU. native-steps.sh TARGET OUT: TARGET holds the installed
# packages' /usr/lib, /usr/share/ca-certificates and /etc; the files to lay over the root go to OUT/root.
set -eu
target=$1 root=$2/root
mkdir -p "$root/.maculaos-build"

# Python bytecode, hash-based: the squashfs gives every file one mtime, so timestamp-based .pyc files (what
# Debian's postinst writes) would all be stale on the device and recompiled in memory at every start.
for lib in "$target"/usr/lib/python3.[0-9]*; do
  [ -d "$lib" ] || continue
  py=${lib##*/}
  if ! command -v "$py" >/dev/null; then  # another Python than the tools image's: compiled by the image's own
    echo "$py" >> "$root/.maculaos-build/python-not-compiled"
    continue
  fi
  dirs=$lib
  [ -d "$target/usr/lib/python3/dist-packages" ] && dirs="$dirs $target/usr/lib/python3/dist-packages"
  # shellcheck disable=SC2086
  "$py" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$target" -p / $dirs >/dev/null
done
(cd "$target" && find usr/lib -path '*/__pycache__/*.pyc' | cpio -pdm --quiet "$root")

# udev's hardware database, as the package's postinst makes it (systemd-hwdb --usr update)
if [ -d "$target/usr/lib/udev/hwdb.d" ]; then
  systemd-hwdb --root "$target" --usr update
  mkdir -p "$root/usr/lib/udev"
  cp "$target/usr/lib/udev/hwdb.bin" "$root/usr/lib/udev/hwdb.bin"
fi

# The CA bundle and hash links in /etc/ssl/certs, from the image's certificates and its ca-certificates.conf
if [ -f "$target/etc/ca-certificates.conf" ]; then
  rm -rf /usr/share/ca-certificates /usr/local/share/ca-certificates /etc/ssl/certs
  cp -a "$target/usr/share/ca-certificates" /usr/share/
  mkdir -p /usr/local/share/ca-certificates /etc/ssl/certs
  cp "$target/etc/ca-certificates.conf" /etc/ca-certificates.conf
  update-ca-certificates --fresh >/dev/null
  mkdir -p "$root/etc/ssl"
  cp -a /etc/ssl/certs "$root/etc/ssl/"
fi
