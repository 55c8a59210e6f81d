#!/bin/sh
# Unpack a Debian kernel package into /out without its maintainer scripts (no initramfs-tools run),
# drop pruned module folders, run depmod, and write the ordered initrd module list.
set -eu
pkg="" arch="" prune="" keep="" wanted="" release=""
while [ $# -gt 0 ]; do
  case "$1" in
    --package) pkg=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --prune) prune=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --initrd-modules) wanted=$2; shift 2 ;;
    --release) release=$2; shift 2 ;;  # take the kernel from this suite (e.g. trixie-backports)
    *) echo "prepare-kernel: unknown option $1" >&2; exit 2 ;;
  esac
done
# A meta package (linux-image-amd64) points at the versioned image package: follow it.
# (":$arch" names the target arch's package; on a cross build it is not the host's.)
set -- ${release:+-o APT::Default-Release=$release}
real=$(apt-cache "$@" depends --important "$pkg:$arch" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
real=${real%:*}
[ -n "$real" ] || real=$pkg
# Newer Debian kernels (7.x, in trixie-backports) split the image package: it only depends on linux-binary-*
# (vmlinuz), linux-modules-* and linux-base-* (device trees, config), all under /usr/lib/modules/<version>.
parts=$(apt-cache "$@" depends --important "$real:$arch" \
  | awk '/Depends: linux-(binary|modules|base)-[0-9]/ { sub(/:.*/, "", $2); print $2 }')
mkdir -p /tmp/deb /k /out && cd /tmp/deb
for p in "$real" $parts; do apt-get "$@" download "$p:$arch"; done
for deb in ./*.deb; do dpkg-deb -x "$deb" /k; done
# bookworm's packages ship /lib/modules and /lib/firmware, trixie's (merged /usr) /usr/lib/...: one place here,
# seen from both paths, since depmod and modprobe look where their own kmod was built to look.
for d in modules firmware; do
  if [ -d "/k/usr/lib/$d" ] && [ ! -e "/k/lib/$d" ]; then mkdir -p /k/lib && mv "/k/usr/lib/$d" "/k/lib/$d"; fi
  if [ -d "/k/lib/$d" ] && [ ! -e "/k/usr/lib/$d" ]; then mkdir -p /k/usr/lib && ln -s "../../lib/$d" "/k/usr/lib/$d"; fi
done
kver=$(ls /k/lib/modules | head -n1)
printf '%s\t%s\n' "$real" "$(dpkg-deb -f ./"$real"_*.deb Version)" > /out/kernel-package.tsv
echo "$kver" > /out/kernel-version
# vmlinuz and the device trees leave the module folder (it goes into the rootfs); the split packages' config
# and System.map are dropped, as the older packages' /boot copies are.
if [ -f "/k/boot/vmlinuz-$kver" ]; then
  cp "/k/boot/vmlinuz-$kver" /out/vmlinuz
else
  mv "/k/lib/modules/$kver/vmlinuz" /out/vmlinuz
  rm -f "/k/lib/modules/$kver/System.map" "/k/lib/modules/$kver/config"
fi
[ -d "/k/lib/modules/$kver/dtb" ] && mv "/k/lib/modules/$kver/dtb" /out/dtbs || true
# Folders the board must keep survive a prune of their parent (drivers/net/wireless but not .../intel).
for k in $keep; do [ -d "/k/lib/modules/$kver/kernel/$k" ] && mkdir -p "/keep/$k" && cp -a "/k/lib/modules/$kver/kernel/$k/." "/keep/$k/"; done
for p in $prune; do rm -rf "/k/lib/modules/$kver/kernel/$p"; done
[ -d /keep ] && cp -a /keep/. "/k/lib/modules/$kver/kernel/"
depmod -b /k "$kver"
: > /out/initrd-modules.txt
for m in $wanted; do
  # `?name`: wanted where the kernel has it (a crypto alias a newer kernel folded into a library, say)
  optional=
  case "$m" in \?*) optional=1; m=${m#?} ;; esac
  if ! deps=$(modprobe -d /k -S "$kver" --show-depends "$m" 2>&1); then
    if [ -n "$optional" ]; then
      echo "prepare-kernel: optional initrd module '$m' is not in $real ($kver): left out" >&2; continue
    fi
    echo "prepare-kernel: initrd module '$m' not found in $real ($kver): $deps" >&2; exit 3
  fi
  # paths relative to the module folder, which kmod may name from either side of the /usr merge
  echo "$deps" | awk -v kver="$kver" '$1 == "insmod" { p = $2
    for (i = 1; i <= 2; i++) { pre = (i == 1 ? "/k/lib/modules/" : "/k/usr/lib/modules/") kver "/"
      if (index(p, pre) == 1) p = substr(p, length(pre) + 1) }
    print p }' >> /out/initrd-modules.txt
done
# keep first occurrence only: dependencies come before the modules that need them
awk '!seen[$0]++' /out/initrd-modules.txt > /tmp/mods && mv /tmp/mods /out/initrd-modules.txt
# The initrd's busybox insmod takes plain .ko files: trixie's xz-compressed ones are unpacked for it (the
# rootfs keeps them compressed; kmod reads those). /out/initrd-modules/ holds them under the listed names.
: > /tmp/mods
while read -r mod; do
  plain=${mod%.xz}; mkdir -p "/out/initrd-modules/$(dirname "$plain")"
  case "$mod" in
    *.xz) xz -dc "/k/lib/modules/$kver/$mod" > "/out/initrd-modules/$plain" ;;
    *) cp "/k/lib/modules/$kver/$mod" "/out/initrd-modules/$plain" ;;
  esac
  echo "$plain" >> /tmp/mods
done < /out/initrd-modules.txt
mv /tmp/mods /out/initrd-modules.txt
mkdir -p /out/lib/modules && mv /k/lib/modules/"$kver" /out/lib/modules/
[ -d /k/lib/firmware ] && mkdir -p /out/lib && mv /k/lib/firmware /out/lib/ || true
# Device trees (arm64): the Raspberry Pi firmware hands the board's to U-Boot and the kernel.
[ -d "/k/usr/lib/linux-image-$kver" ] && [ ! -e /out/dtbs ] && mv "/k/usr/lib/linux-image-$kver" /out/dtbs || true
echo "kernel $real $kver: $(wc -l < /out/initrd-modules.txt) initrd modules, $(du -sh /out/lib/modules | cut -f1) of modules"
