#!/bin/sh
# Assemble the A/B disk image from parts made on plain files; slot B starts empty (all zeros).
set -eu
esp_mb=$1 slot_mb=$2 data_mb=$3 size_mb=$4 sde=$5
sq=/work/rootfs.squashfs
sq_mb=$(( ($(stat -c %s $sq) + 1048575) / 1048576 ))
if [ "$slot_mb" -eq 0 ]; then
  slot_mb=$(( (sq_mb * 2 + 63) / 64 * 64 )); [ "$slot_mb" -ge 256 ] || slot_mb=256
fi
if [ "$sq_mb" -gt "$slot_mb" ]; then
  echo "mkdisk: the squashfs ($sq_mb MiB) does not fit a slot of $slot_mb MiB: raise disk.slot_mb" >&2; exit 3
fi
need=$(( 1 + esp_mb + 2 * slot_mb + data_mb + 1 ))
if [ "$size_mb" -ne 0 ]; then
  if [ "$size_mb" -lt "$need" ]; then
    echo "mkdisk: disk.size_mb=$size_mb cannot hold ESP $esp_mb + two slots of $slot_mb + data $data_mb MiB (need $need)" >&2
    exit 3
  fi
  data_mb=$(( size_mb - 2 - esp_mb - 2 * slot_mb ))
  need=$size_mb
fi
img=/work/disk.raw
rm -f $img; truncate -s ${need}M $img
s=2048  # 1 MiB alignment, in 512-byte sectors
sfdisk -q $img <<PARTS
label: gpt
label-id: 4D41434C-0000-4000-8000-000000000000
start=$s, size=$((esp_mb * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp", uuid=4D41434C-0001-4000-8000-000000000001
size=$((slot_mb * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="rootfs-A", uuid=4D41434C-0002-4000-8000-000000000002
size=$((slot_mb * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="rootfs-B", uuid=4D41434C-0003-4000-8000-000000000003
size=$((data_mb * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data", uuid=4D41434C-0004-4000-8000-000000000004
PARTS

# ESP: FAT made on a file, filled with mtools, timestamps from SOURCE_DATE_EPOCH where the tools allow.
find /work/esp -exec touch -h -d "@$sde" {} +
mkfs.vfat -C -n MACULA_ESP -i 4d41434c /work/esp.img $((esp_mb * 1024)) >/dev/null
mcopy -s -m -i /work/esp.img /work/esp/* ::/
dd if=/work/esp.img of=$img bs=1M seek=1 conv=notrunc status=none
# Slot A: the squashfs itself is the partition's content.
dd if=$sq of=$img bs=1M seek=$((1 + esp_mb)) conv=notrunc status=none
# Data: ext4 from a folder (mkfs.ext4 -d), fixed UUID and hash seed.
mkdir -p /work/data/maculaos /work/data/rancher /work/data/home /work/data/data /work/data/overlay/etc/upper \
         /work/data/overlay/etc/work
find /work/data -exec touch -h -d "@$sde" {} +
mkfs.ext4 -q -F -L MACULA_DATA -U 4d41434c-0005-4000-8000-000000000005 \
  -E root_owner=0:0,hash_seed=4d41434c-0006-4000-8000-000000000006 -d /work/data /work/data.img ${data_mb}M
dd if=/work/data.img of=$img bs=1M seek=$((1 + esp_mb + 2 * slot_mb)) conv=notrunc status=none
mkdir -p /out
qemu-img convert -f raw -O qcow2 $img /out/disk.qcow2
printf '{"esp_mb": %s, "slot_mb": %s, "data_mb": %s, "size_mb": %s, "squashfs_mb": %s}\n' \
  "$esp_mb" "$slot_mb" "$data_mb" "$need" "$sq_mb" > /out/layout.json
cat /out/layout.json; sfdisk -d $img
