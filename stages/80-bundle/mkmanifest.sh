#!/bin/sh
# Write manifest.json for the bundle in the current folder: identity, compatibility and file checksums.
# usage: mkmanifest.sh PROFILE VERSION ARCH BOARD MIN_VERSION SIGNING_KEY_ID
set -eu
case "$6" in ''|*[!0-9A-F]*) echo "mkmanifest: bad signing key id '$6'" >&2; exit 2 ;; esac
entry() { printf '"%s": {"size": %s, "sha256": "%s"}' "$1" "$(stat -c %s "$1")" "$(sha256sum "$1" | cut -d' ' -f1)"; }
printf '{"format": 1, "name": "maculaos", "profile": "%s", "version": "%s", "arch": "%s", "board": "%s", ' \
  "$1" "$2" "$3" "$4"
printf '"min_version": "%s", "signing_key_id": "%s", "files": {%s, %s, %s}}\n' "$5" "$6" \
  "$(entry rootfs.squashfs)" "$(entry vmlinuz)" "$(entry initrd.img)"
