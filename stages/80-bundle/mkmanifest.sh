#!/bin/sh
# Write manifest.json for the bundle in the current folder: identity, compatibility and file checksums; the
# rootfs also gets the BLAKE2b-256 of each CHUNK_BYTES piece (maculaos_device.manifest: CHUNK_BYTES, chunk_digest),
# so a device checks what its slot reads back on all its CPUs at once.
# usage: mkmanifest.sh PROFILE VERSION ARCH BOARD MIN_VERSION SIGNING_KEY_ID CHUNK_BYTES
set -eu
case "$6" in ''|*[!0-9A-F]*) echo "mkmanifest: bad signing key id '$6'" >&2; exit 2 ;; esac
case "$7" in ''|*[!0-9]*) echo "mkmanifest: bad chunk size '$7'" >&2; exit 2 ;; esac
entry() { printf '"%s": {"size": %s, "sha256": "%s"' "$1" "$(stat -c %s "$1")" "$(sha256sum "$1" | cut -d' ' -f1)"; }
chunks() {  # chunks FILE N: ', "chunk_bytes": N, "chunk_blake2b": [...]'
  printf ', "chunk_bytes": %s, "chunk_blake2b": [%s]' "$2" \
    "$(split -b "$2" --filter='b2sum -l 256' "$1" | cut -d' ' -f1 | sed 's/.*/"&"/' | paste -sd, - | sed 's/,/, /g')"
}
printf '{"format": 1, "name": "maculaos", "profile": "%s", "version": "%s", "arch": "%s", "board": "%s", ' \
  "$1" "$2" "$3" "$4"
printf '"min_version": "%s", "signing_key_id": "%s", "files": {%s%s}, %s}, %s}}}\n' "$5" "$6" \
  "$(entry rootfs.squashfs)" "$(chunks rootfs.squashfs "$7")" "$(entry vmlinuz)" "$(entry initrd.img)"
