"""A/B updates on the installed disk image, proven in QEMU (UEFI, TCG): every assertion reads
`maculaos upgrade --status`, the machine-readable state, not banners."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from maculaos_device import layout

from maculaos_sdk.keys import signing_key
from maculaos_sdk.machine import cow_disk, free_port
from maculaos_sdk.node_machine import accepted_ports
from maculaos_sdk.publish import QuietHandler, publish, serve

pytestmark = pytest.mark.qemu


@pytest.fixture
def stalling_server(update_bundle: Path, tmp_path) -> Iterator[tuple[str, threading.Event]]:
    """Serves the good bundle, but sends only the first half of rootfs.squashfs and then hangs: the guest
    is caught mid-way through writing its standby slot. The event is set once that half is out."""
    half_sent, release = threading.Event(), threading.Event()
    shutil.copytree(update_bundle, tmp_path / "stall")

    class Stalling(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            if not self.path.endswith("/rootfs.squashfs"):
                return super().do_GET()
            data = (tmp_path / "stall" / "rootfs.squashfs").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            half_sent.set()
            release.wait(600)

    server = serve(tmp_path, Stalling)
    yield f"http://10.0.2.2:{server.server_address[1]}/stall", half_sent
    release.set()
    server.shutdown()


@pytest.fixture
def disk_machine(booted_disk, make_machine, tmp_path):
    """A fresh copy-on-write disk over the A/B image as it was once booted to slot A with its network up;
    the machine resumes from that saved state (a reboot then boots this disk for real)."""

    def start(name: str = "disk", **kw: object):
        m = make_machine(cow_disk(booted_disk.disk, tmp_path / f"{name}-amd64.qcow2"), name,
                         resume_from=booted_disk.state, **kw)
        m.start()
        m.wait_for_channel(timeout=60)
        m.sync_clock()
        return m

    return start


def test_installed_disk_boots_slot_a_with_persistent_data_and_recovery(disk_machine, tmp_path):
    port = free_port()
    m = disk_machine(ssh_port=port)
    s = m.upgrade_status()
    assert (s["mode"], s["booted"], s["active"], s["trial"], s["tries"], s["rolledback"]) == \
        ("disk", "A", "A", None, 0, None)
    assert s["slots"] == {"A": {"version": "0.1.0"}, "B": {"version": None}}
    mounts = m.succeed("cat /proc/mounts")
    assert " /var/lib/maculaos ext4 " in mounts and " /etc overlay " in mounts
    # the data partition and its binds: nothing on it is setuid or a device node
    options = {line.split()[1]: set(line.split()[3].split(",")) for line in mounts.splitlines()}
    for where in ("/run/maculaos/data", "/var/lib/maculaos"):
        assert {"nosuid", "nodev"} <= options[where], (where, options[where])
    # the ESP (GRUB's password hash, the initrd with recovery's) is root's alone
    assert {"fmask=0077", "dmask=0077", "noexec"} <= options["/run/maculaos/esp"], options["/run/maculaos/esp"]
    modes = m.succeed("stat -c %a /run/maculaos/esp/grub/grubenv /run/maculaos/esp/grub").split()
    assert [int(mode, 8) & 0o077 for mode in modes] == [0, 0], modes
    host_key = m.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
    # sshd as it runs: keys only for every user, no forwarding, few tries
    sshd = dict(line.split(" ", 1) for line in m.succeed("sshd -T").splitlines() if " " in line)
    assert {k: sshd[k] for k in ("passwordauthentication", "kbdinteractiveauthentication", "maxauthtries",
                                 "allowtcpforwarding", "x11forwarding", "allowagentforwarding")} == {
        "passwordauthentication": "no", "kbdinteractiveauthentication": "no", "maxauthtries": "3",
        "allowtcpforwarding": "no", "x11forwarding": "no", "allowagentforwarding": "no"}
    assert sshd["permitrootlogin"] in ("prohibit-password", "without-password")  # one setting, two names
    # what a compromised root would plant in /etc: a marker, an init script in the default runlevel, and the
    # config service taken out of it
    m.succeed("echo kept > /var/lib/maculaos/marker && echo planted > /etc/maculaos/marker"
              " && cp /etc/init.d/maculaos-confirm /etc/init.d/planted && rc-update add planted default"
              " && rc-update del maculaos-config default && sync")
    # the firewall fails closed: a node config that cannot be read, nor its last good copy, stops maculaos-config
    # with an error, and the boot-time table still drops what comes in (SSH too) and what would be forwarded
    m.succeed("echo 'maculaos: [' > /var/lib/maculaos/config.yaml"
              " && echo '{' > /var/lib/maculaos/config.last-good.json && sync")
    assert m.reboot() == "A"
    assert m.succeed("cat /var/lib/maculaos/marker") == "kept\n"
    # only the allow-listed /etc files (layout.ETC_PERSIST) outlived the reboot: the host key did, nothing else
    m.succeed("test ! -e /etc/maculaos/marker && test ! -e /etc/init.d/planted"
              " && test ! -e /etc/runlevels/default/planted && test -L /etc/runlevels/default/maculaos-config")
    assert m.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub") == host_key
    m.wait_until_booted()
    ruleset = json.loads(m.succeed("nft -j list table inet maculaos"))
    assert accepted_ports(ruleset) == {"policy": "drop", "tcp": set(), "udp": {68}}
    assert accepted_ports(ruleset, "forward")["policy"] == "drop"
    m.succeed("test ! -e /run/maculaos/config.applied")
    # normal boots never write the env
    assert m.upgrade_status()["tries"] == 0

    # Recovery from the boot menu: busybox shell, data partition available, DHCP, and sshd because the data
    # partition holds an authorized key.
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    m.succeed(f"mkdir -p /var/lib/maculaos/ssh && echo '{pub}' > /var/lib/maculaos/ssh/authorized_keys && sync")
    m.send_channel_nowait("reboot")
    m.enter_recovery_from_menu()
    data = re.findall(r"The data partition is (/dev/\w+)", m.console_text())[-1]  # as the initrd found it
    m.send_console(f"mount -t ext4 {data} /mnt && cat /mnt/maculaos/marker\n")
    m.wait_for_console_text(r"\nkept", timeout=30)
    ssh = subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
                          "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
                          "root@127.0.0.1", "cat /proc/cmdline; ls /mnt/maculaos; cut -d' ' -f1 /proc/modules"],
                         capture_output=True, text=True, timeout=120)
    assert ssh.returncode == 0, ssh.stderr
    assert "macula.mode=recovery" in ssh.stdout and "marker" in ssh.stdout
    # recovery's sshd shows the node's own host key, not one made up at each recovery boot
    scan = subprocess.run(f"ssh-keyscan -t ed25519 -p {port} 127.0.0.1 2>/dev/null | ssh-keygen -lf -", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert scan.stdout.split()[1] == host_key.split()[1], (scan.stdout, host_key)
    # the recovery shell loaded its group of the initrd's modules: the NIC and USB keyboards (usbhid)
    assert {"virtio_net", "usbhid", "hid_generic", "ext4"} <= set(ssh.stdout.split())


def test_good_update_boots_b_and_is_confirmed_then_manual_rollback(disk_machine, bundle_server):
    url, _ = bundle_server
    m = disk_machine()
    m.succeed("echo survives > /var/lib/maculaos/marker && sync")
    assert json.loads(m.succeed(f"maculaos upgrade --check {url}/good"))["update"] is True
    # from here on through the channel the node config names
    m.succeed(f"mkdir -p /var/lib/maculaos/config.d && printf 'upgrade:\\n  url: {url}\\n  channel: stable\\n'"
              " > /var/lib/maculaos/config.d/50-upgrade.yaml")
    check = json.loads(m.succeed("maculaos upgrade --check"))
    assert (check["current"], check["available"], check["update"]) == ("0.1.0", "0.2.0", True)
    m.succeed("maculaos upgrade --apply --no-reboot", timeout=300)
    s = m.upgrade_status()
    assert (s["active"], s["trial"], s["tries"]) == ("A", "B", 0)
    assert s["slots"]["B"]["version"] == "0.2.0"
    # a second apply while a trial is pending is refused
    assert "pending" in m.fail(f"maculaos upgrade --apply {url}/good --no-reboot")
    # corrupt the primary env: GRUB must fall back to the backup copy
    m.succeed("dd if=/dev/urandom of=/run/maculaos/esp/grub/grubenv bs=1024 count=1 conv=notrunc && sync")

    assert m.reboot() == "B"
    m.wait_until_succeeds("maculaos upgrade --status | jq -e '.active == \"B\"'", timeout=120)
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["tries"], s["version"]) == ("B", "B", None, 0, "0.2.0")
    assert m.succeed("cat /var/lib/maculaos/marker") == "survives\n"
    # the confirm rewrote both env copies
    m.succeed("head -c 24 /run/maculaos/esp/grub/grubenv | grep -q 'GRUB Environment Block'")

    # a rollback is a trial too: slot A boots counted and is committed by its health check
    m.succeed("maculaos upgrade --rollback --no-reboot")
    s = m.upgrade_status()
    assert (s["active"], s["trial"], s["rolledback"]) == ("B", "A", "B")
    assert m.reboot() == "A"
    m.wait_until_succeeds("maculaos upgrade --status | jq -e '.active == \"A\"'", timeout=120)
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["rolledback"], s["version"]) == ("A", "A", None, "B", "0.1.0")


def test_unconfirmed_or_hanging_update_rolls_back_after_three_tries(disk_machine, bundle_server):
    url, _ = bundle_server
    m = disk_machine()
    # The trial's health hook hangs on its first boot (the watchdog must end that boot, after the
    # macula.confirm_timeout= added to the boot entries here) and fails on the next ones.
    hook = ("#!/bin/sh\\nif [ ! -e /var/lib/maculaos/hung ]; then touch /var/lib/maculaos/hung; sync; sleep 600; fi\\n"
            "exit 1\\n")
    m.succeed(f"mkdir -p /var/lib/maculaos/health.d && printf '{hook}' > /var/lib/maculaos/health.d/fail"
              " && chmod +x /var/lib/maculaos/health.d/fail && sync")
    cfg = "/run/maculaos/esp/grub/grub.cfg"
    m.succeed(f"sed -i 's/macula.mode=disk /macula.mode=disk macula.confirm_timeout=20 /' {cfg}"
              f" && grep -q confirm_timeout=20 {cfg} && sync")
    m.succeed(f"maculaos upgrade --apply {url}/good --no-reboot", timeout=300)
    m.send_channel_nowait("reboot")
    booted = [m.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=240).group(1)]
    m.wait_for_console_text(r"trial slot B not confirmed within 20 s: rebooting", timeout=240)
    booted += [m.wait_for_console_text(r"maculaos-init: slot ([AB])", timeout=240).group(1) for _ in range(3)]
    assert booted == ["B", "B", "B", "A"]
    m.wait_for_channel(timeout=240)
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["rolledback"], s["version"]) == ("A", "A", None, "B", "0.1.0")
    # and A stays put: the failing hook only matters for a trial
    assert m.reboot() == "A"


def test_power_cut_while_writing_the_slot_or_the_env_boots_the_committed_slot(disk_machine, bundle_server,
                                                                              stalling_server):
    url, _ = bundle_server
    stall_url, half_sent = stalling_server
    m = disk_machine()
    m.succeed("echo survives > /var/lib/maculaos/marker && sync")

    # 1. power cut while the standby slot is being written
    m.succeed(f"(maculaos upgrade --apply {stall_url} --no-reboot > /tmp/apply.log 2>&1 &)")
    assert half_sent.wait(300), "the guest never fetched rootfs.squashfs"
    m.wait_until_succeeds("grep -q 'writing 0.2.0 to slot B' /tmp/apply.log", timeout=30)
    time.sleep(2)  # let the half that arrived reach the slot
    m.crash()
    m.start()
    assert m.wait_for_boot() == "A"
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["tries"], s["rolledback"]) == ("A", "A", None, 0, None)
    assert m.succeed("cat /var/lib/maculaos/marker") == "survives\n"
    m.wait_for_network()

    # 2. power cut between the two env writes: the backup says "trial B", the primary still "A"
    m.succeed(f"(MACULAOS_FAULT_PAUSE=env-backup-written maculaos upgrade --apply {url}/good --no-reboot"
              " > /tmp/apply.log 2>&1 &)")
    m.wait_until_succeeds("grep -q 'paused at env-backup-written' /tmp/apply.log || { cat /tmp/apply.log; false; }",
                          timeout=300)
    assert "trial=B" in m.succeed("cat /run/maculaos/esp/grub/grubenv.bak")
    m.crash()
    m.start()
    assert m.wait_for_boot() == "A"
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["trial"], s["tries"]) == ("A", "A", None, 0)
    # the boot-time repair made the backup agree with the primary again
    m.wait_until_succeeds("cmp /run/maculaos/esp/grub/grubenv /run/maculaos/esp/grub/grubenv.bak", timeout=120)
    assert "trial=\n" in m.succeed("cat /run/maculaos/esp/grub/grubenv.bak")
    # and an update still goes through afterwards
    m.wait_for_network()
    m.succeed(f"maculaos upgrade --apply {url}/good --no-reboot", timeout=300)
    s = m.upgrade_status()
    assert (s["trial"], s["slots"]["B"]["version"]) == ("B", "0.2.0")


def test_tampered_bundles_are_refused_with_nothing_written(disk_machine, bundle_server, make_machine):
    url, root = bundle_server

    def variant(name: str, signed: bool = True, **fields: object) -> None:
        """A copy of the good bundle with manifest fields changed, re-signed with the key the node trusts."""
        shutil.copytree(root / "good", root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        manifest.update(fields)
        (root / name / "manifest.json").write_text(json.dumps(manifest))
        if signed:
            subprocess.run(["minisign", "-S", "-s", str(signing_key("")), "-m", str(root / name / "manifest.json")],
                           check=True, capture_output=True)

    variant("bad-sig", signed=False, min_version="0.0.1")
    variant("bad-sha")
    with (root / "bad-sha" / "rootfs.squashfs").open("r+b") as f:
        f.seek(4096)
        f.write(b"tampered")
    variant("wrong-arch", arch="arm64")
    # validly signed, but a field holds a list: the old `eval` of jq's @sh output ran it as a command
    variant("injected", version=["0.2.0", "mkdir", "/tmp/pwned"])
    # validly signed, but a replay of the running version, and a bundle of another profile
    variant("replay", version="0.1.0")
    variant("other-profile", profile="maculaos")
    # an update server whose signed channel pointer expired (a frozen or replaying server)
    publish([root / "good"], root / "stale", "stable", signing_key=signing_key(""), now=int(time.time()) - 40 * 86400)

    m = disk_machine()
    before = m.upgrade_status()
    slot_b = ("dev=$(grep -l PARTNAME=rootfs-B /sys/class/block/*/uevent); dev=${dev%/uevent}; "
              "head -c 1048576 /dev/${dev##*/} | sha256sum")
    b_hash = m.succeed(slot_b)
    env_hash = m.succeed("cat /run/maculaos/esp/grub/grubenv /run/maculaos/esp/grub/grubenv.bak | sha256sum")

    assert "signature" in m.fail(f"maculaos upgrade --apply {url}/bad-sig --no-reboot")
    assert "is for arm64" in m.fail(f"maculaos upgrade --apply {url}/wrong-arch --no-reboot")
    assert "not a valid bundle manifest" in m.fail(f"maculaos upgrade --apply {url}/injected --no-reboot")
    m.succeed("test ! -e /tmp/pwned")
    assert "not newer than the running 0.1.0" in m.fail(f"maculaos upgrade --apply {url}/replay --no-reboot")
    assert "is for profile maculaos, this node runs test" in \
        m.fail(f"maculaos upgrade --apply {url}/other-profile --no-reboot")
    # without the lab opt-in (the test profile's default config has it), plain http is refused
    m.succeed("mkdir -p /var/lib/maculaos/config.d"
              " && printf 'upgrade:\\n  allow_http: false\\n' > /var/lib/maculaos/config.d/90-https.yaml")
    assert "plain http is refused" in m.fail(f"maculaos upgrade --check {url}/good")
    m.succeed(f"printf 'upgrade:\\n  url: {url}/stale\\n' > /var/lib/maculaos/config.d/90-https.yaml")
    assert "channel pointer expired" in m.fail("maculaos upgrade --check")
    m.succeed("rm /var/lib/maculaos/config.d/90-https.yaml")
    assert m.succeed(slot_b) == b_hash  # refused before a byte reached the standby slot
    assert "does not read back as the signed rootfs.squashfs" in \
        m.fail(f"maculaos upgrade --apply {url}/bad-sha --no-reboot", timeout=300)
    assert m.succeed("test ! -e /run/maculaos/esp/B/vmlinuz && echo no-kernel") == "no-kernel\n"
    assert m.succeed("cat /run/maculaos/esp/grub/grubenv /run/maculaos/esp/grub/grubenv.bak | sha256sum") == env_hash
    after = m.upgrade_status()
    assert after == before
    # the same node started with a clock decades behind, as a Pi without an RTC (it starts in 1970; q35's CMOS
    # clock keeps two-digit years and reads 1970 back as 2070, so 2000 stands in for it): sysinit raises the
    # clock to the image's build time, which is still behind the stale pointer's signing time: no freshness
    # verdict at all
    m.shutdown()
    m = make_machine(m.config.image, "disk-no-clock", rtc_base="2000-01-01T00:00:00")
    m.start()
    assert m.wait_for_boot() == "A"
    m.wait_for_network(timeout=120)  # a fresh boot: the channel answers while DHCP still runs
    build_time = int(m.succeed(". /usr/lib/os-release && echo $MACULAOS_BUILD_TIME"))
    assert re.search(rf"maculaos: clock was \d+, set to the image's build time {build_time}", m.console_text())
    assert build_time <= int(m.succeed("date +%s")) < build_time + 3600
    m.succeed(f"printf 'upgrade:\\n  url: {url}/stale\\n' > /var/lib/maculaos/config.d/90-https.yaml")
    assert "this node's clock" in m.fail("maculaos upgrade --check")
    assert m.upgrade_status() == before


def test_factory_reset_wipes_node_state_and_keeps_os_and_user_data(disk_machine):
    m = disk_machine()
    host_key = m.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")  # kept by reboots (ETC_PERSIST)
    m.succeed("mkdir -p /var/lib/rancher/k3s && echo a > /var/lib/maculaos/config.yaml"
              " && echo b > /var/lib/rancher/k3s/state && echo c > /var/lib/data/user-file"
              " && echo d > /home/user-file && mkdir /run/maculaos/data/planted && echo e > /run/maculaos/data/.hidden"
              " && echo f > /var/lib/rancher/other && sync")
    assert "--confirm" in m.fail("maculaos factory-reset")  # refuses without --confirm
    m.send_channel_nowait("maculaos factory-reset --confirm --keep-data")
    assert m.wait_for_boot() == "A"
    m.wait_for_console_text(r"factory reset: wiping node state", timeout=30)
    m.succeed("test ! -e /var/lib/maculaos/config.yaml && test ! -e /var/lib/rancher/k3s/state")
    m.wait_until_succeeds("test -e /run/maculaos/config.applied", timeout=120)
    assert m.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub") != host_key  # a new node identity
    assert m.succeed("cat /var/lib/data/user-file /home/user-file") == "c\nd\n"  # --keep-data: the users' folders
    # what nobody knows, or only the old node state knew, is gone
    left = set(m.succeed("ls -A /run/maculaos/data").split())
    assert {"data", "home", "maculaos", "overlay"} <= left <= {*(d.split("/")[0] for d in layout.data_dirs()),
                                                                *layout.RESET_KEEPS}, left
    m.succeed("test ! -e /var/lib/rancher/other")
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["version"]) == ("A", "A", "0.1.0")


def test_a_second_disk_carrying_a_maculaos_image_is_ignored(booted_disk, test_disk, make_machine, tmp_path):
    """A USB stick flashed with a MaculaOS image, ahead of the boot disk on the bus (Linux names it vda),
    supplies neither the root, nor the data partition with its /etc overlay and node config, nor the ESP
    `maculaos` writes: GRUB names the disk it was loaded from (macula.esp=) and only that disk counts."""
    stick = cow_disk(test_disk, tmp_path / "stick.qcow2")  # the built image as it was flashed: fixed ids
    m = make_machine(cow_disk(booted_disk.disk, tmp_path / "main.qcow2"), "two-disks", disks_first=(stick,))
    m.start()
    assert m.wait_for_boot() == "A"
    mounts = {line.split()[1]: line.split()[0] for line in m.succeed("cat /proc/mounts").splitlines()}
    assert (mounts["/run/maculaos/lower"], mounts["/run/maculaos/data"]) == ("/dev/vdb2", "/dev/vdb4")
    s = m.upgrade_status()
    assert (s["booted"], s["active"], s["slots"]["A"]) == ("A", "A", {"version": "0.1.0"})
    assert m.succeed("awk '$2 == \"/run/maculaos/esp\" {print $1}' /proc/mounts") == "/dev/vdb1\n"
    # the first boot gave the installed disk ids of its own; the stick keeps the image's fixed ones
    fixed = f"label-id: {layout.FIXED_DISK_ID}"
    assert fixed not in m.succeed("sfdisk -d /dev/vdb").splitlines()
    assert fixed in m.succeed("sfdisk -d /dev/vda").splitlines()
