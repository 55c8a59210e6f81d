"""MaculaOS node configuration (`config.yaml`): one schema for the host and the device.

The same module is `maculaos_device.nodeconfig` on the host (`maculaos-sdk config validate`) and on the
device (`/usr/lib/maculaos/maculaos_device/`, `maculaos config validate|show|apply`), so both check a
config the same way. It needs only the standard library and PyYAML.

Sources, merged in this order (later wins; maps merge, lists replace):
  1. /usr/share/maculaos/config.yaml        the profile's default (`config:` in the profile)
  2. /var/lib/maculaos/config.yaml          the node's own config (installer `--config`, or edited)
  3. /var/lib/maculaos/config.d/*.yaml      drop-ins, in name order
  4. macula.<key.path>=<value> on the kernel command line (e.g. macula.maculaos.hostname=edge-1)
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from . import encryption, paths, yamlinput
from .schema import BOOL, LIST, STR, STR_MAP, Field, Problem, Schema, get_key, key_lines, reference_row, set_key

MAP = STR_MAP  # label values: strings, numbers or booleans

# URLs as the references call them: a host name or [IPv6], a port, a path; no user:password@, no query
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}\.)*{_LABEL}|\[[0-9A-Fa-f:.]+\]"
_URL_REST = rf"(?:{_HOST})(?::[0-9]{{1,5}})?(?:/[A-Za-z0-9._~%!$&'()*+,;=:@-]*)*"
HTTPS_URL = rf"(?=.{{1,2048}}$)https://{_URL_REST}"
UPDATE_SOURCE = rf"|(?=.{{1,2048}}$)(?:https?://{_URL_REST}|(?:/[A-Za-z0-9._~+-]+)+/?)"  # empty, a URL, a folder


FIELDS: tuple[Field, ...] = (
    Field("maculaos.hostname", STR, "macula-${MAC_SUFFIX}",
          "Hostname. `${MAC_SUFFIX}` (alias `${RANDOM_SUFFIX}`) is the last 4 hex digits of the first network "
          "card's MAC address, `${ARCH}` the architecture.", pattern=r"^[A-Za-z0-9${}_-]{1,63}$"),
    Field("maculaos.dns_nameservers", LIST, [], "DNS servers for /etc/resolv.conf (empty: whatever DHCP gives)."),
    Field("maculaos.labels", MAP, {}, "k3s node labels; values may use `${ARCH}`."),
    Field("maculaos.modules", LIST, [], "Kernel modules loaded at boot."),
    Field("maculaos.mesh.roles.bootstrap", BOOL, False,
          "DHT bootstrap registry: starts macula-bootstrap, opens 443/tcp."),
    Field("maculaos.mesh.roles.gateway", BOOL, False, "NAT relay / API ingress: starts macula-gateway, opens 443/tcp "
          "and 80/tcp."),
    Field("maculaos.mesh.bootstrap_peers", LIST, [], "Bootstrap peers to join (`https://host[:port]` URLs).",
          pattern=HTTPS_URL),
    Field("maculaos.mesh.realm", STR, "io.macula", "Realm, in reverse domain notation.",
          pattern=r"^[a-z0-9-]+(\.[a-z0-9-]+)+$"),
    Field("maculaos.mesh.tls_mode", STR, "development", "TLS mode.", choices=("development", "production")),
    Field("k3s.args", LIST, ["server", "--disable=traefik", "--disable=servicelb", "--write-kubeconfig-mode=600",
                             "--data-dir=/var/lib/rancher/k3s"], "k3s command line. A join token belongs in "
          "`--token-file=` (a file on the data partition): the service moves `--token=` out of the process list "
          f"into {paths.K3S_TOKEN} (0600).", secret=True),
    Field("k3s.airgap", BOOL, True, f"Import the preloaded images from {paths.K3S_IMAGES}."),
    Field("network.dhcp", BOOL, True, "Configure eth0 by DHCP."),
    Field("firewall.open_ports", LIST, [], "More inbound ports to open, each `<port>/tcp` or `<port>/udp` (e.g. "
          "`6443/tcp` for the k3s API); SSH and the mesh roles' ports are open anyway.",
          pattern=r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})/(tcp|udp)"),
    Field("ssh_authorized_keys", LIST, [], "Public keys allowed to log in as root (also used by recovery's sshd)."),
    Field("run_cmd", LIST, [], "Shell commands run at every boot, after the config is applied."),
    Field("wifi.ssid", STR, "", "Wi-Fi network to join at boot (boards that keep wireless drivers: nuc, rpi4, rpi5; "
          "and any image with wpasupplicant and a wireless interface). Empty: no Wi-Fi.", pattern=r"[\x20-\x7e]{1,32}"),
    Field("wifi.psk", STR, "", "WPA passphrase (8-63 printable characters, no quotes or backslashes) or the 64 hex "
          "digits of the key. Stored on the node only as the derived key (WPA-PSK).",
          pattern=r"[\x20\x21\x23-\x5b\x5d-\x7e]{8,63}|[0-9A-Fa-f]{64}", secret=True),
    Field("wifi.key_mgmt", STR, "WPA-PSK", "Wi-Fi security.", choices=("WPA-PSK", "SAE", "NONE")),
    Field("wifi.country", STR, "", "Regulatory domain, ISO 3166 code (e.g. DE); empty: the driver's default.",
          pattern=r"[A-Z]{2}"),
    Field("wifi.interface", STR, "wlan0", "The wireless interface.", pattern=r"[a-z][a-z0-9]{0,14}"),
    Field("upgrade.url", STR, "", "Update server (`maculaos-sdk publish` layout) for `maculaos upgrade --check`: an "
          "`https://` URL (`http://` with upgrade.allow_http) or a local folder.", pattern=UPDATE_SOURCE),
    Field("upgrade.channel", STR, "stable", "Update channel on that server.", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]*"),
    Field("upgrade.allow_http", BOOL, False, "Accept plain `http://` update servers (a lab network only: anyone on "
          "the path could hold updates back). Off: only https and local folders."),
    *encryption.FIELDS,
)
SCHEMA = Schema(FIELDS, reference_hint="see the config reference (docs/config-reference.md)")
FIELDS_BY_KEY = SCHEMA.by_key

# What each mesh role turns on (spec 4.4). Peer is always on.
ROLES: dict[str, dict[str, list[str]]] = {
    "peer": {"services": ["macula-mesh"], "ports": []},
    "bootstrap": {"services": ["macula-bootstrap"], "ports": ["443/tcp"]},
    "gateway": {"services": ["macula-gateway"], "ports": ["443/tcp", "80/tcp"]},
}


class ConfigError(Exception):
    """Every problem found in one config, each as `file:line: key: problem (hint: ...)`."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def check(data: Any, where: str, lines: dict[str, int] | None = None, prefix: str = "") -> list[Problem]:
    """Every problem in one config mapping (empty list: valid). `prefix` names where the config sits
    inside a bigger file (a profile's `config:`), for key paths and line numbers."""
    lines = lines or {}
    if data is not None and not isinstance(data, dict):
        return [Problem(where, lines.get(prefix.rstrip("."), 1), prefix.rstrip(".") or "config",
                        "a config must be a YAML mapping", "start with `maculaos:`")]
    problems = SCHEMA.check(data, where, lines, prefix, rule=_ssh_keys)
    wifi: dict[str, Any] = data["wifi"] if isinstance(data, dict) and isinstance(data.get("wifi"), dict) else {}
    if wifi.get("ssid") and wifi.get("key_mgmt", "WPA-PSK") != "NONE" and not wifi.get("psk") and not problems:
        problems.append(Problem(where, lines.get(prefix + "wifi.ssid", 1), prefix + "wifi.psk",
                                f"network {wifi['ssid']!r} needs a passphrase", "set wifi.psk (or key_mgmt: NONE)"))
    return problems


