#!/bin/sh
# Assemble the initramfs: busybox-static + applet links, ordered modules, /init; reproducible cpio.
set -eu
sde=$1
kver=$(cat /kernel/kernel-version)
root=/initrd
# $root already holds busybox, its applet links and dropbear with its libraries (collect.sh).
mkdir -p $root/bin $root/sbin $root/dev $root/proc $root/sys $root/run $root/newroot $root/tmp $root/mnt \
         $root/lib/modules $root/etc
while read -r mod; do
  install -D -m 0644 "/kernel/initrd-modules/$mod" "$root/lib/modules/$mod"
done < /kernel/initrd-modules.txt
# The init loads modules in groups, each when a boot needs it (each insmod costs time, most under emulation):
#   order       the boot medium's path: buses, disk and CD drivers, squashfs, overlay, isofs (every boot)
#   order.data  the data partition's and other media's filesystems (ext4, vfat, nls): every boot, after the
#               first group (a live boot hashes any squashfs on any disk before it takes one)
#   order.recovery  network drivers and USB keyboards: the recovery shell only (the booted system's udev loads
#               them itself)
# A module's group is its folder's, or the earliest group of the modules that need it (helpers such as crc16,
# which only ext4 needs, go with ext4); modules.dep lists every module's dependencies, transitively. A helper
# nothing needs outright is a soft dependency of the module after it (modprobe lists crc32c before jbd2).
awk -v dep="/kernel/lib/modules/$kver/modules.dep" '
  function base(p) { sub(/\.(xz|zst|gz)$/, "", p); return p }
  function group(p) {
    if (p ~ /^kernel\/((drivers\/)?net|drivers\/hid)\//) return 2
    if (p ~ /^kernel\/fs\// && p !~ /^kernel\/fs\/(squashfs|overlayfs|isofs)\//) return 1
    if (p ~ /^kernel\/(lib|crypto|arch\/[^\/]+\/crypto)\//) return 3  # a helper: its users decide
    return 0
  }
  BEGIN { next_g = 0; while ((getline line < dep) > 0) { n = split(line, f, /:? +|:$/); m = base(f[1]); deps[m] = ""
            for (i = 2; i <= n; i++) if (f[i] != "") deps[m] = deps[m] " " base(f[i]) } }
  { order[NR] = $0; g[$0] = group($0) }
  END {
    for (i = 1; i <= NR; i++) { m = order[i]; if (g[m] == 3) continue
      n = split(deps[m], d, " "); for (j = 1; j <= n; j++) if ((d[j] in g) && g[d[j]] > g[m]) g[d[j]] = g[m] }
    for (i = NR; i >= 1; i--) { m = order[i]; if (g[m] == 3) g[m] = next_g; else next_g = g[m] }  # softdeps
    split("order order.data order.recovery", name, " ")
    for (i = 1; i <= NR; i++) { m = order[i]; print m > (root "/lib/modules/" name[g[m] + 1]) }
  }' root="$root" /kernel/initrd-modules.txt
install -m 0755 /src/init $root/init
install -m 0755 /src/udhcpc.script $root/etc/udhcpc.script
mkdir -p $root/etc/dropbear $root/root
echo 'root:x:0:0:root:/root:/bin/sh' > $root/etc/passwd
echo 'root:x:0:' > $root/etc/group
install -m 0600 /src/shadow $root/etc/shadow  # root's recovery password hash, or ! (none)
echo /bin/sh > $root/etc/shells
echo "$kver" > $root/etc/kernel-version
mkdir -p /out
cd $root
find . -exec touch -h -d "@$sde" {} +
# zstd -19: 20 % smaller than gzip -9 (less for GRUB to read off the medium) and quicker for the kernel to unpack
find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | zstd -19 -q -c > /tmp/initrd.zst
# an early microcode cpio (boards that want one) goes first, uncompressed, as the kernel expects
ucode=
[ -f /ucode.cpio ] && ucode=/ucode.cpio
# shellcheck disable=SC2086  # no microcode: nothing in front of the initrd
cat $ucode /tmp/initrd.zst > /out/initrd.img
echo "initrd: $(cat $root/lib/modules/order* | wc -l) modules ($(wc -l < $root/lib/modules/order) at every boot)," \
     "$(du -h /out/initrd.img | cut -f1)"
