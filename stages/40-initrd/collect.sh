#!/bin/sh
# The initrd's binaries for the target arch, into $1: busybox-static with its applet links, and the
# recovery sshd (dropbear), cryptsetup, mke2fs, tpm2 and jose with the shared libraries they link (found by ldd, copied to the same paths).
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
# cryptsetup and mkfs.ext4: an encrypted data partition is opened here, and made here at a factory reset's
# crypto-erase (maculaos_device.encryption; the library is the layer's /usr/lib/maculaos/luks.sh)
install -D -m 0755 /usr/sbin/cryptsetup $root/sbin/cryptsetup
install -D -m 0755 /usr/sbin/mke2fs $root/sbin/mke2fs
ln -sf mke2fs $root/sbin/mkfs.ext4
# tpm2 (tpm2-tools, one binary for every tool): a data partition key sealed to the TPM; its TCTI loader opens the
# device TCTI with dlopen, so ldd does not name that library
install -D -m 0755 /usr/bin/tpm2 $root/bin/tpm2
tcti=$(ls /usr/lib/*/libtss2-tcti-device.so.0 | head -n 1)
install -D -m 0755 "$tcti" "$root$tcti"
# jose: the network key source (a key a Tang server releases; busybox's wget does the HTTP)
install -D -m 0755 /usr/bin/jose $root/bin/jose
bins="/usr/sbin/dropbear $convert /usr/sbin/cryptsetup /usr/sbin/mke2fs /usr/bin/tpm2 $tcti /usr/bin/jose"
for lib in $(for bin in $bins; do ldd "$bin"; done \
             | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
  install -D -m 0755 "$lib" "$root$lib"
done
