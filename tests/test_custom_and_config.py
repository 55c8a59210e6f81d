"""Custom-image files (base: name:version, name from the file), the node config schema shared by host and
device (validation messages, merge order, cmdline overrides, mesh roles), and the Debian package check."""

from __future__ import annotations

from pathlib import Path

import pytest
from maculaos_device import nodeconfig

from maculaos_sdk import debian_index
from maculaos_sdk.cli import main
from maculaos_sdk.errors import BadInput, BadInputs
from maculaos_sdk.profile import load_profile

EXAMPLE = Path(__file__).parents[1] / "examples" / "maculaos-custom.yaml"


def test_seed_example_resolves_to_custom_1_2_0_on_the_maculaos_base():
    p = load_profile(str(EXAMPLE))
    assert p.artifact_basename() == "maculaos-custom-1.2.0-amd64"
    assert p.origins["version"][0] == str(EXAMPLE.resolve())
    assert {"python3", "python3-pip", "python3-opencv", "htop"} <= set(p.get("packages"))
    assert p.get("artifacts") == ["k3s", "k3s-airgap-images"]  # from the maculaos base
    assert p.get("firstboot") == ["/opt/myapp/setup.sh"]
    assert p.get("config")["maculaos"]["labels"]["macula.io/arch"] == "${ARCH}"


def test_explicit_version_wins_over_base_and_base_excludes_extends(write_profile):
    p = load_profile(str(write_profile("base: core:1.2.0\nversion: 2.0.0\n", "maculaos-edge.yaml")))
    assert (p.name, p.version) == ("edge", "2.0.0")
    bad = write_profile("base: core\nextends: core\n", "x.yaml")
    with pytest.raises(BadInput, match="either `base` or `extends`"):
        load_profile(str(bad))


def test_profile_config_is_validated_with_the_node_schema(write_profile):
    path = write_profile("base: core:1.0.0\nconfig:\n  maculaos:\n    hostnme: x\n    mesh:\n      roles:\n"
                         "        gateway: 'yes'\n")
    with pytest.raises(BadInputs) as exc:
        load_profile(str(path))
    text = exc.value.render()
    assert f"{path}:4: config.maculaos.hostnme: unknown key (hint: did you mean `maculaos.hostname`?)" in text
    assert f"{path}:7: config.maculaos.mesh.roles.gateway: expected a boolean" in text


