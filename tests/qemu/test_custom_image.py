"""A custom image built from one YAML file (spec 4.14.3: base, packages, images, overlay, firstboot, config)
and an on-device config.yaml, checked on the booted A/B disk: each part took effect, the first-boot
script ran exactly once across boots, and a bad config.yaml is reported while the node keeps the last
good one."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker
import pytest

from maculaos_sdk.build import BuildOptions, build_image
from maculaos_sdk.machine import cow_disk, free_port
from maculaos_sdk.node_machine import accepted_ports
from maculaos_sdk.profile import load_profile

from .conftest import OUT, once_per_run

pytestmark = pytest.mark.qemu

PROFILE = Path(__file__).parent / "profiles" / "maculaos-custom.yaml"


def _hello_image_tarball(dest: Path) -> str:
    """A tiny real container image, built by the engine and `docker save`d to `dest`; returns its id."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in {"Dockerfile": b"FROM scratch\nCOPY hello /hello\n", "hello": b"hello from k3s\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client = docker.from_env()
    image, _ = client.images.build(fileobj=context, custom_context=True, tag="maculaos-test/hello:1", rm=True)
    with dest.open("wb") as f:
        for chunk in image.save(named="maculaos-test/hello:1"):
            f.write(chunk)
    return image.id


@pytest.fixture(scope="module")
def custom_build(tmp_path_factory) -> tuple[dict[str, Path], str]:
    folder = tmp_path_factory.mktemp("custom")
    shutil.copy(PROFILE, folder / PROFILE.name)

    def build() -> dict[str, object]:
        image_id = _hello_image_tarball(folder / "hello.tar")
        profile = load_profile(str(folder / PROFILE.name))
        return {"image_id": image_id, **build_image(profile, BuildOptions(output=OUT / "custom")).artifacts}

    made = once_per_run(tmp_path_factory, "custom-amd64", build)  # type: ignore[arg-type]
    image_id = str(made.pop("image_id"))
    return made, image_id


WIFI_PSK = "correct-horse-battery"
HOSTAPD = ("interface=wlan1\ndriver=nl80211\nssid=maculaos-lab\nhw_mode=g\nchannel=6\ncountry_code=DE\nwpa=2\n"
           f"wpa_key_mgmt=WPA-PSK\nrsn_pairwise=CCMP\nwpa_passphrase={WIFI_PSK}\n")


def ssh_when_up(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ssh, retrying while the guest's sshd is not listening yet (QEMU's forward then resets the
    connection); any other failure, such as a refused key, is returned at once."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        # QEMU's forward accepts and then closes when nothing listens in the guest yet: ssh calls that a
        # reset, a refusal, or (seen once sshd started later, after maculaos-config) kex_exchange_identification
        not_up = any(s in out.stderr for s in ("Connection reset", "Connection refused", "kex_exchange_identification"))
        if out.returncode == 0 or not not_up or time.monotonic() > deadline:
            return out
        time.sleep(2)


