#!/bin/sh
# Shared by the disk and SD image stages (sourced): sizes from maculaos_device.layout, the data partition made from a
# folder, and writing a part into the image at its offset. Plain files only, no loop devices.
# Callers set: sq (the squashfs), esp_mb slot_mb data_mb size_mb (the disk.* settings), sde, img.
# shellcheck disable=SC2154  # those variables are the callers'

# device MODULE ARGS...: one of the device's own modules, as the node runs it (context source device-modules)
device() {
  module=$1
  shift
  PYTHONPATH=/src python3 -m "maculaos_device.$module" "$@"
}

layout() {
  device layout sfdisk --squashfs-bytes "$(stat -c %s "$sq")" --esp-mb "$esp_mb" --slot-mb "$slot_mb" \
    --data-mb "$data_mb" --size-mb "$size_mb" "$@"
}

# esp_mb slot_mb data_mb need sq_mb, as maculaos_device.layout plans them for this squashfs
plan_sizes() {
  sizes=$(layout --sizes) || { echo "$0: the disk.* settings do not fit this squashfs" >&2; exit 3; }
  # shellcheck disable=SC2034  # need and sq_mb are the callers' to use
  read -r esp_mb slot_mb data_mb need sq_mb <<SIZES
$sizes
SIZES
}

# /work/data.img: ext4 holding the data folders, fixed UUID and hash seed (reproducible)
make_data_image() {
  for d in $(device layout data-dirs); do mkdir -p "/work/data/$d"; done
  find /work/data -exec touch -h -d "@$sde" {} +
  mkfs.ext4 -q -F -L MACULA_DATA -U 4d41434c-0005-4000-8000-000000000005 \
    -E root_owner=0:0,hash_seed=4d41434c-0006-4000-8000-000000000006 -d /work/data /work/data.img "${data_mb}M"
}

# slot_record VERSION PROFILE: slot A's record for the ESP (<esp>/A/slot.json), written by the device's own writer
# (maculaos_device.manifest): without it the tool never rolls back to slot A
slot_record() {
  device manifest slot-record "$sq" "$1" "$2"
}

# write_at FILE MIB: FILE into the image, starting MIB MiB in
write_at() {
  dd if="$1" of="$img" bs=1M seek="$2" conv=notrunc status=none
}
