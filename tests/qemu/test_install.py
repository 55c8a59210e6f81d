"""Install from the ISO to a blank disk, unattended (the ISO's Install entry), then boot the installed disk."""

from __future__ import annotations

import json
import subprocess

import pytest
from maculaos_device import layout

pytestmark = pytest.mark.qemu


def _squashfs_bytes(iso) -> int:
    """The size of the squashfs the ISO carries, from the build's own record beside it."""
    manifest = iso.with_name(iso.name.replace(".iso", ".bundle")) / "manifest.json"
    return json.loads(manifest.read_text())["files"]["rootfs.squashfs"]["size"]


def test_install_from_iso_menu_to_blank_disk_then_boot_it(test_iso, make_machine, tmp_path):
    target = tmp_path / "target-amd64.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "2G"], check=True)

    installer = make_machine(test_iso, "installer", uefi=True, disks=(target,))
    installer.start()
    installer.wait_for_console_text(r"Install MaculaOS", timeout=120)
    installer.send_console("i")
    installer.wait_for_console_text(r"maculaos: installed MaculaOS 0.1.0 to /dev/vda", timeout=300)
    installer.wait_for_poweroff(timeout=120)

    m = make_machine(target, "installed")
    m.start()
    assert m.wait_for_boot() == "A"
    s = m.upgrade_status()
    assert (s["mode"], s["booted"], s["active"], s["trial"], s["tries"], s["rolledback"]) == \
        ("disk", "A", "A", None, 0, None)
    assert s["slots"] == {"A": {"version": "0.1.0"}, "B": {"version": None}}
    names = m.succeed("for p in /sys/class/block/vda[0-9]*; do grep ^PARTNAME= $p/uevent; done")
    assert names.split() == ["PARTNAME=esp", "PARTNAME=rootfs-A", "PARTNAME=rootfs-B", "PARTNAME=data"]
    # the installer sizes the disk by the same layout module the image build uses
    sizes = [int(x) * 512 // 2**20 for x in m.succeed("cat /sys/class/block/vda[1-3]/size").split()]
    squashfs = _squashfs_bytes(test_iso)
    assert sizes == [layout.ESP_MB, layout.slot_mb_for(squashfs), layout.slot_mb_for(squashfs)]
    m.succeed("grep -q ' /var/lib/maculaos ext4 ' /proc/mounts")
    # the ISO's node config (install.config) was installed with the node and applied at boot
    assert "installed-${MAC_SUFFIX}" in m.succeed("cat /var/lib/maculaos/config.yaml")
    m.wait_until_succeeds("test -e /run/maculaos/config.applied", timeout=90)  # after networking: eth0 is there
    mac = m.succeed("cat /sys/class/net/eth0/address").strip().replace(":", "")
    assert m.succeed("hostname").strip() == f"installed-{mac[-4:]}"
