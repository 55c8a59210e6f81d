#!/bin/sh
# Build-time stand-ins for maintainer-script work whose result does not depend on the CPU the image is for.
# Measured under qemu-user (arm64 core on a 2-core amd64 host), these were most of the package install:
# byte-compiling Python's standard library 160 s, udev's hardware database 66 s, the CA bundle 90 s (and
# 124 s of the base's bootstrap), SSH host keys that configure-rootfs deletes anyway 40 s, and the systemd
# unit bookkeeping of deb-systemd-helper, which an OpenRC system never reads. The rootfs stage's native step
# (native-steps.sh, in the build host's tools image) makes the bytecode, hwdb.bin and the CA bundle instead.
#   stand-ins.sh add PY   before apt-get install (PY: the python3.N that python3-minimal pre-depends on)
#   stand-ins.sh remove   after it: each diverted program is the package's own again
# Run by the native busybox sh (see native-shell.j2); the programs it calls are the image's.
set -eu
MARK="maculaos-sdk build-time stand-in"
LIST=/.maculaos-build/stand-ins
PROGRAMS="/usr/sbin/update-ca-certificates /usr/bin/systemd-hwdb /usr/bin/py3compile /usr/bin/deb-systemd-helper
/usr/bin/deb-systemd-invoke"

divert() {  # divert() PATH SCRIPT-BODY: the package's file goes to PATH.maculaos-real, the stand-in to PATH
  dpkg-divert --quiet --local --rename --divert "$1.maculaos-real" --add "$1"
  mkdir -p "${1%/*}"
  printf '#!/bin/sh\n# %s (stages/30-rootfs/stand-ins.sh)\n%s\n' "$MARK" "$2" > "$1"
  chmod 755 "$1"
  echo "$1" >> "$LIST"
}

add() {
  mkdir -p /.maculaos-build /etc/ssh
  : > "$LIST"
  case "$1" in
    python3.[0-9]*) ;;
    *) echo "stand-ins: '$1' is not a python3.N name (apt-cache depends python3-minimal)" >&2; exit 3 ;;
  esac
  for prog in $PROGRAMS; do divert "$prog" "exit 0"; done
  # Debian's postinst byte-compiles the standard library with `python3.N -E -S .../py_compile.py FILES`;
  # that one call is skipped, every other use of the interpreter is the real one.
  divert "/usr/bin/$1" "case \"\$1 \$2 \$3\" in \"-E -S /usr/lib/$1/py_compile.py\") exit 0;; esac
exec /usr/bin/$1.maculaos-real \"\$@\""
  for kind in rsa ecdsa ed25519; do  # present, so openssh-server's postinst generates none
    [ -e "/etc/ssh/ssh_host_${kind}_key" ] || echo "$MARK" > "/etc/ssh/ssh_host_${kind}_key"
  done
}

remove() {
  while read -r prog; do
    rm -f "$prog"
    dpkg-divert --quiet --local --rename --remove "$prog"
    if [ -e "$prog" ] && grep -q "$MARK" "$prog"; then
      echo "stand-ins: $prog is still the stand-in" >&2; exit 3
    fi
  done < "$LIST"
  for key in /etc/ssh/ssh_host_*_key; do
    if [ -f "$key" ] && grep -q "$MARK" "$key"; then rm -f "$key"; fi
  done
  rm -f "$LIST"
}

case "${1:-}" in
  add) add "${2:-}" ;;
  remove) remove ;;
  *) echo "usage: stand-ins.sh add PY|remove" >&2; exit 2 ;;
esac
