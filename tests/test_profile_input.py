"""Profiles written by someone else: every value that reaches a Dockerfile, GRUB or a shell is held to a
full-match pattern, files must be UTF-8 YAML mappings, overlay files stay in the profile's folder."""

from __future__ import annotations

import pytest

from maculaos_sdk.cli import main

BASE = "name: x\nextends: core\n"


@pytest.mark.parametrize("text, where, what", [
    ("debian:\n  mirror: --setup-hook=touch /x\n", ":4: debian.mirror", "invalid value '--setup-hook=touch /x'"),
    ("kernel:\n  args: ['quiet\"; echo pwned']\n", ":4: kernel.args[0]", "invalid value"),
    ("kernel:\n  args: [\"a\\nmenuentry x {\"]\n", ":4: kernel.args[0]", "invalid value"),
    ("update:\n  min_version: '1.0\" > /x; echo \"'\n", ":4: update.min_version", "invalid value"),
    ("version: \"1.0\\n\"\n", ":3: version", "invalid value '1.0\\n'"),
    ("services: [ssh, 'x y']\n", ":3: services[1]", "invalid value 'x y'"),
    ("base_image: \"debian:12\\nRUN id\"\n", ":3: base_image", "invalid value"),
    ("kernel:\n  package: linux-image-amd64 foo\n", ":4: kernel.package", "invalid value"),
    ("kernel:\n  prune: [../../etc]\n", ":4: kernel.prune[0]", "invalid value '../../etc'"),
    ("firstboot: ['rm -rf /']\n", ":3: firstboot[0]", "invalid value 'rm -rf /'"),
    # printed as written: a pattern or a value is never taken for rich markup
    ("packages: [htop, -nano, 'a;b']\n", ":3: packages[2]",
     "invalid value 'a;b' (hint: must match [a-z0-9][a-z0-9+.-]+)"),
    ("services: ['[bold]x[/]']\n", ":3: services[0]", "invalid value '[bold]x[/]'"),
    # container image references by docker's grammar, tarballs inside the profile's folder
    ("images: [nginx, 'Nginx:1']\n", ":3: images[1]", "invalid value 'Nginx:1'"),
    ("images: ['nginx:latest --privileged']\n", ":3: images[0]", "invalid value"),
    ("images: ['nginx@sha256:abc']\n", ":3: images[0]", "invalid value"),
    ("images: [../../host/secret.tar]\n", ":3: images[0]", "invalid value '../../host/secret.tar'"),
    ("images: ['" + "a" * 600 + "']\n", ":3: images[0]", "invalid value"),
    # URLs in the default node config, with the schemes each may use
    ("config:\n  maculaos:\n    mesh:\n      bootstrap_peers: ['http://boot.example.com']\n",
     ":6: config.maculaos.mesh.bootstrap_peers[0]", "invalid value 'http://boot.example.com'"),
    ("config:\n  upgrade:\n    url: 'ftp://updates.example.com'\n", ":5: config.upgrade.url", "invalid value"),
    ("config:\n  upgrade:\n    url: 'https://user:pw@updates.example.com'\n", ":5: config.upgrade.url", "invalid"),
])
def test_values_that_reach_a_template_must_fully_match(write_profile, capsys, text, where, what):
    path = write_profile(BASE + text)
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}{where}: {what}" in err and "Traceback" not in err


