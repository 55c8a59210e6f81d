"""Signing keys: generate, sign, and verify with minisign (a host tool `make setup` installs)."""

from __future__ import annotations

import subprocess

import pytest

from maculaos_sdk import keys
from maculaos_sdk.errors import BadInput


def test_generate_sign_verify_and_tamper(tmp_path):
    secret = tmp_path / "release.key"
    public = keys.generate(secret)
    assert public == tmp_path / "release.pub" and oct(secret.stat().st_mode & 0o777) == "0o600"
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"version": "1.0.0"}\n')
    sig = keys.sign(manifest, secret, "maculaos test 1.0.0")
    verify = ["minisign", "-Vm", str(manifest), "-p", str(public)]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    assert "maculaos test 1.0.0" in sig.read_text()
    manifest.write_text('{"version": "6.6.6"}\n')
    assert subprocess.run(verify, capture_output=True).returncode != 0


def test_generate_refuses_to_overwrite(tmp_path):
    keys.generate(tmp_path / "k.key")
    with pytest.raises(BadInput, match="already exists"):
        keys.generate(tmp_path / "k.key")


def test_signing_key_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    dev = keys.signing_key("")
    assert dev == tmp_path / "cache" / "keys" / "dev.key" and keys.public_key_path(dev).is_file()
    assert keys.signing_key("") == dev  # stable: the image's public key does not change between builds
    with pytest.raises(BadInput, match="not found"):
        keys.signing_key("", tmp_path / "missing.key")


def test_key_id_is_the_one_minisign_prints(tmp_path):
    public = keys.generate(tmp_path / "k.key")
    comment = public.read_text().splitlines()[0]  # "untrusted comment: minisign public key <ID>"
    # minisign prints the id without leading zeros; ours always has all 16 digits
    assert keys.key_id(public.read_text()) == comment.split()[-1].zfill(16)
    assert keys.key_id("not a key") == ""
