"""`maculaos config apply`: apply the node's config.yaml at boot (the maculaos-config service), then run first-boot
scripts once.

A config that does not validate is reported on the console and in the log (paths.CONFIG_LOG), and the last
config that did validate is applied instead (paths.LAST_GOOD_CONFIG), so a typo never takes a node off the
network."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

from . import nodeconfig, paths

STATE = Path(paths.STATE)
LAST_GOOD = Path(paths.LAST_GOOD_CONFIG)
FIRSTBOOT_LIST = Path(paths.FIRSTBOOT_LIST)
FIRSTBOOT_DONE = Path(paths.FIRSTBOOT_DONE)
LOG = Path(paths.CONFIG_LOG)


def say(msg: str) -> None:
    line = f"maculaos-config: {msg}"
    print(line, flush=True)
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # it may name k3s args or run_cmd lines
    os.fchmod(fd, 0o600)  # a log left by an older image was 0644
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def run(cmd: list[str] | str, **kw) -> int:
    return subprocess.run(cmd, shell=isinstance(cmd, str), stdin=subprocess.DEVNULL, **kw).returncode


def facts() -> dict[str, str]:
    mac = ""
    for nic in sorted(Path("/sys/class/net").iterdir()):
        if nic.name != "lo" and (nic / "address").exists():
            mac = (nic / "address").read_text().strip()
            break
    suffix = mac.replace(":", "")[-4:] or "0000"
    arch = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("MACULAOS_ARCH="):
            arch = line.split("=", 1)[1].strip('"')
    return {"MAC_SUFFIX": suffix, "RANDOM_SUFFIX": suffix, "ARCH": arch}


def resolved_config() -> dict:
    cmdline = Path("/proc/cmdline").read_text()
    try:
        config = nodeconfig.resolve(nodeconfig.sources(), cmdline)
    except nodeconfig.ConfigError as exc:
        for problem in exc.problems:
            say(f"invalid config: {problem}")
        if LAST_GOOD.is_file():
            say(f"keeping the last good config ({LAST_GOOD})")
            # over today's defaults: a config saved by an older release lacks the keys added since
            return nodeconfig.merge(nodeconfig.defaults(), json.loads(LAST_GOOD.read_text()))
        say("no earlier good config: using the defaults")
        overrides = nodeconfig.cmdline_overrides(cmdline)
        if nodeconfig.check(overrides, "/proc/cmdline"):
            overrides = {}  # the problem may be on the command line itself
        return nodeconfig.merge(nodeconfig.defaults(), overrides)
    if STATE.is_dir() and os.path.ismount(STATE):
        write(LAST_GOOD, json.dumps(config, sort_keys=True), 0o600)  # it holds the node's keys and k3s args
    return config


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, mode)  # a leftover tmp file keeps its old mode through os.open
        f.write(text)
    os.replace(tmp, path)


# Interfaces of k3s's flannel CNI: pods reach out, and other nodes' pods reach ours.
CNI_INTERFACES = ("cni0", "flannel.1")


def firewall(ports: list[str]) -> str:
    """The nftables ruleset, as one transaction that replaces the boot-time table (firewall-boot.nft):
    inbound closed but for replies, SSH and the opened ports; forwarded traffic closed but for replies,
    the pods' own traffic and what was DNATed (NodePort, hostPort) to an opened port."""
    tcp = sorted({int(p.split("/")[0]) for p in ports if p.endswith("/tcp")} | {22})
    udp = sorted({int(p.split("/")[0]) for p in ports if p.endswith("/udp")})
    accept = [("tcp", tcp)] + ([("udp", udp)] if udp else [])
    cni = ", ".join(f'"{name}"' for name in CNI_INTERFACES)
    rules = [
        "table inet maculaos",  # so that the delete below never fails: the whole file is one transaction
        "delete table inet maculaos",
        "table inet maculaos {",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        "    ct state established,related accept",
        "    iif lo accept",
        "    meta l4proto { 1, 58 } accept",  # icmp, ipv6-icmp (numbers: no /etc/protocols needed)
        "    udp dport 68 accept",
        *(f"    {proto} dport {{ {', '.join(map(str, nums))} }} accept" for proto, nums in accept),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority 0; policy drop;",
        "    ct state established,related accept",
        f"    iifname {{ {cni} }} accept",
        *(f"    ct status dnat meta l4proto {proto} ct original proto-dst {{ {', '.join(map(str, nums))} }} accept"
          for proto, nums in accept),
        "  }",
        "}",
    ]
    return "\n".join(rules) + "\n"