def test_overlay_sources_stay_in_the_profile_folder(tmp_path, capsys):
    (tmp_path / "secret.key").write_text("x")
    (tmp_path / "p").mkdir()
    path = tmp_path / "p" / "p.yaml"
    path.write_text(BASE + "overlay:\n  /etc/x: {source: ../secret.key}\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert "overlay./etc/x.source: '../secret.key' is outside the profile's folder" in capsys.readouterr().err


def test_non_utf8_and_empty_profiles_are_one_line_each(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: x\nextends: core\ndescription: caf\xe9\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for path, message in ((latin, ":3: not UTF-8 text (byte 0xe9)"), (empty, ":1: the profile is empty")):
        assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}{message}") and err.count("\n") == 0, err


def _profile_with_linked_overlay(tmp_path, entries: str):
    """A third-party profile whose overlay folder holds symlinks to the build host's files and folders."""
    host = tmp_path / "host"
    (host / "keys").mkdir(parents=True)
    (host / "keys" / "id").write_text("secret key\n")
    tree = tmp_path / "p" / "files" / "etc"
    tree.mkdir(parents=True)
    (tree / "keys").symlink_to(host / "keys")
    (tree / "id").symlink_to(host / "keys" / "id")
    (tree / "up").symlink_to("../../../..")
    path = tmp_path / "p" / "p.yaml"
    path.write_text(BASE + "overlay:\n  /etc: {source: files/etc}\n" + entries)
    return path, host


def _host_state(host):
    return {p.relative_to(host).as_posix(): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(host.rglob("*"))}


@pytest.mark.parametrize("entry, link", [
    ("/etc/keys/id: {content: 'overwritten', mode: '4755'}", "/etc/keys"),
    ("/etc/keys: {source: files/etc, mode: '0777'}", "/etc/keys"),
    ("/etc/up/host/keys/id: 'overwritten'", "/etc/up"),
])
def test_an_overlay_entry_through_a_symlink_is_refused_and_nothing_on_the_host_changes(tmp_path, capsys, entry,
                                                                                       link):
    path, host = _profile_with_linked_overlay(tmp_path, f"  {entry}\n")
    before = _host_state(host)
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 2
    err = capsys.readouterr().err.strip()
    key = entry.split(":")[0]
    assert f"overlay.{key}: the path goes through {link} is a symlink" in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
    assert "Traceback" not in err and _host_state(host) == before


def test_an_overlay_file_named_like_a_symlink_replaces_the_link_in_the_image_not_its_target(tmp_path, capsys):
    path, host = _profile_with_linked_overlay(tmp_path, "  /etc/id: {content: 'mine', mode: '0600'}\n")
    before = _host_state(host)
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 0
    assert _host_state(host) == before
    [layer] = (tmp_path / "dry").rglob("overlay/etc/id")
    assert not layer.is_symlink() and layer.read_text() == "mine" and layer.stat().st_mode & 0o7777 == 0o600
    assert (layer.parent / "keys").is_symlink()  # the folder's own links stay links in the image


def test_the_node_files_never_follow_a_symlink_an_overlay_placed(tmp_path, capsys):
    host = tmp_path / "host"
    host.mkdir()
    lib = tmp_path / "p" / "files" / "lib"
    lib.mkdir(parents=True)
    (lib / "maculaos_device").symlink_to(host)  # where the SDK puts the on-device tool
    path = tmp_path / "p" / "p.yaml"
    path.write_text(BASE + "overlay:\n  /usr/lib/maculaos: {source: files/lib}\n")
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 2
    assert "overlay: the path goes through /usr/lib/maculaos/maculaos_device is a symlink" in capsys.readouterr().err
    assert list(host.iterdir()) == []


def test_the_install_config_stays_in_the_profile_folder(tmp_path, capsys):
    (tmp_path / "node.yaml").write_text("hostname: x\n")
    (tmp_path / "p").mkdir()
    path = tmp_path / "p" / "p.yaml"
    path.write_text(BASE + "install:\n  config: ../node.yaml\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert "install.config: '../node.yaml' is outside the profile's folder" in capsys.readouterr().err


@pytest.mark.parametrize("folder, ok", [("net/netfilter", False), ("net", False), ("net/ipv4/", False),
                                        ("net/ipv6/netfilter", False), ("net/netfilter/ipvs", True),
                                        ("net/wireless", True)])
def test_the_firewall_s_modules_cannot_be_pruned(write_profile, capsys, folder, ok):
    path = write_profile(BASE + f"kernel:\n  prune: [{folder}]\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == (0 if ok else 2)
    err = capsys.readouterr().err
    assert (f"kernel.prune[0]: '{folder}' holds net/" in err) is not ok, err
    assert "Traceback" not in err


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("text, where, what", [
    (BASE + "name: y\n", ":3: name", "given twice (lines 1 and 3)"),
    (BASE + "console:\n  autologin: true\n  grub_password: ''\n  autologin: false\n", ":6: console.autologin",
     "given twice (lines 4 and 6)"),
    (BASE + "description: " + "[" * 40 + "]" * 40 + "\n", ":3", "nested deeper than 32 levels"),
    (BASE + LAUGHS, ":5", "more than 16 aliases"),
    (BASE + "description: '" + "x" * (1 << 20) + "'\n", ":1", "larger than 1024 KiB"),
])
def test_hostile_yaml_is_refused_before_it_is_built(write_profile, capsys, text, where, what):
    """A key twice (PyYAML keeps the last silently), deep nesting, an alias bomb and a huge file: one line each,
    exit 2, at once (nothing is expanded or rendered)."""
    import time

    path = write_profile(text)
    started = time.monotonic()
    assert main(["build-image", "--config", str(path), "--dry-run", str(path.parent / "dry")]) == 2
    assert time.monotonic() - started < 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}{where}: {what}") and err.count("\n") == 0, err
    assert not (path.parent / "dry").exists()


def test_the_node_config_refuses_the_same(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("maculaos:\n  hostname: a\n  hostname: b\n")
    assert main(["config", "validate", str(config)]) == 2
    assert f"{config}:3: maculaos.hostname: given twice (lines 2 and 3)" in capsys.readouterr().err
    config.write_text(LAUGHS)
    assert main(["config", "validate", str(config)]) == 2
    assert "more than 16 aliases" in capsys.readouterr().err


def test_well_formed_references_and_urls_pass(write_profile, capsys, tmp_path):
    digest = "0" * 64
    path = write_profile(BASE + f"images: [nginx:1.27, 'registry.local:5000/team/app@sha256:{digest}', app.tar]\n"
                         "config:\n  maculaos:\n    mesh:\n      bootstrap_peers: ['https://boot.macula.io:443']\n"
                         "  upgrade:\n    url: 'https://updates.example.com/maculaos'\n")
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 0
    node = tmp_path / "node.yaml"
    node.write_text("upgrade:\n  url: /mnt/usb/updates\n")
    assert main(["config", "validate", str(node)]) == 0


@pytest.mark.parametrize("sizes, where, what", [
    ("  size_mb: 300\n", ":5: disk.size_mb", "a disk of 300 MiB cannot hold ESP 128 + two slots of at least 256"),
    ("  slot_mb: 1024\n  size_mb: 2048\n", ":6: disk.size_mb",
     "a disk of 2048 MiB cannot hold ESP 128 + two slots of at least 1024 + data 256 MiB (need 2434)"),
    ("  data_mb: 8\n", ":5: disk.data_mb", "a data partition of 8 MiB is below the 32 MiB it needs"),
])
def test_disk_sizes_that_can_never_hold_the_layout_are_refused_before_any_stage(write_profile, capsys, sizes, where,
                                                                                  what):
    path = write_profile(BASE + "outputs: [disk]\ndisk:\n" + sizes)
    assert main(["build-image", "--config", str(path), "--dry-run", str(path.parent / "dry")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}{where}: {what}") and err.count("\n") == 0, err
    assert not (path.parent / "dry").exists()


def test_a_problem_in_an_extended_file_names_the_chain_that_reached_it(tmp_path, capsys):
    (tmp_path / "child.yaml").write_text("name: child\nextends: ./mid.yaml\n")
    (tmp_path / "mid.yaml").write_text("name: mid\n\nbase: bad:1.0\n")
    for bad, where in (("kernel:\n  args: ['a;b']\n", ":4: kernel.args[0]: invalid value 'a;b'"),
                       ("name: again\n", ":3: name: given twice (lines 1 and 3)")):
        (tmp_path / "bad.yaml").write_text("name: bad\nextends: core\n" + bad)
        assert main(["build-image", "--config", str(tmp_path / "child.yaml"), "--dry-run", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path}/bad.yaml{where} (reached through {tmp_path}/child.yaml:2 (extends)"
                              f" -> {tmp_path}/mid.yaml:3 (base))"), err
