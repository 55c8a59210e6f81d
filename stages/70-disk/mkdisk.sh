#!/bin/sh
# Assemble the A/B disk image from parts made on plain files; slot B starts empty (all zeros).
# Sizes, names, type GUIDs and data folders come from maculaos_device.layout, the module the device's installer uses.
set -eu
esp_mb=$1 slot_mb=$2 data_mb=$3 size_mb=$4 sde=$5 version=$6 profile=$7
sq=/work/rootfs.squashfs img=/work/disk.raw
# shellcheck source=stages/_shared/image-parts.sh
. /src/image-parts.sh
plan_sizes
rm -f $img; truncate -s ${need}M $img
layout --fixed-ids | sfdisk -q $img

slot_record "$version" "$profile" > /work/esp/A/slot.json
# ESP: FAT made on a file, filled with mtools, timestamps from SOURCE_DATE_EPOCH where the tools allow.
find /work/esp -exec touch -h -d "@$sde" {} +
mkfs.vfat -C -n MACULA_ESP -i 4d41434c /work/esp.img $((esp_mb * 1024)) >/dev/null
mcopy -s -m -i /work/esp.img /work/esp/* ::/
write_at /work/esp.img 1
write_at $sq $((1 + esp_mb))  # slot A: the squashfs itself is the partition's content
make_data_image
write_at /work/data.img $((1 + esp_mb + 2 * slot_mb))
mkdir -p /out
qemu-img convert -f raw -O qcow2 $img /out/disk.qcow2
layout --json > /out/layout.json
cat /out/layout.json; sfdisk -d $img
