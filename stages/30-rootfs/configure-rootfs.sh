#!/bin/sh
# Final rootfs configuration: what the packages need. The profile's services, overlay and the on-device tool
# are the layer stage's (45-layer), laid over this root at boot.
set -eu
# Debian's init scripts that MaculaOS replaces (replaced-init-scripts, which the packages stage turned into
# dpkg path-excludes: dpkg did not install them) are in no runlevel, so OpenRC neither runs nor parses them;
# the layer's /etc/init.d/udev (overlay/) replaces Debian's udev script.
sed -n 's|^path-exclude=/etc/init.d/||p' /etc/dpkg/dpkg.cfg.d/02-maculaos-replaced-init-scripts | while read -r svc; do
  rm -f /etc/runlevels/*/"$svc" "/etc/init.d/$svc" /etc/rc?.d/[SK][0-9][0-9]"$svc"
done
# savecache would save the deptree to the tmpfs upper layer of /, lost anyway (openrc's postinst needs it)
rm -f /etc/runlevels/*/savecache /etc/init.d/savecache
rc-update del rsync default >/dev/null 2>&1 || true  # the rsync daemon stays available, off
ln -sf ../proc/self/mounts /etc/mtab
# DNS servers from the node config outlast DHCP renewals: once apply-config has written them, it
# marks /run/maculaos/dns.static and udhcpc's lease script leaves /etc/resolv.conf alone.
sed -i 's|^RESOLV_CONF="/etc/resolv.conf"$|&\n[ -e /run/maculaos/dns.static ] \&\& RESOLV_CONF=/dev/null  # MaculaOS|' \
  /etc/udhcpc/default.script
grep -q 'maculaos/dns.static' /etc/udhcpc/default.script \
  || { echo "configure-rootfs: cannot find RESOLV_CONF= in /etc/udhcpc/default.script" >&2; exit 3; }
# DHCP must not hold up the consoles: start networking with the default runlevel, not sysinit.
if rc-update del networking sysinit 2>/dev/null; then rc-update add networking default; fi
# Nor does udev: replaying every device event takes seconds under emulation, and nothing before the consoles
# needs it (the initrd loaded the boot path's drivers; devtmpfs makes the nodes). It starts with the default
# runlevel, before the network (the layer's /etc/init.d/udev: before net networking).
rc-update del udev sysinit >/dev/null
rc-update add udev default >/dev/null
# cgroups likewise: only k3s needs the hierarchy (its init script: need cgroups).
rc-update del cgroups sysinit >/dev/null
rc-update add cgroups default >/dev/null

# No prebuilt OpenRC deptree: rc-update -u here would bake in rc_sys()=DOCKER keyword exclusions.

# Start independent services in parallel (2+ vCPUs at boot are the norm, also under emulation).
sed -i 's/^#\?rc_parallel=.*/rc_parallel="YES"/' /etc/rc.conf

ln -sf ../usr/lib/os-release /etc/os-release
# The standard library's bytecode comes from the native step (native-steps.sh); a Python version the tools
# image lacks is compiled here, by the image's own interpreter.
if [ -f /.maculaos-build/python-not-compiled ]; then
  while read -r py; do
    "$py" -m compileall -q --invalidation-mode unchecked-hash "/usr/lib/$py" /usr/lib/python3/dist-packages
  done < /.maculaos-build/python-not-compiled
fi
rm -f /etc/ssh/ssh_host_*  # generated per machine at first boot, never baked in
f=/etc/dpkg/dpkg.cfg.d/99mmdebstrap  # the bootstrap's build-time dpkg option stays out of the image
[ ! -f $f ] || sed -i '/^force-unsafe-io$/d' $f
: > /etc/machine-id
passwd -l root >/dev/null
mkdir -p /usr/share/maculaos /var/lib/maculaos
dpkg-query -W -f='${Package}\t${Version}\n' | LC_ALL=C sort > /usr/share/maculaos/packages.tsv
# ldconfig's aux-cache records the inodes and ctimes of this build's libraries: never the same twice
rm -rf /var/log/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /tmp/* /root/.cache /var/cache/ldconfig/aux-cache
