#!/bin/sh
# The initrd's binaries for the target arch, into $1: busybox-static with its applet links, and the
# recovery sshd (dropbear) with the shared libraries it links (found by ldd, copied to the same paths).
set -eu
root=$1
mkdir -p $root/bin $root/sbin
cp /bin/busybox $root/bin/busybox
for applet in $(/bin/busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
install -D -m 0755 /usr/sbin/dropbear $root/sbin/dropbear
for lib in $(ldd /usr/sbin/dropbear | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  install -D -m 0755 "$lib" "$root$lib"
done
