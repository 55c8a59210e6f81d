"""Plan resolution, template rendering (StrictUndefined) and content-addressed stage ids."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from maculaos_sdk.errors import BadInput
from maculaos_sdk.plan import make_plan
from maculaos_sdk.profile import load_profile
from maculaos_sdk.render import render_plan, tree_digest
from maculaos_sdk.stages import load_stages

SDE = 1735689600


def test_plan_orders_dependencies_first():
    plan = make_plan(load_profile("core"))
    names = plan.names()
    assert names[0] == "base" and names[-1] == "iso"
    for stage in plan.stages:
        for _, dep in stage.inputs:
            assert names.index(dep) < names.index(stage.key)


def test_every_stage_renders_for_both_arches(tmp_path):
    for arch in ("amd64", "arm64"):
        plan = make_plan(load_profile("test", {"arch": arch}), sde=SDE)  # test asks for every output
        rendered = render_plan(plan, tmp_path / arch, "PUB\n")
        assert {r.meta.name for r in rendered} == set(load_stages()) - {"sdimage", "tar", "oci"}
        box = tmp_path / f"box-{arch}.yaml"
        box.write_text(f"name: box\nextends: core\narch: {arch}\noutputs: [-iso, tar, oci]\n")
        container = render_plan(make_plan(load_profile(str(box)), sde=SDE), tmp_path / f"{arch}-oci", "PUB\n")
        assert [r.key for r in container][-2:] == ["tar", "oci"] and "CMD [\"/sbin/init\"]" in container[-1].dockerfile
        by_key = {r.key: r for r in rendered}
        for r in rendered:
            assert (r.context / "Dockerfile").is_file()
            for _, dep in r.planned.inputs:
                assert by_key[dep].image in r.dockerfile
    iso_cfg = (tmp_path / "arm64" / "iso" / "grub.cfg").read_text()
    assert "console=ttyAMA0" in iso_cfg and "serial --unit=0" not in iso_cfg
    boot = (tmp_path / "arm64" / "bootloader" / "Dockerfile").read_text()
    assert "arm64-efi" in boot and "BOOTAA64.EFI" in boot
    key = tmp_path / "amd64" / "layer" / "overlay" / "usr" / "share" / "maculaos" / "update.pub"
    assert key.read_text() == "PUB\n"
    lib = tmp_path / "amd64" / "layer" / "overlay" / "usr" / "lib" / "maculaos" / "maculaos_device"
    assert {"cli.py", "updater.py", "layout.py", "nodeconfig.py"} <= {f.name for f in lib.iterdir()}
    # every disk boot entry names the disk GRUB came from; the embedded GRUB can probe it and check passwords
    disk_cfg = (tmp_path / "amd64" / "bootloader" / "grub.cfg").read_text()
    assert 'probe --set=esp_uuid --part-uuid "$root"' in disk_cfg and disk_cfg.count("macula.esp=$esp_uuid") == 3
    assert " probe password_pbkdf2" in (tmp_path / "amd64" / "bootloader" / "Dockerfile").read_text()



def test_pinned_files_go_to_the_rootfs_with_their_list_and_the_folder_is_never_empty(tmp_path):
    k3s = tmp_path / "k3s"
    k3s.write_bytes(b"ELF")
    plan = make_plan(load_profile("core"), sde=SDE)
    rendered = {r.key: r for r in render_plan(plan, tmp_path / "a", "PUB\n", {"/usr/local/bin/k3s": k3s})}
    pinned = rendered["rootfs"].context / "pinned"
    assert (pinned / "usr/local/bin/k3s").read_bytes() == b"ELF"
    assert (pinned / "usr/share/maculaos/pinned-files").read_text() == "/usr/local/bin/k3s\n"
    assert not (rendered["layer"].context / "overlay/usr/local/bin/k3s").exists()
    bare = {r.key: r for r in render_plan(plan, tmp_path / "b", "PUB\n")}
    assert (bare["rootfs"].context / "pinned/usr/share/maculaos/pinned-files").read_text() == ""
    assert bare["rootfs"].stage_id != rendered["rootfs"].stage_id
    assert bare["layer"].context.joinpath("overlay/usr/share/maculaos/update.pub").read_text() == "PUB\n"


def test_strict_undefined_is_an_error(tmp_path, monkeypatch):
    stages = tmp_path / "stages"
    shutil.copytree(Path(__file__).parents[1] / "stages", stages)
    (stages / "10-tools" / "Dockerfile.j2").write_text("FROM {{ inputs.base }}\nRUN echo {{ profile.nosuch }}\n")
    plan = make_plan(load_profile("core"), load_stages(stages), sde=SDE)
    with pytest.raises(BadInput, match="undefined value"):
        render_plan(plan, tmp_path / "ctx")


def test_a_template_sees_only_the_profile_keys_its_stage_declares(tmp_path):
    stages = tmp_path / "stages"
    shutil.copytree(Path(__file__).parents[1] / "stages", stages)
    # squashfs declares squashfs.*: a real profile key it did not declare is as undefined as a made-up one
    (stages / "50-squashfs" / "Dockerfile.j2").write_text("FROM {{ inputs.tools }}\nRUN echo {{ profile.version }}\n")
    plan = make_plan(load_profile("core"), load_stages(stages), sde=SDE)
    with pytest.raises(BadInput, match=r"50-squashfs/Dockerfile.j2: template uses an undefined value") as exc:
        render_plan(plan, tmp_path / "ctx")
    assert "options:" in exc.value.hint
    meta = stages / "50-squashfs" / "stage.yaml"
    meta.write_text(meta.read_text().replace("options: [", "options: [version, "))
    render_plan(make_plan(load_profile("core"), load_stages(stages), sde=SDE), tmp_path / "ctx")  # declared: fine
    meta.write_text(meta.read_text().replace("options: [", "options: [squashfs.nosuch, "))
    with pytest.raises(BadInput, match=r"stage.yaml: options: 'squashfs.nosuch' is not a profile key"):
        load_stages(stages)


def test_a_context_entry_is_a_declared_source(tmp_path):
    """`context:` names come from one registry (contexts.CONTEXT_SOURCES): an unknown one stops loading the
    stages, and no SDK folder is copied into a build context just because a stage named it."""
    stages = tmp_path / "stages"
    shutil.copytree(Path(__file__).parents[1] / "stages", stages)
    meta = stages / "45-layer" / "stage.yaml"
    meta.write_text(meta.read_text().replace("context: [overlay, profile-overlay]", "context: [overlay, builder]"))
    with pytest.raises(BadInput, match=r"45-layer/stage.yaml: context: unknown source 'builder'") as exc:
        load_stages(stages)
    assert "profile-overlay" in exc.value.hint


def test_grubs_try_ladder_is_rendered_from_bootenv(tmp_path, monkeypatch):
    """bootenv.MAX_TRIES is the one place the number of trial boots is set: GRUB's ladder follows it."""
    from maculaos_device import bootenv

    monkeypatch.setattr(bootenv, "MAX_TRIES", 5)
    rendered = {r.key: r for r in render_plan(make_plan(load_profile("core"), sde=SDE), tmp_path, "PUB\n")}
    cfg = (rendered["bootloader"].context / "grub.cfg").read_text()
    rungs = re.findall(r'if \[ "\$tries" = "(\d)" \]; then set tries=(\d); set boot=\$trial\n', cfg)
    assert rungs == [(str(n), str(n + 1)) for n in range(5)]
    assert '  else\n    set rolledback=$trial' in cfg


