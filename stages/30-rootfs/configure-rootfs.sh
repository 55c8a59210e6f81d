#!/bin/sh
# Final rootfs configuration; arguments are extra OpenRC services for the default runlevel.
set -eu
for svc in "$@"; do
  [ -x "/etc/init.d/$svc" ] || { echo "configure-rootfs: service '$svc' has no /etc/init.d/$svc" >&2; exit 3; }
  rc-update add "$svc" default
done

# Boot services that do nothing useful on a read-only squashfs root (no fsck of /, no NFS, no swap,
# no backlight) only cost seconds, mostly visible under emulation.
for svc in checkroot.sh checkroot-bootclean.sh checkfs.sh mountnfs.sh mountnfs-bootclean.sh brightness \
           mount-configfs; do
  rc-update del "$svc" sysinit 2>/dev/null || true
done
for svc in bootlogs rmnologin rsync; do rc-update del "$svc" default 2>/dev/null || true; done
# DHCP must not hold up the consoles: start networking with the default runlevel, not sysinit.
if rc-update del networking sysinit 2>/dev/null; then rc-update add networking default; fi

# No prebuilt OpenRC deptree: rc-update -u here would bake in rc_sys()=DOCKER keyword exclusions.

# Start independent services in parallel (2+ vCPUs at boot are the norm, also under emulation).
sed -i 's/^#\?rc_parallel=.*/rc_parallel="YES"/' /etc/rc.conf

ln -sf ../usr/lib/os-release /etc/os-release
rm -f /etc/ssh/ssh_host_*  # generated per machine at first boot, never baked in
: > /etc/machine-id
passwd -l root >/dev/null
mkdir -p /usr/share/maculaos /var/lib/maculaos
dpkg-query -W -f='${Package}\t${Version}\n' | LC_ALL=C sort > /usr/share/maculaos/packages.tsv
rm -rf /var/log/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /tmp/* /root/.cache