def _ssh_keys(spec: Field, value: Any, add: Any) -> None:
    if spec.key == "ssh_authorized_keys":
        for i, entry in enumerate(value):
            if not re.match(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-\S+|sk-\S+) [A-Za-z0-9+/=]+", entry):
                add("not an SSH public key", "paste a whole line of id_ed25519.pub", key=f"{spec.key}[{i}]")


def load_file(path: Path) -> dict[str, Any]:
    """Read and check one config file; raises ConfigError listing every problem."""
    try:
        data, node = yamlinput.read(yamlinput.read_text(path))
    except OSError as exc:
        raise ConfigError([Problem(str(path), 1, "config", f"cannot read: {exc.strerror}", "check the path")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), 1, "config", "not UTF-8 text", "save it as UTF-8")]) from None
    except yamlinput.Refused as exc:
        raise ConfigError([Problem(str(path), exc.line, exc.key or "config", exc.message, exc.hint)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem(str(path), mark.line + 1 if mark else 1, "config", f"invalid YAML: {problem}",
                                   "fix the YAML syntax")]) from None
    problems = check(data, str(path), key_lines(node))
    if problems:
        raise ConfigError(problems)
    return data or {}


def validate_files(paths: list[Path]) -> list[Problem]:
    """Every problem in every file (empty list: all valid)."""
    problems: list[Problem] = []
    for path in paths:
        try:
            load_file(path)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def defaults() -> dict[str, Any]:
    return SCHEMA.defaults()


