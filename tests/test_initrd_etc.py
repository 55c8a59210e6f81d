"""The initrd's /init and /etc/shadow as rendered.

Only an allow-list of /etc files persists: fresh_etc, cut from the rendered /init (what runs here is what
boots), is run by sh on a temporary data partition. Recovery's console opens for the profile's recovery
password, for test images with autologin, or not at all."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from maculaos_device import layout, paths

from maculaos_sdk.errors import BadInput
from maculaos_sdk.plan import make_plan
from maculaos_sdk.profile import load_profile
from maculaos_sdk.render import render_plan


def rendered_initrd(tmp_path: Path, profile: str) -> tuple[str, str]:
    """The initrd stage's /init and /etc/shadow, rendered for `profile`."""
    render_plan(make_plan(load_profile(profile), sde=1735689600), tmp_path / "ctx", "PUB\n")
    folder = tmp_path / "ctx" / "initrd"
    return (folder / "init").read_text(), (folder / "shadow").read_text()


def init_functions(tmp_path: Path) -> str:
    init, _ = rendered_initrd(tmp_path, "core")
    return init[init.index("keep_file() {"):init.index("mount_overlay_root() {")]


def run_fresh_etc(tmp_path: Path, etc: Path) -> None:
    script = tmp_path / "fresh.sh"
    script.write_text("set -u\n" + paths.shell_file() + init_functions(tmp_path) + f'fresh_etc "{etc}"\n')
    subprocess.run(["sh", str(script)], check=True)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def test_only_allow_listed_files_survive_a_boot(tmp_path):
    etc = tmp_path / "data" / "overlay" / "etc"
    upper = etc / "upper"
    for name in ("machine-id", "ssh/ssh_host_ed25519_key", "ssh/ssh_host_ed25519_key.pub", "rancher/node/password",
                 "init.d/backdoor", "maculaos/update.pub", "ssh/sshd_config", "runlevels/default/backdoor",
                 "ssh/ssh_host_ed25519_key.evil"):
        (upper / name).parent.mkdir(parents=True, exist_ok=True)
        (upper / name).write_text(name)
    (upper / "ssh" / "ssh_host_ed25519_key").chmod(0o600)
    (upper / "rancher" / "node").chmod(0o700)
    os.mkfifo(upper / "init.d" / "fifo")
    (etc / "work" / "work").mkdir(parents=True)
    run_fresh_etc(tmp_path, etc)
    assert files_under(upper) == {"machine-id", "ssh/ssh_host_ed25519_key", "ssh/ssh_host_ed25519_key.pub",
                                  "rancher/node/password"}
    assert (upper / "ssh" / "ssh_host_ed25519_key").read_text() == "ssh/ssh_host_ed25519_key"
    assert stat.S_IMODE((upper / "ssh" / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((upper / "rancher" / "node").stat().st_mode) == 0o700
    assert sorted(p.name for p in etc.iterdir()) == ["upper", "work"] and not any((etc / "work").iterdir())


def test_a_cut_between_the_renames_keeps_the_new_layer(tmp_path):
    etc = tmp_path / "overlay" / "etc"
    (etc / "upper.next").mkdir(parents=True)
    (etc / "upper.next" / "machine-id").write_text("kept")
    run_fresh_etc(tmp_path, etc)  # the old layer was already renamed away; the new one is complete
    assert files_under(etc / "upper") == {"machine-id"}
    assert (etc / "upper" / "machine-id").read_text() == "kept"


def test_a_fresh_data_partition_gets_an_empty_layer(tmp_path):
    etc = tmp_path / "overlay" / "etc"
    run_fresh_etc(tmp_path, etc)
    assert sorted(p.name for p in etc.iterdir()) == ["upper", "work"] and not files_under(etc)


def test_the_allow_list_is_in_the_layout_module():
    assert "ssh/ssh_host_*_key" in layout.ETC_PERSIST and "maculaos/update.pub" not in layout.ETC_PERSIST


LOCKED = Path(__file__).parent / "qemu" / "profiles" / "test-locked.yaml"


def test_recovery_asks_for_the_profiles_password(tmp_path):
    init, shadow = rendered_initrd(tmp_path, str(LOCKED))
    assert shadow.startswith("root:$6$maculaostestsalt$") and "sulogin" in init and "cttyhack sh -l" not in init


def test_recovery_console_is_locked_without_a_password_or_autologin(tmp_path):
    init, shadow = rendered_initrd(tmp_path, "core")
    assert shadow == "root:!:1::::::\n"
    assert "sulogin" not in init and "cttyhack sh -l" not in init and "the console stays locked" in init


def test_recovery_opens_on_test_images_with_autologin(tmp_path):
    init, shadow = rendered_initrd(tmp_path, "test")
    assert shadow == "root:!:1::::::\n" and "exec setsid cttyhack sh -l" in init


@pytest.mark.parametrize("value", ["secret", "$1$abc$def", "$6$salt$" + "a" * 85, "$6$salt$" + "a" * 86 + "\nx"])
def test_a_recovery_password_that_is_not_a_sha512_hash_is_bad_input(write_profile, value):
    path = write_profile(f"name: x\nextends: core\nconsole:\n  recovery_password: '{value}'\n")
    with pytest.raises(BadInput, match="console.recovery_password"):
        load_profile(str(path))