def test_custom_image_and_node_config_take_effect(custom_build, make_machine, tmp_path):
    artifacts, image_id = custom_build
    assert {"maculaos-custom-1.2.0-amd64.iso", "maculaos-custom-1.2.0-amd64.qcow2"} <= set(artifacts)
    manifest = json.loads((OUT / "custom" / "maculaos-custom-1.2.0-amd64.manifest.json").read_text())
    assert manifest["version"] == "1.2.0" and "tree" in manifest["packages"]
    assert [(i["file"], i["ids"]) for i in manifest["images"]] == [("hello.tar", [image_id])]

    port = free_port()
    m = make_machine(cow_disk(artifacts["maculaos-custom-1.2.0-amd64.qcow2"], tmp_path / "custom-amd64.qcow2"),
                     "custom", ssh_port=port)
    m.start()
    assert m.wait_for_boot() == "A"
    # the image: extra package, overlay file, preloaded image, version, default config from the profile
    m.succeed("command -v tree")
    assert m.succeed("cat /etc/myapp/config.yaml") == "setting: value\n"
    m.succeed("test -s /var/lib/rancher/k3s/agent/images/hello.tar")
    assert 'VERSION_ID="1.2.0"' in m.succeed("cat /etc/os-release")
    # the NIC's driver loads from udev's events, in the default runlevel beside the consoles and the test channel
    mac = m.wait_until_succeeds("cat /sys/class/net/eth0/address", timeout=60).strip().replace(":", "")
    m.wait_until_succeeds("test -e /run/maculaos/config.applied", timeout=90)
    assert m.succeed("hostname").strip() == f"custom-{mac[-4:]}"
    assert m.succeed("cat /var/lib/maculaos/setup-runs") == "setup ran\n"

    # the node's own config.yaml: hostname, SSH key, a mesh role; checked with the device's validator first
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    # Wi-Fi: two simulated radios; hostapd (started by run_cmd) serves a WPA2 network on wlan1, the node
    # joins it on wlan0 from the config alone
    m.succeed(f"cat > /var/lib/maculaos/lab-ap.conf <<'EOF'\n{HOSTAPD}EOF\n")
    config = (f"maculaos:\n  hostname: edge-${{ARCH}}-1\n  dns_nameservers: [10.0.2.3, 192.0.2.53]\n"
              f"  modules: [mac80211_hwsim]\n"
              f"  mesh:\n    roles:\n      gateway: true\nssh_authorized_keys:\n  - {pub}\n"
              f"wifi:\n  ssid: maculaos-lab\n  psk: {WIFI_PSK}\n  country: DE\n"
              f"run_cmd:\n  - hostapd -B /var/lib/maculaos/lab-ap.conf\n"
              f"k3s:\n  args: [server, --token=s3cret-join-token]\n")
    m.succeed(f"cat > /var/lib/maculaos/config.yaml <<'EOF'\n{config}EOF\n"
              "maculaos config validate /var/lib/maculaos/config.yaml && sync")
    assert m.reboot() == "A"
    m.wait_until_succeeds("test -e /run/maculaos/config.applied", timeout=90)
    assert m.succeed("hostname").strip() == "edge-amd64-1"
    # what holds keys, k3s arguments and run_cmd is root's alone, and the join token is in no process's argv
    private = ("/var/lib/maculaos/config.last-good.json", "/etc/default/k3s", "/run/maculaos/config.applied",
               "/var/log/maculaos-config.log", "/run/maculaos/k3s-token")
    assert m.succeed(f"stat -c '%a %U' {' '.join(private)}").splitlines() == ["600 root"] * len(private)
    assert m.succeed("cat /run/maculaos/k3s-token") == "s3cret-join-token\n"
    assert m.succeed(". /etc/default/k3s && echo $K3S_ARGS") == "server --token-file=/run/maculaos/k3s-token\n"
    mesh = json.loads(m.succeed("cat /run/maculaos/mesh.json"))
    assert mesh["roles"] == ["peer", "gateway"] and mesh["ports"] == ["443/tcp", "80/tcp"]
    ruleset = json.loads(m.succeed("nft -j list table inet maculaos"))
    assert accepted_ports(ruleset) == {"policy": "drop", "tcp": {22, 80, 443}, "udp": {68}}
    assert accepted_ports(ruleset, "forward")["policy"] == "drop"  # NodePort/hostPort only to opened ports
    assert m.succeed("cat /var/lib/maculaos/setup-runs") == "setup ran\n"  # first boot ran once, not twice
    m.wait_until_succeeds("wpa_cli -i wlan0 status | grep -qx wpa_state=COMPLETED", timeout=90)
    wifi = dict(line.split("=", 1) for line in m.succeed("wpa_cli -i wlan0 status").splitlines() if "=" in line)
    assert (wifi["ssid"], wifi["key_mgmt"]) == ("maculaos-lab", "WPA2-PSK")
    assert m.succeed("stat -c '%a' /run/maculaos/wpa_supplicant.conf") == "600\n"
    # what /run holds has the derived key only, never the passphrase
    m.fail(f"grep -q '{WIFI_PSK}' /run/maculaos/wpa_supplicant.conf /run/maculaos/config.applied")
    ssh = ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
           "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "root@127.0.0.1",
           "hostname"]
    out = ssh_when_up(ssh)
    assert out.returncode == 0 and out.stdout.strip() == "edge-amd64-1", out.stderr
    # DNS servers from the config, and they outlast a DHCP lease (udhcpc runs its lease script as it
    # does at every renewal; before the fix it rewrote resolv.conf with slirp's server alone)
    dns = "nameserver 10.0.2.3\nnameserver 192.0.2.53\n"
    assert m.succeed("cat /etc/resolv.conf") == dns
    m.succeed("udhcpc -i eth0 -n -q -s /etc/udhcpc/default.script >/dev/null 2>&1", timeout=60)
    m.wait_for_network(timeout=30)
    assert m.succeed("cat /etc/resolv.conf") == dns
    _diagnostics(m)

    # a bad config: refused by the validator, reported at boot, and the node keeps its last good config
    m.succeed("printf 'maculaos:\\n  hostnme: typo\\n' > /var/lib/maculaos/config.d.yaml")
    bad = m.fail("mkdir -p /var/lib/maculaos/config.d && mv /var/lib/maculaos/config.d.yaml "
                 "/var/lib/maculaos/config.d/50-bad.yaml && sync && "
                 "maculaos config validate /var/lib/maculaos/config.d/50-bad.yaml")
    assert "50-bad.yaml:2: maculaos.hostnme: unknown key" in bad and "did you mean `maculaos.hostname`" in bad
    assert m.reboot() == "A"
    m.wait_for_console_text(r"maculaos-config: invalid config: .*50-bad\.yaml:2: maculaos\.hostnme", timeout=60)
    m.wait_until_succeeds("test -e /run/maculaos/config.applied", timeout=90)
    assert m.succeed("hostname").strip() == "edge-amd64-1"
    assert json.loads(m.succeed("cat /run/maculaos/mesh.json"))["roles"] == ["peer", "gateway"]
    assert m.succeed("cat /var/lib/maculaos/setup-runs") == "setup ran\n"
    out = ssh_when_up(ssh)
    assert out.returncode == 0, out.stderr