def merge(base: Any, over: Any) -> Any:
    """Maps merge deeply; anything else (lists included) is replaced; null resets to the default."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out.get(k), v) if v is not None else base.get(k)
        return out
    return over


def cmdline_overrides(cmdline: str) -> dict[str, Any]:
    """`macula.<key>=<value>` arguments for config keys (lists are comma separated)."""
    out: dict[str, Any] = {}
    for arg in cmdline.split():
        m = re.match(r"^macula\.([a-z_.]+)=(.*)$", arg)
        if not m or m.group(1) not in FIELDS_BY_KEY:
            continue
        spec, raw = FIELDS_BY_KEY[m.group(1)], m.group(2)
        value: Any = raw
        if spec.kind == BOOL:
            value = raw.lower() in ("1", "true", "yes", "on")
        elif spec.kind == LIST:
            value = [v for v in raw.split(",") if v]
        elif spec.kind == MAP:
            continue
        set_key(out, spec.key, value)
    return out


def sources(root: Path = Path("/")) -> list[Path]:
    """The config files of a node, in merge order."""
    files = [Path(paths.under(root, paths.DEFAULT_CONFIG)), Path(paths.under(root, paths.NODE_CONFIG))]
    files += sorted(Path(paths.under(root, paths.CONFIG_DROPINS)).glob("*.yaml"))
    files.append(Path(paths.under(root, paths.VM_CONFIG)))  # a dev VM's host hands this over (maculaos-vmhost)
    return [f for f in files if f.is_file()]


def resolve(files: list[Path], cmdline: str = "") -> dict[str, Any]:
    """Defaults, then each file, then the command line; raises ConfigError with every problem of every file."""
    merged = defaults()
    problems: list[Problem] = []
    for f in files:
        try:
            merged = merge(merged, load_file(f))
        except ConfigError as exc:
            problems += exc.problems
    overrides = cmdline_overrides(cmdline)
    problems += check(overrides, "/proc/cmdline")  # same rules as a file: a boot entry is input too
    if problems:
        raise ConfigError(problems)
    return merge(merged, overrides)


def expand(value: str, facts: dict[str, str]) -> str:
    """Replace ${MAC_SUFFIX}, ${RANDOM_SUFFIX} and ${ARCH}."""
    for name, fact in facts.items():
        value = value.replace("${" + name + "}", fact)
    return value


def plan(config: dict[str, Any], facts: dict[str, str]) -> dict[str, Any]:
    """What applying a resolved config does, as data: the device applies exactly this."""
    mesh = config["maculaos"]["mesh"]
    roles = ["peer"] + [r for r in ("bootstrap", "gateway") if mesh["roles"][r]]
    return {
        "hostname": expand(config["maculaos"]["hostname"], facts),
        "dns_nameservers": config["maculaos"]["dns_nameservers"],
        "modules": config["maculaos"]["modules"],
        "labels": {k: expand(str(v), facts) for k, v in sorted(config["maculaos"]["labels"].items())},
        "ssh_authorized_keys": config["ssh_authorized_keys"],
        "run_cmd": config["run_cmd"],
        "k3s_args": config["k3s"]["args"],
        "mesh": {"roles": roles, "realm": mesh["realm"], "tls_mode": mesh["tls_mode"],
                 "bootstrap_peers": mesh["bootstrap_peers"],
                 "services": [s for r in roles for s in ROLES[r]["services"]],
                 "ports": sorted({p for r in roles for p in ROLES[r]["ports"]})},
        "open_ports": sorted({p for r in roles for p in ROLES[r]["ports"]} | set(config["firewall"]["open_ports"])),
        "upgrade": config["upgrade"],
        # what apply does for Wi-Fi; the passphrase stays out of the plan (it is written to /run 0644)
        "wifi": {k: config["wifi"][k] for k in ("ssid", "key_mgmt", "country", "interface")},
    }


K3S_TOKEN_FILE = str(paths.K3S_TOKEN)


def k3s_argv(args: list[str]) -> tuple[list[str], str | None]:
    """k3s's arguments with a join token (`--token=X`, `--token X`, `-t X`) taken out of them (any user can read
    a process's argv) and replaced by `--token-file=K3S_TOKEN_FILE`; the token, or None, to write there 0600."""
    argv: list[str] = []
    token = None
    items = iter(args)
    for arg in items:
        if arg in ("--token", "-t"):
            token = next(items, "")
        elif arg.startswith("--token="):
            token = arg.split("=", 1)[1]
        else:
            argv.append(arg)
    if token:
        argv.append(f"--token-file={K3S_TOKEN_FILE}")
    return argv, token or None