def _ids(tmp_path, profile, sde=SDE):
    return {r.key: r.stage_id for r in render_plan(make_plan(profile, sde=sde), tmp_path)}


def test_ids_are_stable(tmp_path):
    assert _ids(tmp_path / "a", load_profile("core")) == _ids(tmp_path / "b", load_profile("core"))


@pytest.mark.parametrize("edit", ["overlay:\n  /etc/motd: hello\n", "version: 9.9.9\n", "services: [rsync]\n",
                                  "console:\n  autologin: true\n"])
def test_an_overlay_or_profile_edit_rebuilds_the_layer_not_the_rootfs_or_its_squashfs(tmp_path, write_profile, edit):
    base = _ids(tmp_path / "a", load_profile("core"))
    child = write_profile(f"name: core\nextends: core.yaml\n{edit}", "x.yaml")
    shutil.copy(Path(__file__).parents[1] / "profiles" / "core.yaml", child.parent / "core.yaml")
    changed = _ids(tmp_path / "b", load_profile(str(child)))
    same = {n for n in base if base[n] == changed[n]}
    assert {"base", "tools", "kernel", "rootfs", "squashfs"} <= same
    assert {"layer", "iso"}.isdisjoint(same)


def test_a_package_edit_rebuilds_the_rootfs_and_its_squashfs(tmp_path, write_profile):
    base = _ids(tmp_path / "a", load_profile("core"))
    child = write_profile("name: core\nextends: core.yaml\npackages: [file]\n", "x.yaml")
    shutil.copy(Path(__file__).parents[1] / "profiles" / "core.yaml", child.parent / "core.yaml")
    changed = _ids(tmp_path / "b", load_profile(str(child)))
    assert {n for n in base if base[n] == changed[n]} == {"base", "tools", "kernel", "initrd", "bootloader"}


def test_sde_and_arch_are_part_of_every_id(tmp_path):
    base = _ids(tmp_path / "a", load_profile("core"))
    other_sde = _ids(tmp_path / "b", load_profile("core"), sde=SDE + 1)
    other_arch = _ids(tmp_path / "c", load_profile("core", {"arch": "arm64"}))
    assert all(base[n] != other_sde[n] for n in base)
    assert all(base[n] != other_arch[n] for n in base)


