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
# dropbearconvert: recovery's sshd shows the node's own host key (OpenSSH format on the data partition)
convert=$(command -v dropbearconvert || echo /usr/lib/dropbear/dropbearconvert)
install -D -m 0755 "$convert" $root/sbin/dropbearconvert
for lib in $(for bin in /usr/sbin/dropbear "$convert"; do ldd "$bin"; done \
             | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
  install -D -m 0755 "$lib" "$root$lib"
done
