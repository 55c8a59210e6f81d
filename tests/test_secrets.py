"""Secrets in the node config and the profile: never echoed by a validation error, never in a process's argv,
and a GRUB password hash of one PBKDF2 round is no lock."""

from __future__ import annotations

import pytest
from maculaos_device import nodeconfig

from maculaos_sdk.cli import main


@pytest.mark.parametrize("psk", ["12345678", "'short'", "[s3cret-passphrase]"])
def test_a_wifi_passphrase_that_does_not_validate_is_not_echoed(tmp_path, capsys, psk):
    path = tmp_path / "config.yaml"
    path.write_text(f"wifi:\n  ssid: lab\n  psk: {psk}\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: wifi.psk:" in err and "(not shown: a secret)" in err
    assert psk.strip("'[]") not in err


def test_k3s_args_of_the_wrong_kind_are_not_echoed(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("k3s:\n  args: {token: s3cret-join-token}\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "k3s.args: expected a list of strings" in err and "s3cret" not in err


@pytest.mark.parametrize("args, argv, token", [
    (["server", "--token=s3cret"], ["server", "--token-file=/run/maculaos/k3s-token"], "s3cret"),
    (["agent", "--token", "s3cret", "--server=https://a:6443"],
     ["agent", "--server=https://a:6443", "--token-file=/run/maculaos/k3s-token"], "s3cret"),
    (["agent", "-t", "s3cret"], ["agent", "--token-file=/run/maculaos/k3s-token"], "s3cret"),
    (["server", "--token-file=/var/lib/rancher/token"], ["server", "--token-file=/var/lib/rancher/token"], None),
    (["server"], ["server"], None),
])
def test_a_k3s_join_token_moves_from_argv_to_a_file(args, argv, token):
    assert nodeconfig.k3s_argv(args) == (argv, token)


@pytest.mark.parametrize("rounds, ok", [("1", False), ("9999", False), ("10000", True), ("100000", True)])
def test_a_grub_password_hash_needs_the_rounds_grub_mkpasswd_gives(write_profile, capsys, rounds, ok):
    path = write_profile(f"name: rounds{rounds}\nextends: core\nconsole:\n  grub_password: grub.pbkdf2.sha512."
                         f"{rounds}.{'AB12' * 16}.{'CD34' * 32}\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == (0 if ok else 2)
    assert ("console.grub_password: invalid value" in capsys.readouterr().err) is not ok
