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
