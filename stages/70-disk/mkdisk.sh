#!/bin/sh
# Assemble the A/B disk image from parts made on plain files; slot B starts empty (all zeros).
# Sizes, names, type GUIDs and data folders come from layout.py, the module the device's installer uses.
set -eu
esp_mb=$1 slot_mb=$2 data_mb=$3 size_mb=$4 sde=$5
sq=/work/rootfs.squashfs
layout() { python3 /src/layout.py sfdisk --squashfs-bytes "$(stat -c %s $sq)" --esp-mb "$esp_mb" \
             --slot-mb "$slot_mb" --data-mb "$data_mb" --size-mb "$size_mb" "$@"; }
sizes=$(layout --sizes) || { echo "mkdisk: the disk.* settings do not fit this squashfs" >&2; exit 3; }
read -r esp_mb slot_mb data_mb need sq_mb <<EOF2
$sizes
EOF2
img=/work/disk.raw
rm -f $img; truncate -s ${need}M $img
layout --fixed-ids | sfdisk -q $img

# ESP: FAT made on a file, filled with mtools, timestamps from SOURCE_DATE_EPOCH where the tools allow.
find /work/esp -exec touch -h -d "@$sde" {} +
mkfs.vfat -C -n MACULA_ESP -i 4d41434c /work/esp.img $((esp_mb * 1024)) >/dev/null
mcopy -s -m -i /work/esp.img /work/esp/* ::/
dd if=/work/esp.img of=$img bs=1M seek=1 conv=notrunc status=none
# Slot A: the squashfs itself is the partition's content.
dd if=$sq of=$img bs=1M seek=$((1 + esp_mb)) conv=notrunc status=none
# Data: ext4 from a folder (mkfs.ext4 -d), fixed UUID and hash seed.
for d in $(python3 /src/layout.py data-dirs); do mkdir -p "/work/data/$d"; done
find /work/data -exec touch -h -d "@$sde" {} +
mkfs.ext4 -q -F -L MACULA_DATA -U 4d41434c-0005-4000-8000-000000000005 \
  -E root_owner=0:0,hash_seed=4d41434c-0006-4000-8000-000000000006 -d /work/data /work/data.img ${data_mb}M
dd if=/work/data.img of=$img bs=1M seek=$((1 + esp_mb + 2 * slot_mb)) conv=notrunc status=none
mkdir -p /out
qemu-img convert -f raw -O qcow2 $img /out/disk.qcow2
layout --json > /out/layout.json
cat /out/layout.json; sfdisk -d $img
