"""The `maculaos` command on a file-backed node: JSON status, exit codes, the channel over HTTP, and the
version order shared with `maculaos-sdk publish`."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time

import pytest
from device_fixtures import make_bundle, make_key, make_node, sign
from maculaos_device import cli, updater, versions
from maculaos_device.cli import main

from maculaos_sdk.publish import publish


@pytest.fixture
def node(tmp_path):
    secret, public = make_key(tmp_path)
    dev = make_node(tmp_path / "node", public)
    dev.secret = secret
    return dev


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


def config(node, text: str) -> None:
    folder = node.config_root / "var/lib/maculaos/config.d"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "50-test.yaml").write_text(text)


def test_status_is_json(node, capsys):
    assert main(["upgrade", "--status"], node) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["mode"], s["booted"], s["active"], s["trial"], s["slots"]["B"]) == ("disk", "A", "A", None,
                                                                                  {"version": None})


def test_refusals_are_one_line_and_exit_1_usage_is_exit_2(node, capsys):
    assert main(["upgrade", "--rollback", "--no-reboot"], node) == 1
    err = capsys.readouterr().err
    assert err.startswith("maculaos: slot B holds no verified system") and err.count("\n") == 1
    assert main(["factory-reset"], node) == 1
    assert "--confirm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["upgrade", "--frobnicate"], node)
    assert exc.value.code == 2


def publish_channel(node, root, tmp_path, version="0.2.0", **kw):
    """What `maculaos-sdk publish` puts on the update server for this node's profile: bundle + signed pointer."""
    bundle = make_bundle(tmp_path / "out" / f"maculaos-test-{version}-amd64.bundle", node.secret, version)
    publish([bundle], root, "stable", signing_key=node.secret, **kw)
    return root / "channels/stable/test-amd64.json"


def test_apply_through_the_channel_over_http_needs_the_lab_opt_in(node, server, tmp_path, capsys):
    url, root = server
    publish_channel(node, root, tmp_path)
    config(node, f"upgrade:\n  url: {url}\n")
    assert main(["upgrade", "--check"], node) == 1
    assert "plain http is refused" in capsys.readouterr().err
    config(node, f"upgrade:\n  url: {url}\n  allow_http: true\n")
    assert main(["upgrade", "--check"], node) == 0
    assert json.loads(capsys.readouterr().out) == {"current": "0.1.0", "available": "0.2.0", "update": True}
    assert main(["upgrade", "--apply", "--no-reboot"], node) == 0
    assert node.reboots == []
    assert main(["upgrade", "--status"], node) == 0
    assert json.loads(capsys.readouterr().out)["slots"]["B"] == {"version": "0.2.0"}


def test_a_stale_or_replayed_channel_pointer_is_refused(node, server, tmp_path, capsys):
    url, root = server
    config(node, f"upgrade:\n  url: {url}\n  allow_http: true\n")
    now = int(time.time())
    pointer = publish_channel(node, root, tmp_path, now=now - 40 * 86400)  # 30 days valid: expired 10 days ago
    assert main(["upgrade", "--check"], node) == 1
    assert "channel pointer expired" in capsys.readouterr().err
    old = (pointer.read_bytes(), pointer.with_name(pointer.name + ".minisig").read_bytes())
    publish_channel(node, root, tmp_path / "again", now=now - 3600)
    yesterday = (pointer.read_bytes(), pointer.with_name(pointer.name + ".minisig").read_bytes())
    publish_channel(node, root, tmp_path / "fresh", now=now)
    assert main(["upgrade", "--check"], node) == 0  # follows the fresh pointer
    capsys.readouterr()
    pointer.write_bytes(yesterday[0])  # an attacker serves the older, still valid, signed pointer
    pointer.with_name(pointer.name + ".minisig").write_bytes(yesterday[1])
    assert main(["upgrade", "--check"], node) == 1
    assert "older than one this node already followed" in capsys.readouterr().err
    assert old[0] != yesterday[0]


def test_a_channel_pointer_must_be_signed_and_name_a_folder_on_the_server(node, server, tmp_path, capsys):
    url, root = server
    config(node, f"upgrade:\n  url: {url}\n  allow_http: true\n")
    pointer = publish_channel(node, root, tmp_path)
    body = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**body, "bundle": "maculaos-test-0.1.0-amd64.bundle"}))  # edited, not re-signed
    assert main(["upgrade", "--check"], node) == 1
    assert "pointer's signature does not verify" in capsys.readouterr().err
    for bad in ("../../etc", "/abs", ["list"], "a b"):
        pointer.write_text(json.dumps({**body, "bundle": bad}))
        sign(node.secret, pointer)
        assert main(["upgrade", "--check"], node) == 1
        assert "names no bundle folder" in capsys.readouterr().err
    pointer.write_text(json.dumps({**body, "channel": "beta"}))  # signed for another channel
    sign(node.secret, pointer)
    assert main(["upgrade", "--check"], node) == 1
    assert "is for test-amd64 on beta: refused" in capsys.readouterr().err


