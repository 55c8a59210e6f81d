"""Encryption at rest without a VM: the config keys, what a profile or an image may never carry, the installer's
policy and stored config, and luks.sh's key-slot bookkeeping on a real LUKS2 header (cryptsetup on a file)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from maculaos_device import encryption, installer, nodeconfig, paths
from maculaos_device.system import DeviceError

from maculaos_sdk.cli import main
from maculaos_sdk.paths import sdk_root

BASE = "name: x\nextends: core\n"
LUKS_SH = sdk_root() / "overlay" / str(paths.LUKS_LIB).lstrip("/")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, what", [
    ("storage:\n  encryption:\n    key_sources: [usb, tpm2]\n", "storage.encryption.key_sources",
     "unknown value 'tpm2'"),
    ("storage:\n  encryption:\n    usb_label: 'key; reboot'\n", "storage.encryption.usb_label", "invalid value"),
    ("storage:\n  encryption:\n    cipher: aes-cbc-essiv\n", "storage.encryption.cipher", "unknown value"),
    ("storage:\n  encryption:\n    method: luks1\n", "storage.encryption.method", "unknown value 'luks1'"),
    ("storage:\n  encryption:\n    passphrase: short\n", "storage.encryption.passphrase",
     "invalid value (not shown: a secret)"),
    ("storage:\n  encryption:\n    enabled: 'yes'\n", "storage.encryption.enabled", "expected a boolean"),
])
def test_the_encryption_keys_are_checked_like_every_other(tmp_path, text, key, what):
    problems = nodeconfig.validate_files([_config(tmp_path, text)])
    assert [(p.key, what in p.message) for p in problems] == [(key, True)], problems
    assert "short" not in str(problems[0])  # a passphrase is never echoed, even a wrong one


def test_the_policy_of_a_resolved_config(tmp_path):
    config = nodeconfig.resolve([_config(tmp_path, "storage:\n  encryption:\n    enabled: true\n"
                                                   "    key_sources: [usb, passphrase, usb]\n"
                                                   "    cipher: xchacha12,aes-adiantum-plain64\n")])
    policy = encryption.Policy.of(config)
    assert policy.sources == (encryption.KeySource.usb, encryption.KeySource.passphrase)  # each source once
    assert policy.shell_args() == ["xchacha12,aes-adiantum-plain64", encryption.USB_LABEL, "usb", "passphrase"]
    assert policy.problem() is None
    off = encryption.Policy.of(nodeconfig.resolve([]))
    assert not off.enabled and off.sources == (encryption.KeySource.passphrase,)
    empty = encryption.Policy.of(nodeconfig.resolve([_config(tmp_path, "storage:\n  encryption:\n    enabled: true\n"
                                                                        "    key_sources: []\n")]))
    assert "nothing could unlock" in (empty.problem() or "")


def test_a_profile_or_an_iso_install_config_never_carries_the_passphrase(write_profile, capsys, tmp_path):
    secret = "storage:\n  encryption:\n    enabled: true\n    passphrase: hunter2hunter2\n"
    path = write_profile(BASE + "config:\n" + "".join(f"  {line}\n" for line in secret.splitlines()))
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: config.storage.encryption.passphrase: a secret in an image" in err
    assert "hunter2" not in err and "Traceback" not in err
    (tmp_path / "node.yaml").write_text(secret)
    path = write_profile(BASE + "install:\n  config: node.yaml\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert f"{tmp_path / 'node.yaml'}:4: storage.encryption.passphrase: a secret in an image" in capsys.readouterr().err
    # enabling encryption without a secret is what a profile should do
    path = write_profile(BASE + "config:\n  storage:\n    encryption:\n      enabled: true\n      key_sources: [usb]\n")
    assert main(["build-image", "--config", str(path), "--dry-run", str(tmp_path / "dry")]) == 0
    rendered = (tmp_path / "dry" / "45-layer" / "overlay" / str(paths.ENCRYPTION_SH).lstrip("/")).read_text()
    assert f"MACULAOS_LUKS_MAPPER='{encryption.MAPPER}'" in rendered


def test_the_installer_takes_the_passphrase_from_its_config_and_never_stores_it(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "DEFAULT_CONFIG", tmp_path / "absent.yaml")
    config = _config(tmp_path, "# my node\nmaculaos:\n  hostname: n1\nstorage:\n  encryption:\n    enabled: true\n"
                               "    passphrase: 'correct horse battery'\n")
    policy, passphrase = installer.data_policy(str(config))
    assert policy.enabled and passphrase == "correct horse battery"
    stored = tmp_path / "stored.yaml"
    installer.store_config(config, stored)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load(stored.read_text()) == {"maculaos": {"hostname": "n1"}, "storage": {"encryption": {
        "enabled": True}}}
    plain = _config(tmp_path, "# kept as written\nmaculaos:\n  hostname: n2\n")
    installer.store_config(plain, stored)
    assert stored.read_text() == plain.read_text()  # no secret: the file as given, comments and all
    # a passphrase source, no passphrase, no terminal: refused before any disk is touched
    nopass = _config(tmp_path, "storage:\n  encryption:\n    enabled: true\n")
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    with pytest.raises(DeviceError, match="no terminal can ask for it"):
        installer.data_policy(str(nopass))


def _luks(tmp_path: Path, *tokens: dict | str) -> Path:
    """A real LUKS2 header in a file (cryptsetup formats files without a loop device), with `tokens` imported."""
    dev = tmp_path / "data.img"
    subprocess.run(["truncate", "-s", "32M", str(dev)], check=True)
    key = tmp_path / "key"
    key.write_bytes(b"k" * encryption.KEY_BYTES)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(dev)], check=True)
    for i, token in enumerate(tokens):
        text = token if isinstance(token, str) else json.dumps(token)
        subprocess.run(["cryptsetup", "token", "import", "--token-id", str(i), "--json-file", "-", str(dev)],
                       input=text.encode(), check=True)
    return dev


def _luks_sh(tmp_path: Path, call: str) -> str:
    script = (f"MACULAOS_RUN={tmp_path}; {encryption.shell_file()}. {LUKS_SH}; {call}")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


def test_the_unlock_order_is_read_from_the_header_and_hostile_tokens_are_cut_down(tmp_path):
    dev = _luks(tmp_path,
                {"type": "maculaos-usb", "keyslots": ["0"], "label": "MYKEY_1"},
                {"type": "maculaos-passphrase", "keyslots": ["0"]},
                {"type": "clevis", "keyslots": ["0"]},  # another tool's: not ours to try
                {"type": "maculaos-usb", "keyslots": ["0"], "label": "$(reboot)"},  # a planted header
                {"type": "maculaos-passphrase;reboot", "keyslots": ["0"]})
    assert _luks_sh(tmp_path, f"luks_sources {dev}").splitlines() == ["0 usb MYKEY_1", "0 passphrase -", "0 usb -"]
    assert _luks_sh(tmp_path, f"luks_cipher {dev}") == "aes-xts-plain64\n"


def test_a_disk_or_sd_image_cannot_ask_for_encryption_yet(write_profile, capsys):
    """Their first boot would keep the data partition plain: refused, not silently built."""
    path = write_profile(BASE + "outputs: [iso, disk]\nconfig:\n  storage:\n    encryption:\n      enabled: true\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    assert (f"{path}:4: config.storage.encryption.enabled: a disk or SD image cannot encrypt its data partition yet"
            in capsys.readouterr().err)


def test_an_iso_install_config_that_is_not_yaml_is_one_line_not_a_traceback(write_profile, capsys, tmp_path):
    """The secret check reads the install config only once the schema found it valid YAML."""
    (tmp_path / "node.yaml").write_text("storage: [\n")
    path = write_profile(BASE + "install:\n  config: node.yaml\n")
    assert main(["build-image", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'node.yaml'}:2: config: invalid YAML" in err and "Traceback" not in err
