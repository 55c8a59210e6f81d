#!/bin/sh
# Assemble the Raspberry Pi SD image from parts made on plain files (no loop devices): MBR from maculaos_device.layout,
# p1 FAT32 boot partition (Pi firmware, U-Boot, device trees, config.txt, GRUB + grubenv, slot A's kernel
# and initrd in /A), p2 slot A = the squashfs, p3 slot B empty, p4 data (ext4). Compressed with xz.
set -eu
board=$1 esp_mb=$2 slot_mb=$3 data_mb=$4 size_mb=$5 sde=$6 version=$7 profile=$8
sq=/work/rootfs.squashfs boot=/work/boot img=/work/sd.img
# shellcheck source=stages/_shared/image-parts.sh
. /src/image-parts.sh
plan_sizes

case "$board" in
  rpi4) soc=bcm2711; firmware="start4.elf fixup4.dat" ;;
  rpi5) soc=bcm2712; firmware="" ;;  # the Pi 5 EEPROM carries its own start.elf
  *) echo "mksdimage: no SD layout for board $board" >&2; exit 3 ;;
esac
for f in $firmware; do cp "/fw/usr/lib/raspi-firmware/$f" $boot/; done
cp /fw/usr/lib/u-boot/rpi_arm64/u-boot.bin $boot/u-boot.bin
n=$(find /work/dtbs -name "$soc-*.dtb" | wc -l)
[ "$n" -gt 0 ] || { echo "mksdimage: the kernel ships no $soc device trees" >&2; exit 3; }
find /work/dtbs -name "$soc-*.dtb" -exec cp {} $boot/ \;
cp /src/config.txt /src/cmdline.txt $boot/
slot_record "$version" "$profile" > $boot/A/slot.json

find $boot -exec touch -h -d "@$sde" {} +
mkfs.vfat -F 32 -C -n MACULA_BOOT -i "$(device layout mbr-id)" /work/boot.img $((esp_mb * 1024)) >/dev/null
mcopy -s -m -i /work/boot.img $boot/* ::/
rm -f $img; truncate -s ${need}M $img
layout --mbr | sfdisk -q $img
write_at /work/boot.img 1
write_at $sq $((1 + esp_mb))
make_data_image
write_at /work/data.img $((1 + esp_mb + 2 * slot_mb))
mkdir -p /out
layout --mbr --json > /out/layout.json
xz -T0 -3 -c $img > /out/sd.img.xz  # the slots are squashfs already: -3 packs the zeros as well as -9
cat /out/layout.json; sfdisk -d $img; ls -l $img /out/sd.img.xz