def test_cross_build_emulates_only_the_root_filesystem(tmp_path):
    """arm64 on an amd64 host: the tools run natively on the host's own base (shared with amd64 builds)."""
    plan = make_plan(load_profile("test", {"arch": "arm64"}), sde=SDE)
    assert plan.cross and plan.names()[:2] == ["base@host", "tools"]
    by_key = {s.key: s for s in plan.stages}
    assert by_key["base@host"].arch.value == "amd64" and by_key["base"].arch.value == "arm64"
    assert dict(by_key["tools"].inputs) == {"base": "base@host"}
    assert dict(by_key["rootfs"].inputs)["base"] == "base"
    rendered = {r.key: r for r in render_plan(plan, tmp_path / "arm64")}
    assert {k for k, r in rendered.items() if r.platform} == {"base"}
    assert {k for k, r in rendered.items() if r.emulated} == {"base", "rootfs", "initrd"}  # longer deadlines
    native = {r.key: r.stage_id for r in render_plan(make_plan(load_profile("test"), sde=SDE), tmp_path / "amd64")}
    assert rendered["base@host"].stage_id == native["base"]  # one host base in the cache for both arches
    assert "base@host" not in make_plan(load_profile("test"), sde=SDE).names()


def test_tree_digest_sees_mode_and_content_not_mtime(tmp_path):
    (tmp_path / "f").write_text("a")
    d1 = tree_digest(tmp_path)
    import os
    os.utime(tmp_path / "f", (0, 0))
    assert tree_digest(tmp_path) == d1
    (tmp_path / "f").chmod(0o755)
    d2 = tree_digest(tmp_path)
    assert d2 != d1
    (tmp_path / "f").write_text("b")
    assert tree_digest(tmp_path) != d2


def test_vm_command_for_iso_and_disk(tmp_path):
    from maculaos_sdk.vm import VmConfig, qemu_command

    iso = tmp_path / "maculaos-core-0.1.0-amd64.iso"
    disk = tmp_path / "maculaos-test-0.1.0-amd64.qcow2"
    iso.write_bytes(b"")
    disk.write_bytes(b"")
    cmd = qemu_command(VmConfig.for_image(iso, accel="tcg"))
    assert cmd[0] == "qemu-system-x86_64" and "-bios" not in cmd and f"file={iso},media=cdrom,readonly=on,if=ide" in cmd
    cmd = qemu_command(VmConfig.for_image(disk, accel="tcg"))
    assert "-bios" in cmd and f"file={disk},format=qcow2,if=virtio" in cmd
    assert cmd[cmd.index("-accel") + 1].startswith("tcg")
    # a NUC image is booted as a NUC: UEFI only, Intel e1000e NIC, its disk on NVMe
    nuc_iso, nuc_disk = tmp_path / "maculaos-test-0.1.0-amd64-nuc.iso", tmp_path / "maculaos-test-0.1.0-amd64-nuc.qcow2"
    nuc_iso.write_bytes(b"")
    nuc_disk.write_bytes(b"")
    cmd = qemu_command(VmConfig.for_image(nuc_iso, accel="tcg"))
    assert "-bios" in cmd and "e1000e,netdev=net0" in cmd
    cmd = qemu_command(VmConfig.for_image(nuc_disk, accel="tcg"))
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device" and cmd[i + 1].startswith("nvme")] == \
        ["nvme,serial=maculaos0,drive=disk0"]
    assert f"file={nuc_disk},format=qcow2,if=none,id=disk0" in cmd


def test_rpi5_takes_its_kernel_from_backports_and_rpi4_from_the_suite(tmp_path):
    """The Pi 5's SD, RP1 and Ethernet drivers are only in trixie-backports' kernel; the Pi 4 boots trixie's own."""
    files = {}
    for board in ("rpi4", "rpi5"):
        plan = make_plan(load_profile("core", {"arch": "arm64", "board": board}), sde=SDE)
        rendered = {r.key: r for r in render_plan(plan, tmp_path / board, "PUB\n")}
        files[board] = (rendered["kernel"].context / "Dockerfile").read_text()
    assert "--release trixie-backports" in files["rpi5"] and "Suites: %s\\n" in files["rpi5"]
    assert '"trixie-backports"' in files["rpi5"]
    assert "--release" not in files["rpi4"] and "backports" not in files["rpi4"]


def test_the_bootstrap_trusts_debian_s_archive_keys_alone():
    """Not every key the build host's apt trusts (a third party's repository key could sign a mirror's Release)."""
    from maculaos_sdk.arch import Architecture
    from maculaos_sdk.bootstrap import DEBIAN_KEYRING, mmdebstrap_command
    from maculaos_sdk.render import bootstrap_params

    cmd = mmdebstrap_command(bootstrap_params(load_profile("core"), Architecture("amd64"), 1735689600), Path("x.tar"))
    assert [a for a in cmd if a.startswith("--keyring")] == [f"--keyring={DEBIAN_KEYRING}"]
    assert DEBIAN_KEYRING == Path("/usr/share/keyrings/debian-archive-keyring.gpg")