def test_the_channel_pointer_binds_the_manifest_it_names(node, server, tmp_path, capsys):
    """Any bundle signed with the node's key, put on the server under the name the pointer gives, was installed:
    the pointer names its manifest's sha256 and version, and nothing else stands in for it."""
    url, root = server
    config(node, f"upgrade:\n  url: {url}\n  allow_http: true\n")
    pointer = publish_channel(node, root, tmp_path)
    named = json.loads(pointer.read_text())["bundle"]
    assert main(["upgrade", "--check"], node) == 0
    capsys.readouterr()
    for version in ("0.2.0", "0.3.0"):  # a rebuilt 0.2.0 (other bytes), and a newer bundle, both validly signed
        shutil.rmtree(root / named)
        make_bundle(root / named, node.secret, version)
        assert main(["upgrade", "--apply", "--no-reboot"], node) == 1
        assert "is not the manifest the stable channel pointer names" in capsys.readouterr().err
    assert main(["upgrade", "--status"], node) == 0
    assert json.loads(capsys.readouterr().out)["slots"]["B"] == {"version": None}  # nothing written
    body = json.loads(pointer.read_text())
    body.pop("manifest_sha256")
    pointer.write_text(json.dumps({**body, "format": 1}))  # what an older SDK published
    sign(node.secret, pointer)
    assert main(["upgrade", "--check"], node) == 1
    assert "publish it again with this SDK" in capsys.readouterr().err


BUILD_TIME = 1735689600  # 2025-01-01: what MACULAOS_BUILD_TIME says in the image


@pytest.mark.parametrize("clock, verdict", [
    (60, "this node's clock (60) is behind 1735689600"),  # a Pi at power-on: no expiry date means anything
    (BUILD_TIME, "channel pointer expired"),  # the same Pi once sysinit raised its clock to the build time
])
def test_a_node_whose_clock_is_behind_what_it_trusts_refuses_to_judge_freshness(node, server, tmp_path, capsys,
                                                                                 monkeypatch, clock, verdict):
    url, root = server
    with node.os_release.open("a") as f:
        f.write(f'MACULAOS_BUILD_TIME="{BUILD_TIME}"\n')
    config(node, f"upgrade:\n  url: {url}\n  allow_http: true\n")
    publish_channel(node, root, tmp_path / "2023", now=1672531200)  # published 2023-01-01, expired 2023-01-31
    monkeypatch.setattr(cli.time, "time", lambda: clock)
    assert main(["upgrade", "--check"], node) == 1
    assert verdict in capsys.readouterr().err
    monkeypatch.undo()
    now = int(time.time())
    publish_channel(node, root, tmp_path / "today", now=now)  # a fresh pointer, signed today
    monkeypatch.setattr(cli.time, "time", lambda: clock)
    assert main(["upgrade", "--check"], node) == 1  # the clock is behind the pointer's own signing time
    assert f"this node's clock ({clock}) is behind {now - updater.CLOCK_SKEW}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["upgrade", "--check"], node) == 0  # the clock set: the same pointer is followed
    assert updater.clock_floor(node) == max(BUILD_TIME, now - updater.CLOCK_SKEW)


def test_a_server_sending_more_than_a_manifest_may_be_is_cut_off(node, server, capsys):
    url, root = server
    bundle = make_bundle(root / "big", node.secret, "0.2.0")
    with (bundle / "manifest.json").open("ab") as f:
        f.write(b" " * (1 << 20))
    assert main(["upgrade", "--check", f"{url}/big"], node) == 1  # no config: the explicit source is a folder
    assert "plain http is refused" in capsys.readouterr().err
    config(node, "upgrade:\n  allow_http: true\n")
    assert main(["upgrade", "--check", f"{url}/big"], node) == 1
    assert "more than the 1048576 allowed" in capsys.readouterr().err


def test_a_local_folder_source_and_a_confirm_after_reboot(node, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "usb", node.secret, "0.2.0")
    assert main(["upgrade", "--apply", str(bundle)], node) == 0
    assert node.reboots == [False]
    node.boot("B", "0.2.0")
    assert main(["confirm"], node) == 0
    assert main(["upgrade", "--status"], node) == 0
    s = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (s["booted"], s["active"], s["trial"], s["version"]) == ("B", "B", None, "0.2.0")
    shutil.rmtree(bundle)


@pytest.mark.parametrize(("low", "high"), [
    ("0.9.0", "0.10.0"), ("1.0~rc1", "1.0"), ("1.0", "1.0.1"), ("1.0", "1.0+local1"), ("0.1.0", "0.1.1~beta"),
    ("1.2", "1.10"), ("1.0a", "1.0b"),
])
def test_versions_order_as_debian_does(low, high):
    assert versions.newer(high, low) and not versions.newer(low, high)
    assert versions.compare(low, low) == 0
    assert versions.newest([low, high]) == versions.newest([high, low]) == high
