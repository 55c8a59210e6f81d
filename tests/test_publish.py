"""`maculaos-sdk publish`: bundles copied to a server folder, channel pointers, signatures checked first."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from maculaos_sdk import keys
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput
from maculaos_sdk.publish import publish


def make_bundle(root, version, secret):
    b = root / f"maculaos-test-{version}-amd64.bundle"
    b.mkdir(parents=True)
    files = {}
    for name in ("rootfs.squashfs", "vmlinuz", "initrd.img"):
        (b / name).write_bytes(name.encode())
        files[name] = {"size": len(name), "sha256": hashlib.sha256(name.encode()).hexdigest()}
    (b / "manifest.json").write_text(json.dumps({
        "format": 1, "name": "maculaos", "profile": "test", "version": version, "arch": "amd64", "board": "generic",
        "min_version": "0.0.0", "files": files}))
    keys.sign(b / "manifest.json", secret, f"test {version}")
    return b


def test_publish_copies_bundles_and_points_the_channel_at_the_latest(tmp_path):
    secret = tmp_path / "k.key"
    public = keys.generate(secret)
    server = tmp_path / "srv"
    publish([make_bundle(tmp_path / "out", "0.2.0", secret)], server, "stable", public, signing_key=secret)
    pointer = server / "channels" / "stable" / "test-amd64.json"
    body = json.loads(pointer.read_text())
    assert {k: body[k] for k in ("version", "bundle", "profile", "arch", "channel")} == {
        "version": "0.2.0", "bundle": "maculaos-test-0.2.0-amd64.bundle", "profile": "test", "arch": "amd64",
        "channel": "stable"}
    assert body["expires"] - body["published"] == 30 * 86400
    assert subprocess.run(["minisign", "-Vqm", str(pointer), "-p", str(public)]).returncode == 0  # signed
    assert (server / "maculaos-test-0.2.0-amd64.bundle" / "manifest.json.minisig").is_file()
    publish([make_bundle(tmp_path / "out", "0.3.0", secret)], server, "stable", public, signing_key=secret)
    assert json.loads(pointer.read_text())["version"] == "0.3.0"
    assert (server / "maculaos-test-0.2.0-amd64.bundle").is_dir()  # older bundles stay for rollbacks


def test_the_channel_points_at_the_newest_version_whatever_the_order(tmp_path):
    secret = tmp_path / "k.key"
    public = keys.generate(secret)
    server = tmp_path / "srv"
    pointer = server / "channels" / "stable" / "test-amd64.json"
    # shell-glob order: 0.10.0 sorts before 0.9.0
    publish([make_bundle(tmp_path / "out", v, secret) for v in ("0.10.0", "0.9.0")], server, "stable", public,
            signing_key=secret)
    assert json.loads(pointer.read_text())["bundle"] == "maculaos-test-0.10.0-amd64.bundle"
    publish([make_bundle(tmp_path / "old", "0.9.1", secret)], server, "stable", public,  # an older one later
            signing_key=secret)
    assert json.loads(pointer.read_text())["version"] == "0.10.0"


def test_publish_refuses_a_bundle_signed_with_another_key(tmp_path):
    other = tmp_path / "other.key"
    keys.generate(other)
    public = keys.generate(tmp_path / "mine.key")
    bundle = make_bundle(tmp_path / "out", "0.2.0", other)
    with pytest.raises(BadInput, match="signature does not verify"):
        publish([bundle], tmp_path / "srv", "stable", public, signing_key=other)
    assert not (tmp_path / "srv").exists()


def test_publish_cli_incomplete_bundle_is_exit_2(tmp_path, capsys):
    bundle = tmp_path / "maculaos-test-0.2.0-amd64.bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert main(["publish", str(bundle), "--to", str(tmp_path / "srv"), "--public-key", str(tmp_path / "x.pub")]) == 2
    err = capsys.readouterr().err
    assert "incomplete bundle" in err and "Traceback" not in err


def test_the_pointer_names_the_digest_of_the_manifest_it_points_at(tmp_path):
    secret = tmp_path / "k.key"
    public = keys.generate(secret)
    server = tmp_path / "srv"
    publish([make_bundle(tmp_path / "out", "0.2.0", secret)], server, "stable", public, signing_key=secret)
    body = json.loads((server / "channels/stable/test-amd64.json").read_text())
    manifest = server / "maculaos-test-0.2.0-amd64.bundle" / "manifest.json"
    assert (body["format"], body["manifest_sha256"]) == (2, hashlib.sha256(manifest.read_bytes()).hexdigest())


@pytest.mark.parametrize("tamper", ["unsigned", "other-key", "names-a-missing-bundle"])
def test_publish_never_re_signs_a_pointer_it_cannot_verify(tmp_path, tamper):
    """One write of `version: 999` on the server became a validly signed pointer at the next publish."""
    secret = tmp_path / "k.key"
    public = keys.generate(secret)
    server = tmp_path / "srv"
    publish([make_bundle(tmp_path / "out", "0.2.0", secret)], server, "stable", public, signing_key=secret)
    pointer = server / "channels/stable/test-amd64.json"
    body = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**body, "version": "999", "bundle": "maculaos-test-999-amd64.bundle"}))
    if tamper == "other-key":
        keys.generate(tmp_path / "attacker.key")
        keys.sign(pointer, tmp_path / "attacker.key", "x")
    elif tamper == "names-a-missing-bundle":
        keys.sign(pointer, secret, "x")  # the publisher's own key, but nothing on the server backs it
    tampered = (pointer.read_bytes(), pointer.with_name(pointer.name + ".minisig").read_bytes())
    with pytest.raises(BadInput, match="does not verify|bundle folder|not a bundle folder"):
        publish([make_bundle(tmp_path / "new", "0.3.0", secret)], server, "stable", public, signing_key=secret)
    assert (pointer.read_bytes(), pointer.with_name(pointer.name + ".minisig").read_bytes()) == tampered


def test_publish_dot_from_inside_a_bundle_keeps_the_server_folder(tmp_path, monkeypatch, capsys):
    secret = tmp_path / "k.key"
    keys.generate(secret)
    server = tmp_path / "srv"
    publish([make_bundle(tmp_path / "out", "0.2.0", secret)], server, "stable", signing_key=secret)
    bundle = make_bundle(tmp_path / "out", "0.3.0", secret)
    monkeypatch.chdir(bundle)
    assert main(["publish", ".", "--to", str(server), "--signing-key", str(secret)]) == 0
    assert (server / "maculaos-test-0.2.0-amd64.bundle" / "manifest.json").is_file()  # still there
    assert json.loads((server / "channels/stable/test-amd64.json").read_text())["bundle"] == bundle.name
    assert main(["publish", ".", "--to", "sub", "--signing-key", str(secret)]) == 2  # into itself
    assert "would copy it into itself" in capsys.readouterr().err
