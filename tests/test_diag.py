"""`maculaos diag`: each check's pass, warn and fail on a file-backed node, and a support bundle that holds no secret
of the node config (issue 24, part 6). In QEMU: tests/qemu/test_custom_image.py."""

from __future__ import annotations

import json
import tarfile

import pytest
from device_fixtures import make_bundle, make_key, make_node
from maculaos_device import diag, nodeconfig, updater
from maculaos_device.source import Source

TOKEN, PSK = "s3cret-join-token-1234", "correct horse battery"


@pytest.fixture
def node(tmp_path):
    secret, public = make_key(tmp_path)
    dev = make_node(tmp_path / "node", public)
    dev.proc_mounts = tmp_path / "mounts"
    dev.proc_mounts.write_text(f"/dev/vda4 {dev.state} ext4 rw 0 0\n")
    dev.secret_key = secret  # type: ignore[attr-defined]
    return dev


@pytest.fixture
def host(tmp_path):
    h = diag.Host(resolv_conf=tmp_path / "resolv.conf", routes=tmp_path / "route")
    h.resolv_conf.write_text("nameserver 10.0.2.3\n")
    h.routes.write_text("Iface\tDestination\tGateway\nlo\t0000007F\t00000000\neth0\t00000000\t0202000A\n")
    return h


def config(**over):
    return nodeconfig.merge(nodeconfig.defaults(), over)


def by_name(checks):
    return {(c.area, c.name): c for c in checks}


def test_a_healthy_node_passes_and_a_fresh_one_says_what_it_lacks(node, host):
    checks = by_name(diag.run_checks(node, config(), ("storage", "network", "update"), host))
    assert checks["storage", "data partition"].status == checks["storage", "free space"].status == "pass"
    assert checks["network", "default route"].detail == "via eth0"
    assert checks["network", "DNS servers"].detail == "10.0.2.3"
    assert ("network", "name resolution") not in checks  # no update server or peer: no name it must resolve
    assert checks["update", "slots"].status == "pass"
    assert checks["update", "fallback slot"].status == "warn"  # B holds nothing yet
    assert checks["update", "update server"].hint == "set upgrade.url in the node config"


def test_broken_network_and_storage_fail_with_hints(node, host):
    host.resolv_conf.write_text("# no servers\n")
    host.routes.write_text("Iface\tDestination\tGateway\nlo\t0000007F\t00000000\n")
    node.proc_mounts.write_text("")
    checks = by_name(diag.run_checks(node, config(), ("storage", "network"), host))
    assert [(k, c.status) for k, c in checks.items()] == [
        (("storage", "data partition"), "fail"), (("network", "default route"), "fail"),
        (("network", "DNS servers"), "fail")]
    assert all(c.hint for c in checks.values())
    host.resolv_conf.write_text("nameserver 192.0.2.1\n")  # a server that answers nothing
    checks = by_name(diag.run_checks(node, config(upgrade={"url": "https://updates.maculaos.invalid/x"}),
                                     ("network",), host))
    resolution = checks["network", "name resolution"]
    assert resolution.status == "fail" and "updates.maculaos.invalid does not resolve with 192.0.2.1" in \
        resolution.detail and "maculaos.dns_nameservers" in resolution.hint


def test_a_full_data_partition_fails(node, host, monkeypatch):
    class Full:
        f_blocks, f_bavail, f_frsize = 1000, 10, 4096

    monkeypatch.setattr(diag.os, "statvfs", lambda path: Full)
    check = by_name(diag.run_checks(node, config(), ("storage",), host))["storage", "free space"]
    assert check.status == "fail" and "(1%)" in check.detail and "/var/lib/data" in check.hint


def test_a_pending_update_and_a_rollback_are_warnings(node, host, tmp_path):
    updater.apply(node, Source(str(make_bundle(tmp_path / "b", node.secret_key, "0.2.0"))))
    checks = by_name(diag.run_checks(node, config(), ("update",), host))
    assert checks["update", "pending update"].detail == "slot B waits for a reboot"
    node.boot("B", "0.2.0")
    updater.confirm(node)
    updater.rollback(node)
    node.boot("A", "0.1.0")
    updater.confirm(node)
    checks = by_name(diag.run_checks(node, config(), ("update",), host))
    assert checks["update", "rollback"].detail == "slot B was rolled back from"


def test_the_support_bundle_holds_no_secret(node, host, tmp_path, monkeypatch):
    cfg = config(wifi={"ssid": "lab", "psk": PSK}, k3s={"args": ["server", f"--token={TOKEN}", "--agent-token",
                                                                 "agent-secret-5678"]})
    assert diag.secrets_of(cfg) == sorted([TOKEN, PSK, "agent-secret-5678"], key=len, reverse=True)
    # logs that echo the secrets (a daemon printing its command line, say)
    monkeypatch.setattr(diag, "_command", lambda argv: f"{argv[0]}: started with --token={TOKEN} psk={PSK}\n")
    checks = diag.run_checks(node, cfg, ("storage", "update"), host)
    bundle = diag.write_bundle(node, cfg, checks, tmp_path / "diag")
    assert oct(bundle.stat().st_mode & 0o777) == "0o600" and oct(bundle.parent.stat().st_mode & 0o777) == "0o700"
    with tarfile.open(bundle) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert {"diag.json", "status.json", "config.json", "dmesg.txt", "log.txt", "nft.json"} <= files.keys()
    for secret in (TOKEN, PSK, "agent-secret-5678"):
        assert not any(secret in text for text in files.values()), secret
    assert json.loads(files["config.json"])["wifi"]["psk"] == diag.REDACTED
    assert json.loads(files["config.json"])["k3s"]["args"] == diag.REDACTED
    assert "--token=<redacted>" in files["dmesg.txt"]
    assert json.loads(files["status.json"])["booted"] == "A"


def test_the_command_exits_1_on_a_failed_check_and_2_on_a_bad_area(node, capsys):
    assert diag.main(node, ["storage", "--json"]) == 0  # the config under the node's folder: defaults
    assert [c["name"] for c in json.loads(capsys.readouterr().out)] == ["data partition", "free space"]
    node.proc_mounts.write_text("")
    assert diag.main(node, ["storage"]) == 1
    assert capsys.readouterr().out.startswith("FAIL  storage: data partition")
    with pytest.raises(SystemExit) as exit_:
        diag.main(node, ["disks"])
    assert exit_.value.code == 2