def test_config_validate_cli_reports_every_problem_with_line_and_hint(tmp_path, capsys):
    f = tmp_path / "config.yaml"
    f.write_text("maculaos:\n  dns_nameservers: 1.1.1.1\n  mesh:\n    tls_mode: prod\nssh_authorized_keys: [hello]\n"
                 "k3z: {}\n")
    assert main(["config", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: maculaos.dns_nameservers: expected a list of strings" in err
    assert f"{f}:4: maculaos.mesh.tls_mode: unknown value 'prod' (hint: one of development, production)" in err
    assert "ssh_authorized_keys[0]: not an SSH public key" in err
    assert f"{f}:6: k3z: unknown key (hint: did you mean `k3s`?)" in err
    assert "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text("maculaos:\n  hostname: edge-1\n")
    assert main(["config", "validate", str(good)]) == 0


def test_merge_order_default_node_dropins_cmdline(tmp_path):
    root = tmp_path
    (root / "usr/share/maculaos").mkdir(parents=True)
    (root / "var/lib/maculaos/config.d").mkdir(parents=True)
    (root / "usr/share/maculaos/config.yaml").write_text("maculaos:\n  hostname: img\n  labels: {a: '1'}\n")
    (root / "var/lib/maculaos/config.yaml").write_text("maculaos:\n  hostname: node\n  labels: {b: '2'}\n")
    (root / "var/lib/maculaos/config.d/10-x.yaml").write_text("maculaos:\n  modules: [wireguard]\n")
    files = nodeconfig.sources(root)
    assert [f.name for f in files] == ["config.yaml", "config.yaml", "10-x.yaml"]
    config = nodeconfig.resolve(files, "quiet macula.maculaos.hostname=cmd macula.maculaos.mesh.roles.gateway=true")
    assert config["maculaos"]["hostname"] == "cmd"
    assert config["maculaos"]["labels"] == {"a": "1", "b": "2"}
    assert config["maculaos"]["modules"] == ["wireguard"]
    plan = nodeconfig.plan(config, {"MAC_SUFFIX": "beef", "RANDOM_SUFFIX": "beef", "ARCH": "arm64"})
    assert plan["mesh"]["roles"] == ["peer", "gateway"]
    assert plan["mesh"]["services"] == ["macula-mesh", "macula-gateway"]
    assert plan["mesh"]["ports"] == ["443/tcp", "80/tcp"]


def test_hostname_and_labels_expand_facts():
    config = nodeconfig.merge(nodeconfig.defaults(), {"maculaos": {"labels": {"arch": "${ARCH}"}}})
    plan = nodeconfig.plan(config, {"MAC_SUFFIX": "12ab", "RANDOM_SUFFIX": "12ab", "ARCH": "amd64"})
    assert plan["hostname"] == "macula-12ab" and plan["labels"] == {"arch": "amd64"}
    assert plan["k3s_args"][:3] == ["server", "--disable=traefik", "--disable=servicelb"]


def test_config_reference_doc_is_generated_from_the_schema():
    doc = (Path(__file__).parents[1] / "docs" / "config-reference.md").read_text()
    assert nodeconfig.reference_markdown() in doc, "run `make docs`"


def test_unknown_debian_packages_are_reported_before_building(write_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("MACULAOS_SDK_CACHE", str(tmp_path / "cache"))
    index = debian_index._index_file("http://deb.debian.org/debian", "trixie", "main", "amd64")
    index.parent.mkdir(parents=True)
    from maculaos_sdk.plan import BOOT_PACKAGES

    index.write_text("\n".join([*BOOT_PACKAGES, "htop", "python3-opencv", "tree"]) + "\n")
    path = write_profile("name: x\npackages:\n  - htop\n  - opencv\n  - tre\n")
    with pytest.raises(BadInputs) as exc:
        debian_index.check_packages(load_profile(str(path)), offline=True)
    lines = exc.value.render().splitlines()
    assert lines[0].startswith(f"{path}:4: packages: 'opencv' is not a package in Debian trixie")
    assert lines[1].startswith(f"{path}:5: packages: 'tre'") and "did you mean `tree`?" in lines[1]


def test_kernel_command_line_overrides_are_validated_like_files():
    for arg, key in (("macula.maculaos.hostname=$(reboot)", "maculaos.hostname"),
                     ("macula.upgrade.channel=../../x", "upgrade.channel")):
        with pytest.raises(nodeconfig.ConfigError) as info:
            nodeconfig.resolve([], f"quiet {arg}")
        assert [(p.where, p.key) for p in info.value.problems] == [("/proc/cmdline", key)]
    assert nodeconfig.resolve([], "macula.maculaos.hostname=edge-1")["maculaos"]["hostname"] == "edge-1"


def _apply_config_module():
    from maculaos_device import applyconfig

    return applyconfig


def test_the_config_firewall_replaces_the_boot_table_in_one_transaction_and_covers_forwarding():
    rules = _apply_config_module().firewall(["443/tcp", "5353/udp"]).splitlines()
    # one file, loaded by one `nft -f`: create-if-missing, delete, recreate; a failure keeps the boot table
    assert rules[:3] == ["table inet maculaos", "delete table inet maculaos", "table inet maculaos {"]
    assert "    tcp dport { 22, 443 } accept" in rules and "    udp dport { 5353 } accept" in rules
    forward = rules[rules.index("  chain forward {"):]
    assert forward[1] == "    type filter hook forward priority 0; policy drop;"
    assert "    ct status dnat meta l4proto tcp ct original proto-dst { 22, 443 } accept" in forward
    from maculaos_sdk.paths import sdk_root

    boot = (sdk_root() / "overlay/usr/share/maculaos/firewall-boot.nft").read_text()
    assert "policy drop;" in boot and "dport 22" not in boot and "chain forward" in boot


def test_wifi_config_is_validated_and_written_without_the_passphrase(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('wifi:\n  ssid: lab\n  psk: \'short"\'\n  country: de\n')
    problems = nodeconfig.validate_files([bad])
    assert {p.key for p in problems} == {"wifi.psk", "wifi.country"}
    missing = tmp_path / "missing.yaml"
    missing.write_text("wifi:\n  ssid: lab\n")
    assert [p.message for p in nodeconfig.validate_files([missing])] == ["network 'lab' needs a passphrase"]
    # the IEEE 802.11i test vector: passphrase "password", SSID "IEEE"
    conf = nodeconfig.wpa_supplicant_conf({"ssid": "IEEE", "psk": "password", "key_mgmt": "WPA-PSK",
                                           "country": "DE", "interface": "wlan0"})
    assert "    psk=f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e" in conf.splitlines()
    assert "    ssid=49454545" in conf.splitlines() and "password" not in conf and "country=DE" in conf
    config = nodeconfig.merge(nodeconfig.defaults(), {"wifi": {"ssid": "IEEE", "psk": "password"}})
    assert nodeconfig.plan(config, {})["wifi"] == {"ssid": "IEEE", "key_mgmt": "WPA-PSK", "country": "",
                                                   "interface": "wlan0"}


def test_wireless_boards_get_wpa_supplicant(tmp_path):
    from maculaos_sdk.boards import BOARDS

    assert BOARDS["nuc"].packages == ("wpasupplicant",) and BOARDS["rpi4"].packages == ("wpasupplicant",)
    assert BOARDS["generic"].packages == ()


def test_an_empty_string_where_the_default_is_empty_means_unset(tmp_path):
    """wifi.country: "" is the driver's default, as the reference says; a wrong value is still refused."""
    from maculaos_device import nodeconfig

    empty = tmp_path / "empty.yaml"
    empty.write_text('wifi:\n  country: ""\n  ssid: ""\nupgrade:\n  url: ""\n')
    assert nodeconfig.validate_files([empty]) == []
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text('wifi:\n  country: "de"\n')
    assert [p.key for p in nodeconfig.validate_files([wrong])] == ["wifi.country"]
