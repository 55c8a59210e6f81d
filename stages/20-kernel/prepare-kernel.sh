#!/bin/sh
# Unpack a Debian kernel package into /out without its maintainer scripts (no initramfs-tools run),
# drop pruned module folders, run depmod, and write the ordered initrd module list.
set -eu
pkg="" arch="" prune="" keep="" wanted=""
while [ $# -gt 0 ]; do
  case "$1" in
    --package) pkg=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --prune) prune=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --initrd-modules) wanted=$2; shift 2 ;;
    *) echo "prepare-kernel: unknown option $1" >&2; exit 2 ;;
  esac
done
# A meta package (linux-image-amd64) points at the versioned image package: follow it.
# (":$arch" names the target arch's package; on a cross build it is not the host's.)
real=$(apt-cache depends --important "$pkg:$arch" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
real=${real%:*}
[ -n "$real" ] || real=$pkg
mkdir -p /tmp/deb /k /out && cd /tmp/deb
apt-get download "$real:$arch"
dpkg-deb -x ./*.deb /k
kver=$(ls /k/lib/modules | head -n1)
printf '%s\t%s\n' "$real" "$(dpkg-deb -f ./*.deb Version)" > /out/kernel-package.tsv
echo "$kver" > /out/kernel-version
cp /k/boot/vmlinuz-"$kver" /out/vmlinuz
# Folders the board must keep survive a prune of their parent (drivers/net/wireless but not .../intel).
for k in $keep; do [ -d "/k/lib/modules/$kver/kernel/$k" ] && mkdir -p "/keep/$k" && cp -a "/k/lib/modules/$kver/kernel/$k/." "/keep/$k/"; done
for p in $prune; do rm -rf "/k/lib/modules/$kver/kernel/$p"; done
[ -d /keep ] && cp -a /keep/. "/k/lib/modules/$kver/kernel/"
depmod -b /k "$kver"
: > /out/initrd-modules.txt
for m in $wanted; do
  if ! deps=$(modprobe -d /k -S "$kver" --show-depends "$m" 2>&1); then
    echo "prepare-kernel: initrd module '$m' not found in $real ($kver): $deps" >&2; exit 3
  fi
  echo "$deps" | awk '$1 == "insmod" {print $2}' | sed "s#^/k/lib/modules/$kver/##" >> /out/initrd-modules.txt
done
# keep first occurrence only: dependencies come before the modules that need them
awk '!seen[$0]++' /out/initrd-modules.txt > /tmp/mods && mv /tmp/mods /out/initrd-modules.txt
mkdir -p /out/lib/modules && mv /k/lib/modules/"$kver" /out/lib/modules/
[ -d /k/lib/firmware ] && mkdir -p /out/lib && mv /k/lib/firmware /out/lib/ || true
# Device trees (arm64): the Raspberry Pi firmware hands the board's to U-Boot and the kernel.
[ -d "/k/usr/lib/linux-image-$kver" ] && mv "/k/usr/lib/linux-image-$kver" /out/dtbs || true
echo "kernel $real $kver: $(wc -l < /out/initrd-modules.txt) initrd modules, $(du -sh /out/lib/modules | cut -f1) of modules"
