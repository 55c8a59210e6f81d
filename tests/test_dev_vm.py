"""The dev VM's host side without booting: forwards, the QEMU command line, the config the guest gets."""

from __future__ import annotations

import inspect
import re
import socket

import pytest
from maculaos_device import nodeconfig

from maculaos_sdk import devvm, vm
from maculaos_sdk.arch import Architecture
from maculaos_sdk.cli import main


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_forwards_take_their_preferred_port_unless_it_is_busy():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        forwards = vm.dev_forwards(ssh_port=taken)
    by_name = {f.name: f for f in forwards}
    assert [(f.name, f.guest) for f in forwards] == [("ssh", 22), ("k3s-api", 6443), ("console", 443)]
    assert by_name["ssh"].host != taken
    assert len({f.host for f in forwards}) == 3


def test_qemu_command_forwards_shares_and_hands_over_the_config(tmp_path):
    image = tmp_path / "x-amd64.iso"
    image.write_bytes(b"")
    forwards = (vm.Forward("ssh", 22, 2200), vm.Forward("console", 443, 8400))
    cfg = vm.VmConfig(image=image, arch=Architecture.amd64, accel="tcg", forwards=forwards, share=tmp_path,
                      guest_config=tmp_path / "c.yaml")
    cmd = vm.qemu_command(cfg)
    netdev = cmd[cmd.index("-netdev") + 1]
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:2200-:22,hostfwd=tcp:127.0.0.1:8400-:443"
    share = f"local,path={tmp_path},mount_tag=maculaos-share,security_model=none,id=share"
    assert cmd[cmd.index("-virtfs") + 1] == share
    assert cmd[cmd.index("-fw_cfg") + 1] == f"name=opt/io.maculaos/config,file={tmp_path / 'c.yaml'}"


def test_the_guest_config_passes_the_device_validator_and_opens_the_forwarded_ports(own_cache):
    key = devvm.dev_ssh_key()
    assert key.is_file() and key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    assert devvm.dev_ssh_key() == key  # made once
    path = devvm.guest_config(key, vm.dev_forwards())
    config = nodeconfig.resolve([path])
    assert config["ssh_authorized_keys"] == [key.with_suffix(".pub").read_text().strip()]
    plan = nodeconfig.plan(config, {"MAC_SUFFIX": "beef", "RANDOM_SUFFIX": "beef", "ARCH": "amd64"})
    assert plan["open_ports"] == ["443/tcp", "6443/tcp"]


def test_open_ports_are_checked_one_by_one(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('firewall:\n  open_ports: [6443/tcp, 70000/tcp, "80/tcp\\n"]\n')  # a real newline in YAML
    problems = nodeconfig.validate_files([f])
    assert [(p.key, p.message) for p in problems] == [
        ("firewall.open_ports[1]", "invalid value '70000/tcp'"),
        ("firewall.open_ports[2]", "invalid value '80/tcp\\n'")]


def test_vm_start_needs_an_image_or_a_profile_and_vm_ssh_a_started_vm(own_cache, capsys):
    assert main(["vm", "start"]) == 2
    assert main(["vm", "ssh"]) == 2
    err = capsys.readouterr().err
    assert "give an image or --profile" in err and "no dev VM started from this checkout" in err
    assert "Traceback" not in err


def test_doctor_fits_80_columns_and_suggests_nothing_bookworm_lacks():
    from maculaos_sdk import doctor, ui

    checks = [doctor.Check("a check with a long name", False, "detail " * 30, "fix " * 30),
              doctor.Check("kvm", False, "not usable", "none needed", required=False),
              doctor.Check("disk space", True, "62 GiB free")]
    with ui.console.capture() as captured:
        doctor.print_report(checks)
    lines = captured.get().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("-> fix fix" in line for line in lines) and not any("-> " in line and "GiB" in line for line in lines)
    assert "buildx" not in inspect.getsource(doctor)  # docker-buildx is not in bookworm: never suggested


def test_the_timeline_stamps_each_console_line_without_escapes():
    """out/test-logs/<test>/<machine>.timeline.log: where a boot spends its time, line by line."""
    import io

    from maculaos_sdk.machine import Timeline

    out = io.StringIO()
    timeline = Timeline(out)
    timeline.add(b"\x1b[1;33m*\x1b[m Starting udev ... \x1b[K")  # OpenRC's colours, a line in two reads
    timeline.add(b"[ ok ]\r\n\r\nmaculaos-init: slot A\n" + b"=" * 5000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "--- QEMU started"
    assert [re.sub(r"^\[\s*[0-9.]+s\] ", "", line) for line in lines[1:]] == [
        "* Starting udev ... [ ok ]", "maculaos-init: slot A", "=" * 5000]
    assert all(re.match(r"\[\s*[0-9]+\.[0-9]s\] ", line) for line in lines[1:])
