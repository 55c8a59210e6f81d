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
  echo "$mod" >> $root/lib/modules/order
done < /kernel/initrd-modules.txt
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
find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | gzip -9 -n > /tmp/initrd.gz
# an early microcode cpio (boards that want one) goes first, uncompressed, as the kernel expects
cat $([ -f /ucode.cpio ] && echo /ucode.cpio) /tmp/initrd.gz > /out/initrd.img
echo "initrd: $(wc -l < $root/lib/modules/order) modules, $(du -h /out/initrd.img | cut -f1)"
