#!/bin/sh
# Final rootfs configuration; arguments are extra OpenRC services for the default runlevel.
set -eu
for svc in "$@"; do
  [ -x "/etc/init.d/$svc" ] || { echo "configure-rootfs: service '$svc' has no /etc/init.d/$svc" >&2; exit 3; }
  rc-update add "$svc" default
done
ln -sf ../usr/lib/os-release /etc/os-release
rm -f /etc/ssh/ssh_host_*  # generated per machine at first boot, never baked in
: > /etc/machine-id
passwd -l root >/dev/null
mkdir -p /usr/share/maculaos /var/lib/maculaos
dpkg-query -W -f='${Package}\t${Version}\n' | LC_ALL=C sort > /usr/share/maculaos/packages.tsv
rm -rf /var/log/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /tmp/* /root/.cache