def wpa_supplicant_conf(wifi: dict[str, str]) -> str:
    """wpa_supplicant's config for the node's Wi-Fi: the SSID written as hex and a WPA passphrase as its
    derived key, so no value is ever parsed as config syntax and the passphrase is not stored."""
    import hashlib

    ssid = wifi["ssid"].encode()
    lines = ["ctrl_interface=/run/wpa_supplicant", "update_config=0"]
    if wifi.get("country"):
        lines.append(f"country={wifi['country']}")
    network = [f"ssid={ssid.hex()}", f"key_mgmt={wifi['key_mgmt']}", "scan_ssid=1"]
    psk = wifi.get("psk", "")
    if wifi["key_mgmt"] == "WPA-PSK":
        key = psk.lower() if len(psk) == 64 else hashlib.pbkdf2_hmac("sha1", psk.encode(), ssid, 4096, 32).hex()
        network.append(f"psk={key}")
    elif wifi["key_mgmt"] == "SAE":
        network += [f'sae_password="{psk}"', "ieee80211w=2"]
    return "\n".join([*lines, "network={", *(f"    {n}" for n in network), "}"]) + "\n"


def reference_markdown() -> str:
    """The config.yaml reference, generated from FIELDS so it cannot drift."""
    rows = ["| key | kind | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [reference_row(f, json.dumps(f.default)) for f in FIELDS]
    roles = ["| role | services | ports opened |", "| --- | --- | --- |"]
    for name, what in ROLES.items():
        roles.append(f"| {name} | {', '.join(what['services'])} | {', '.join(what['ports']) or 'outbound only'} |")
    return "\n".join(rows) + "\n\nMesh roles (`peer` is always on):\n\n" + "\n".join(roles) + "\n"


def main(argv: list[str]) -> int:
    """Device CLI: `validate FILE...` | `show` | `get KEY` | `plan` (JSON of what apply does). Exit 2 on a
    bad config."""
    if not argv or argv[0] not in ("validate", "show", "get", "plan"):
        print("usage: maculaos config validate FILE... | show | get KEY | plan", file=sys.stderr)
        return 2
    try:
        if argv[0] == "validate":
            if len(argv) < 2:
                print("usage: maculaos config validate FILE...", file=sys.stderr)
                return 2
            problems = validate_files([Path(f) for f in argv[1:]])
            if problems:
                raise ConfigError(problems)
            print(f"{', '.join(argv[1:])}: valid")
            return 0
        cmdline = Path("/proc/cmdline").read_text() if Path("/proc/cmdline").exists() else ""
        config = resolve(sources(Path(os.environ.get("MACULAOS_ROOT", "/"))), cmdline)
        if argv[0] == "show":
            print(yaml.safe_dump(config, sort_keys=True), end="")
        elif argv[0] == "get":
            if len(argv) != 2 or argv[1] not in FIELDS_BY_KEY:
                print(f"usage: maculaos config get KEY (one of {', '.join(FIELDS_BY_KEY)})", file=sys.stderr)
                return 2
            value = get_key(config, argv[1])
            print(value if isinstance(value, str) else json.dumps(value))
        else:
            facts = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
            print(json.dumps(plan(config, facts), sort_keys=True))
        return 0
    except ConfigError as exc:
        for p in exc.problems:
            print(f"maculaos config: {p}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
