"""The board table and the shared disk layout: combinations refused before any stage, sizes from one rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from maculaos_device import layout

from maculaos_sdk.arch import Architecture
from maculaos_sdk.boards import BOARDS, BootFlow
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput
from maculaos_sdk.profile import load_profile

MIB = 1 << 20


def test_every_board_row_is_complete():
    assert set(BOARDS) == {"generic", "nuc", "rpi4", "rpi5"}
    assert BOARDS["generic"].boot_flow(Architecture.amd64) is BootFlow.grub_bios_efi
    assert BOARDS["generic"].boot_flow(Architecture.arm64) is BootFlow.grub_efi
    assert BOARDS["nuc"].arches == (Architecture.amd64,)
    assert "firmware-iwlwifi" in BOARDS["nuc"].firmware_packages and BOARDS["nuc"].early_microcode
    for pi in ("rpi4", "rpi5"):
        assert BOARDS[pi].arches == (Architecture.arm64,)
        assert BOARDS[pi].outputs(Architecture.arm64) == ("sdimage", "bundle", "tar", "oci")
        assert "non-free-firmware" in BOARDS[pi].components
    assert BOARDS["rpi4"].serial_console(Architecture.arm64) == "ttyS1"
    assert BOARDS["generic"].serial_console(Architecture.arm64) == "ttyAMA0"


@pytest.mark.parametrize("text, key, message", [
    ("name: x\nboard: rpi4\n", "board", "rpi4 is not built for amd64"),
    ("name: x\narch: arm64\nboard: nuc\n", "board", "nuc is not built for arm64"),
    ("name: x\narch: arm64\nboard: rpi4\noutputs: [iso]\n", "outputs", "'iso' cannot boot on rpi4"),
    ("name: x\nboard: pi4\n", "board", "unknown value 'pi4'"),
    ("name: x\narch: arm64\nboard: rpi5\ndebian:\n  suite: bookworm\n", "board",
     "rpi5 does not boot with Debian bookworm's kernel and U-Boot"),
])
def test_bad_board_combination_names_file_line_and_key(write_profile, text, key, message):
    path = write_profile(text)
    with pytest.raises(BadInput) as exc:
        load_profile(str(path))
    line = text.splitlines().index(next(s for s in text.splitlines() if s.startswith(f"{key}:"))) + 1
    assert f"{path}:{line}: {key}: {message}" in exc.value.render()


def test_board_on_the_command_line_overrides_and_picks_its_image(write_profile):
    p = load_profile("core", {"arch": "arm64", "board": "rpi4"})
    assert p.board.name == "rpi4" and p.get("outputs") == ["sdimage"]
    assert p.origins["board"] == ("command line", 0)
    assert p.artifact_basename() == "maculaos-core-0.1.0-arm64-rpi4"
    nuc = load_profile("test", {"board": "nuc"})
    assert nuc.get("outputs") == ["iso", "disk", "bundle"] and nuc.artifact_basename().endswith("-amd64-nuc")


def test_bad_board_flag_exits_2_with_one_line(capsys):
    assert main(["build-image", "--profile", "core", "--board", "rpi4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--board: rpi4 is not built for amd64" in err and "Traceback" not in err


def test_profile_keys_lists_the_boards(capsys):
    assert main(["profile", "keys"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{name}`" in out for name in BOARDS)


@pytest.mark.parametrize("squashfs_mb, slot_mb", [(1, 256), (100, 256), (128, 256), (129, 320), (300, 640)])
def test_slot_size_rule(squashfs_mb, slot_mb):
    assert layout.slot_mb_for(squashfs_mb * MIB) == slot_mb
    assert layout.slot_mb_for(squashfs_mb * MIB - 1) <= slot_mb


def test_disk_plan_fills_the_requested_size_and_refuses_what_cannot_fit():
    p = layout.plan(116 * MIB)
    assert (p.esp_mb, p.slot_mb, p.data_mb) == (layout.ESP_MB, 256, layout.DATA_MB)
    assert p.size_mb == 1 + p.esp_mb + 2 * p.slot_mb + p.data_mb + 1
    assert p.offsets_mb() == {"esp": 1, "rootfs-A": 1 + p.esp_mb, "rootfs-B": 1 + p.esp_mb + 256,
                              "data": 1 + p.esp_mb + 512}
    big = layout.plan(116 * MIB, size_mb=4096)
    assert big.size_mb == 4096 and big.data_mb == 4096 - (2 + p.esp_mb + 512)
    with pytest.raises(layout.LayoutError, match="cannot hold"):
        layout.plan(116 * MIB, size_mb=800)
    with pytest.raises(layout.LayoutError, match="does not fit a slot of 256"):
        layout.plan(300 * MIB, slot_mb=256)


def test_sfdisk_script_is_what_sfdisk_reads(tmp_path):
    """The module's table, applied by the real sfdisk to a file, gives the names, types and sizes it planned."""
    p = layout.plan(116 * MIB)
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(p.size_mb * MIB)
    subprocess.run(["sfdisk", "-q", str(img)], input=p.sfdisk_script(fixed_ids=True), text=True, check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["id"] == layout.FIXED_DISK_ID
    parts = table["partitions"]
    assert [x["name"] for x in parts] == ["esp", "rootfs-A", "rootfs-B", "data"]
    assert [x["type"] for x in parts] == [layout.ESP_TYPE] + [layout.LINUX_TYPE] * 3
    assert [x["start"] * 512 // MIB for x in parts] == list(p.offsets_mb().values())
    assert [x["size"] * 512 // MIB for x in parts] == [p.esp_mb, p.slot_mb, p.slot_mb, p.data_mb]


def test_device_cli_prints_sizes_and_data_dirs():
    """What `maculaos install` and the disk stage run: the module as a script, standard library only."""
    run = [sys.executable, "-I", layout.__file__]
    sizes = subprocess.run([*run, "sfdisk", "--squashfs-bytes", str(116 * MIB), "--size-mb", "2048", "--sizes"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert sizes == [str(layout.ESP_MB), "256", str(2048 - 2 - layout.ESP_MB - 512), "2048", "116"]
    small = subprocess.run([*run, "sfdisk", "--squashfs-bytes", str(116 * MIB), "--size-mb", "600", "--sizes"],
                           capture_output=True, text=True)
    assert small.returncode == 3 and "cannot hold" in small.stderr
    dirs = subprocess.run([*run, "data-dirs"], capture_output=True, text=True, check=True).stdout.split()
    assert dirs == ["maculaos", "rancher", "home", "data", "overlay/etc/upper", "overlay/etc/work"]


def test_mbr_card_table_and_lookup_by_signature(tmp_path):
    """The Pi's MBR: what sfdisk makes of the module's script, and the device-side lookup by disk signature."""
    p = layout.plan(116 * MIB, size_mb=1024)
    img = tmp_path / "sd.img"
    with img.open("wb") as f:
        f.truncate(p.size_mb * MIB)
    subprocess.run(["sfdisk", "-q", str(img)], input=p.sfdisk_script(fixed_ids=True, mbr=True), text=True, check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["id"] == f"0x{layout.MBR_DISK_ID}"
    parts = table["partitions"]
    assert [x["type"] for x in parts] == ["c", "83", "83", "83"] and parts[0].get("bootable") is True
    assert [x["start"] * 512 // MIB for x in parts] == list(p.offsets_mb().values())
    # a fake /sys/block with two disks: the one whose signature matches wins, partitions by number
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    for disk, source in (("vda", None), ("vdb", img)):
        (dev / disk).write_bytes(source.read_bytes()[:4096] if source else b"\0" * 4096)
        for n in range(1, 5):
            (sys_block / disk / f"{disk}{n}").mkdir(parents=True)
            (sys_block / disk / f"{disk}{n}" / "partition").write_text(f"{n}\n")
    found = {name: layout.find_mbr_partition(name, layout.MBR_DISK_ID, str(sys_block), str(dev))
             for name in layout.PART_NUMBERS}
    assert found == {"esp": f"{dev}/vdb1", "rootfs-A": f"{dev}/vdb2", "rootfs-B": f"{dev}/vdb3", "data": f"{dev}/vdb4"}
    assert layout.find_mbr_partition("data", "deadbeef", str(sys_block), str(dev)) is None


def test_a_card_is_found_by_the_signature_recorded_at_boot_then_the_images_own(tmp_path):
    """Which signature `maculaos` looks for: what the initrd (GRUB's macula.esp=) or the first boot's re-signing
    recorded, else the image's macula.mbr=; a GPT disk has none. A fresh signature is never the image's."""
    from maculaos_device.installer import new_card_signature
    from maculaos_device.system import Device

    dev = Device(run=tmp_path / "run", cmdline_path=tmp_path / "cmdline")
    dev.run.mkdir()
    dev.cmdline_path.write_text("macula.mode=disk macula.slot=A macula.esp=0d3c-partuuid\n")
    assert dev.card_signature() is None  # GPT: found by partition names on the disk GRUB names
    dev.cmdline_path.write_text(f"macula.mode=disk macula.mbr={layout.MBR_DISK_ID}\n")
    assert dev.card_signature() == layout.MBR_DISK_ID
    (dev.run / "mbr").write_text("1a2b3c4d\n")
    assert dev.card_signature() == "1a2b3c4d"
    (dev.run / "mbr").write_text("$(reboot)\n")  # not a signature: ignored
    assert dev.card_signature() == layout.MBR_DISK_ID
    fresh = {new_card_signature() for _ in range(50)}
    assert len(fresh) > 45 and not fresh & {layout.MBR_DISK_ID, "00000000"}
    assert all(re.fullmatch(r"[0-9a-f]{8}", f) for f in fresh)


def test_foreign_bootstrap_names_a_missing_arch_test_or_binfmt(monkeypatch):
    """Not "is the mirror reachable?": the host lacks what runs arm64 programs, and the hint says how to add it."""
    from maculaos_sdk import bootstrap
    from maculaos_sdk.errors import BuildFailed

    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    with pytest.raises(BuildFailed, match="arch-test is not installed") as exc:
        bootstrap.check_foreign_arch("arm64")
    assert "make setup" in exc.value.hint
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: f"/usr/bin/{name}")
    refused = subprocess.CompletedProcess(["arch-test"], 2, "arm64: not supported on this machine/kernel\n", "")
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda *a, **k: refused)
    with pytest.raises(BuildFailed, match="cannot run arm64 programs") as exc:
        bootstrap.check_foreign_arch("arm64")
    assert "update-binfmts --enable qemu-aarch64" in exc.value.hint
    bootstrap.check_foreign_arch("amd64")  # native: nothing to check


def test_iso_size_limit_allows_what_the_board_firmware_adds(tmp_path):
    from maculaos_sdk.errors import BuildFailed
    from maculaos_sdk.export import check_size as _check_size

    iso = tmp_path / "x.iso"
    with iso.open("wb") as f:
        f.truncate(170 * MIB)  # sparse: no disk used
    with pytest.raises(BuildFailed, match="170 MiB, over size.iso_max_mb=150$"):
        _check_size(iso, 150, BOARDS["generic"])
    _check_size(iso, 150, BOARDS["nuc"])  # 150 + its firmware allowance
    with pytest.raises(BuildFailed, match=r"over size.iso_max_mb=100 \+ 48 for nuc's firmware"):
        _check_size(iso, 100, BOARDS["nuc"])
    _check_size(iso, 0, BOARDS["generic"])  # 0: no limit
    _check_size(iso, 150, BOARDS["generic"], Architecture.arm64)  # the arm64 kernel is an uncompressed Image
    with pytest.raises(BuildFailed, match=r"over size.iso_max_mb=130 \+ 32 for the arm64 kernel$"):
        _check_size(iso, 130, BOARDS["generic"], Architecture.arm64)


def test_nuc_firmware_packages_follow_the_suites_names(tmp_path):
    """trixie moved i915's firmware out of firmware-misc-nonfree; the NUC image lost its GPU firmware."""
    from maculaos_sdk.plan import make_plan
    from maculaos_sdk.render import render_plan

    for suite, package in (("trixie", "firmware-intel-graphics"), ("bookworm", "firmware-misc-nonfree")):
        profile = load_profile("core", {"board": "nuc", "debian.suite": suite})
        render_plan(make_plan(profile, sde=1735689600), tmp_path / suite, "PUB\n")
        line = next(x for x in (tmp_path / suite / "kernel" / "Dockerfile").read_text().splitlines()
                    if "apt-get download" in x)
        assert package in line.split() and "firmware-iwlwifi" in line.split(), line