def apply(plan: dict) -> None:
    host = plan["hostname"]
    write(Path("/etc/hostname"), host + "\n")
    run(["hostname", host])
    hosts = [line for line in Path("/etc/hosts").read_text().splitlines() if not line.startswith("127.0.1.1")]
    write(Path("/etc/hosts"), "\n".join([*hosts, f"127.0.1.1\t{host}"]) + "\n")
    static_dns = Path(paths.DNS_STATIC)  # tells udhcpc's lease script to keep resolv.conf
    if plan["dns_nameservers"]:
        static_dns.parent.mkdir(parents=True, exist_ok=True)
        static_dns.touch()
        write(Path("/etc/resolv.conf"), "".join(f"nameserver {d}\n" for d in plan["dns_nameservers"]))
    else:
        static_dns.unlink(missing_ok=True)
    for module in plan["modules"]:
        if run(["modprobe", module], stderr=subprocess.DEVNULL) != 0:
            say(f"cannot load kernel module {module}")
    keys = "".join(k.strip() + "\n" for k in plan["ssh_authorized_keys"])
    write(Path("/root/.ssh/authorized_keys"), keys, 0o600)
    Path("/root/.ssh").chmod(0o700)
    if os.path.ismount(STATE):
        write(Path(paths.RECOVERY_KEYS), keys, 0o600)  # recovery's sshd reads these
    if Path("/usr/sbin/sshd").exists() and not Path("/etc/ssh/ssh_host_ed25519_key").exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key"])
    labels = [f"{k}={v}" for k, v in plan["labels"].items()]
    write(Path("/etc/rancher/k3s/config.yaml"), json.dumps({"node-label": labels}, indent=2) + "\n")
    k3s_args, token = nodeconfig.k3s_argv(plan["k3s_args"])
    if token:  # k3s reads it from a file: in its argv any local user would see it
        write(Path(nodeconfig.K3S_TOKEN_FILE), token + "\n", 0o600)
    write(Path("/etc/default/k3s"), "K3S_ARGS='" + " ".join(a.replace("'", "") for a in k3s_args) + "'\n", 0o600)
    mesh = plan["mesh"]
    write(Path(paths.MESH_STATE), json.dumps(mesh, sort_keys=True) + "\n")
    ruleset = firewall(plan["open_ports"])
    write(Path(paths.FIREWALL_RULES), ruleset)
    if Path("/usr/sbin/nft").exists() and run(["nft", "-f", str(paths.FIREWALL_RULES)]) != 0:
        say("cannot load the firewall rules: the boot-time firewall stays (inbound closed but for replies)")
    for service in mesh["services"]:
        if Path(f"/etc/init.d/{service}").exists():
            run(["rc-service", service, "start"])
        else:
            say(f"mesh role service {service} is not installed in this image")
    say(f"applied: hostname {host}, roles {'+'.join(mesh['roles'])}, open {', '.join(mesh['ports']) or 'ssh only'}")


WPA_CONF = Path(paths.WPA_CONF)


def wifi(settings: dict) -> None:
    """Join the configured Wi-Fi network (wpa_supplicant in the background, then DHCP on it)."""
    if not settings["ssid"]:
        return
    iface = settings["interface"]
    if not Path("/sbin/wpa_supplicant").exists():
        say(f"wifi: {settings['ssid']!r} configured, but this image has no wpa_supplicant")
        return
    if not Path(f"/sys/class/net/{iface}").exists():
        say(f"wifi: no interface {iface} (this board's wireless driver is not loaded or pruned)")
        return
    if run(["nft", "list", "table", "inet", "maculaos"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        say(f"wifi: no firewall table loaded: {iface} stays down (fail closed)")
        return
    write(WPA_CONF, nodeconfig.wpa_supplicant_conf(settings), 0o600)  # holds the derived key
    pidfile = Path(f"/run/wpa_supplicant.{iface}.pid")
    _stop(pidfile)
    if run(["wpa_supplicant", "-B", "-i", iface, "-c", str(WPA_CONF), "-P", str(pidfile)]) != 0:
        say(f"wifi: wpa_supplicant did not start on {iface}")
        return
    run(["udhcpc", "-i", iface, "-b", "-s", "/etc/udhcpc/default.script"], stdout=subprocess.DEVNULL)
    say(f"wifi: joining {settings['ssid']!r} on {iface}")


def _stop(pidfile: Path) -> None:
    """Stop the process a pid file names (there is no kill program in the image: procps ships none in trixie)."""
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def firstboot() -> None:
    """Run each first-boot command once per node (recorded on the data partition when it succeeds)."""
    if not FIRSTBOOT_LIST.is_file():
        return
    done = set(FIRSTBOOT_DONE.read_text().split()) if FIRSTBOOT_DONE.is_file() else set()
    for command in filter(None, (c.strip() for c in FIRSTBOOT_LIST.read_text().splitlines())):
        key = hashlib.sha256(command.encode()).hexdigest()[:16]
        if key in done:
            continue
        say(f"first boot: running {command}")
        rc = run(command)
        if rc != 0:
            say(f"first boot: {command} failed ({rc}); it runs again at the next boot")
            continue
        with FIRSTBOOT_DONE.open("a") as f:
            f.write(key + "\n")


def main() -> int:
    config = resolved_config()
    plan = nodeconfig.plan(config, facts())
    apply(plan)
    wifi(config["wifi"])
    firstboot()
    for command in plan["run_cmd"]:
        rc = run(command)
        if rc != 0:
            say(f"run_cmd: {command} failed ({rc})")
    # done, for this boot; root's alone: it holds the k3s args and run_cmd
    write(Path(paths.CONFIG_APPLIED), json.dumps(plan, sort_keys=True) + "\n", 0o600)
    return 0