def _diagnostics(m) -> None:
    """`maculaos diag`: a line per check on this configured node, a support bundle without the config's secrets,
    and a broken DNS server reported as a failure with a hint (issue 24, part 6)."""
    checks = {(c["area"], c["name"]): c for c in json.loads(m.succeed("maculaos diag --json --full 2>/run/diag.err",
                                                                      timeout=180))}
    assert {k: c["status"] for k, c in checks.items() if k != ("storage", "free space")} == {
        ("storage", "data partition"): "pass", ("network", "default route"): "pass", ("network", "DNS servers"): "pass",
        ("update", "slots"): "pass", ("update", "fallback slot"): "warn", ("update", "update server"): "warn",
        ("mesh", "roles"): "pass", ("mesh", "firewall"): "pass"}
    assert checks["storage", "free space"]["status"] != "fail"
    assert checks["mesh", "roles"]["detail"] == "peer, gateway in realm io.macula"
    assert checks["network", "DNS servers"]["detail"] == "10.0.2.3, 192.0.2.53"
    bundle = m.succeed("cat /run/diag.err").strip().removeprefix("support bundle: ")
    assert m.succeed(f"stat -c %a {bundle}").strip() == "600"
    data = base64.b64decode(m.succeed(f"base64 -w0 {bundle}", timeout=60))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {i.name.split("/", 1)[1]: tar.extractfile(i).read() for i in tar.getmembers()}
    assert {"diag.json", "status.json", "config.json", "dmesg.txt", "log.txt", "nft.json", "config.log"} <= files.keys()
    assert json.loads(files["status.json"])["booted"] == "A" and b"Linux version" in files["dmesg.txt"]
    for secret in (WIFI_PSK, "s3cret-join-token"):
        assert not any(secret.encode() in data for data in files.values()), secret
    # a DNS server that answers nothing, and a name the node needs (its update server's)
    m.succeed("cp /etc/resolv.conf /run/resolv.keep && echo 'nameserver 192.0.2.1' > /etc/resolv.conf && "
              "mkdir -p /var/lib/maculaos/config.d && printf 'upgrade:\\n  url: https://updates.maculaos.example\\n' "
              "> /var/lib/maculaos/config.d/40-diag.yaml")
    rc, out = m.execute("maculaos diag network --json", timeout=120)
    m.succeed("cp /run/resolv.keep /etc/resolv.conf && rm /var/lib/maculaos/config.d/40-diag.yaml")
    resolution = {c["name"]: c for c in json.loads(out)}["name resolution"]
    assert rc == 1 and resolution["status"] == "fail" and "192.0.2.1" in resolution["detail"]
    assert "maculaos.dns_nameservers" in resolution["hint"]
