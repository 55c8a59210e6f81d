"""`maculaos diag [AREA...] [--json] [--full]`: a pass/warn/fail line per check, with a hint for what is not
right; `--full` also writes a support bundle (tar.gz, 0600) with the node's state, logs and config, every secret
of the node config taken out (the config's secret fields redacted, and their values scrubbed from every file)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import nodeconfig, paths, updater
from .system import Device

AREAS = ("storage", "network", "update", "mesh")
FREE_FAIL, FREE_WARN = 0.05, 0.15  # the data partition's free fraction below which a check fails, warns
RESOLVE_SECONDS = 5
REDACTED = "<redacted>"


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    status: str  # pass | warn | fail
    detail: str
    hint: str = ""


@dataclass
class Host:
    """What the checks read besides the Device (a test points these into a folder)."""

    resolv_conf: Path = Path("/etc/resolv.conf")
    routes: Path = Path("/proc/net/route")


# --- the checks --------------------------------------------------------------------------------------------------
def storage(dev: Device, config: dict[str, Any], host: Host) -> list[Check]:
    if dev.mode() != "disk":
        return [Check("storage", "data partition", "warn", f"a {dev.mode()} system: nothing it writes persists",
                      "install it (maculaos install) to keep state")]
    if not dev.mounted(dev.state):
        return [Check("storage", "data partition", "fail", f"not mounted at {dev.state}: state is not kept",
                      "see the console's maculaos-init lines; `maculaos diag --full` collects them")]
    out = [Check("storage", "data partition", "pass", f"mounted at {dev.state}")]
    st = os.statvfs(dev.state)
    free = st.f_bavail / st.f_blocks if st.f_blocks else 0.0
    detail = f"{st.f_bavail * st.f_frsize >> 20} MiB free of {st.f_blocks * st.f_frsize >> 20} MiB ({free:.0%})"
    hint = "remove data under /var/lib/data or unused k3s images; updates and logs need room"
    status = "fail" if free < FREE_FAIL else "warn" if free < FREE_WARN else "pass"
    out.append(Check("storage", "free space", status, detail, hint if status != "pass" else ""))
    return out


def network(dev: Device, config: dict[str, Any], host: Host) -> list[Check]:
    out = []
    routes = [line.split() for line in _read(host.routes).splitlines()[1:]]
    default = [r[0] for r in routes if len(r) > 2 and r[1] == "00000000"]
    out.append(Check("network", "default route", "pass", f"via {default[0]}") if default else
               Check("network", "default route", "fail", "none: nothing beyond the local network is reachable",
                     "check the cable or Wi-Fi and DHCP (`ip addr`), or set a static network"))
    servers = [f[1] for f in (line.split() for line in _read(host.resolv_conf).splitlines())
               if len(f) > 1 and f[0] == "nameserver"]
    if not servers:
        out.append(Check("network", "DNS servers", "fail", f"none in {host.resolv_conf}",
                         "set maculaos.dns_nameservers in the node config, or check DHCP"))
        return out
    out.append(Check("network", "DNS servers", "pass", ", ".join(servers)))
    name = _a_name_to_resolve(config)
    if name:
        found = _resolve(name)
        out.append(Check("network", "name resolution", "pass", f"{name}: {found}") if found else
                   Check("network", "name resolution", "fail", f"{name} does not resolve with {', '.join(servers)}",
                         "check maculaos.dns_nameservers (or the DHCP server's DNS servers)"))
    return out


def update(dev: Device, config: dict[str, Any], host: Host) -> list[Check]:
    if dev.mode() != "disk":
        return [Check("update", "A/B slots", "pass", f"a {dev.mode()} system: no slots to update")]
    status, out = updater.status(dev), []
    booted, other = status["booted"], "B" if status["booted"] == "A" else "A"
    if status["trial"] and status["trial"] != booted:
        out.append(Check("update", "pending update", "warn", f"slot {status['trial']} waits for a reboot",
                         "reboot to try it, or `maculaos upgrade --rollback` to drop it"))
    elif status["trial"]:
        out.append(Check("update", "trial", "warn", f"slot {booted} is on trial, not confirmed yet",
                         "the confirm service commits it once healthy (`maculaos confirm`)"))
    else:
        out.append(Check("update", "slots", "pass", f"booted {booted}, committed"))
    if status["rolledback"]:
        out.append(Check("update", "rollback", "warn", f"slot {status['rolledback']} was rolled back from",
                         "apply a fixed update; `maculaos upgrade --status` shows the slots"))
    if status["slots"].get(other, {}).get("version") is None:
        out.append(Check("update", "fallback slot", "warn", f"slot {other} holds no verified system: nothing to "
                         "roll back to", "the next update fills it"))
    if not config["upgrade"]["url"]:
        out.append(Check("update", "update server", "warn", "none configured: updates come only by hand",
                         "set upgrade.url in the node config"))
    return out


def mesh(dev: Device, config: dict[str, Any], host: Host) -> list[Check]:
    roles = [r for r, on in config["maculaos"]["mesh"]["roles"].items() if on]
    out = [Check("mesh", "roles", "pass", f"{', '.join(['peer', *(r for r in roles if r != 'peer')])} in realm "
                 f"{config['maculaos']['mesh']['realm']}")]
    try:
        loaded = subprocess.run(["nft", "list", "table", "inet", "maculaos"], capture_output=True,
                                timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        loaded = False
    out.append(Check("mesh", "firewall", "pass", "the maculaos table is loaded") if loaded else
               Check("mesh", "firewall", "fail", "the maculaos table is not loaded: the network stays closed",
                     f"`maculaos config apply`; {paths.CONFIG_LOG} says what failed"))
    return out


CHECKS = {"storage": storage, "network": network, "update": update, "mesh": mesh}


def run_checks(dev: Device, config: dict[str, Any], areas: tuple[str, ...] = AREAS, host: Host | None = None
               ) -> list[Check]:
    host = host or Host()
    return [c for area in areas for c in CHECKS[area](dev, config, host)]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:1 << 20]
    except OSError:
        return ""


def _a_name_to_resolve(config: dict[str, Any]) -> str | None:
    """The host of the update server or the first bootstrap peer: a name the node needs to resolve."""
    for url in [config["upgrade"]["url"], *config["maculaos"]["mesh"]["bootstrap_peers"]]:
        if "://" in url:
            host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            if host and not host.replace(".", "").isdigit():
                return host
    return None


def _resolve(name: str) -> str | None:
    """An address of `name`, or None (within RESOLVE_SECONDS: getaddrinfo has no timeout, so on a thread)."""
    found: list[str] = []

    def look() -> None:
        try:
            found.append(str(socket.getaddrinfo(name, None)[0][4][0]))
        except OSError:
            pass

    worker = threading.Thread(target=look, daemon=True)
    worker.start()
    worker.join(RESOLVE_SECONDS)
    return found[0] if found else None


def report(checks: list[Check]) -> str:
    width = max((len(c.area) + len(c.name) for c in checks), default=0) + 3
    lines = []
    for c in checks:
        line = f"{c.status.upper():<4}  {f'{c.area}: {c.name}':<{width}} {c.detail}"
        lines.append(f"{line} (hint: {c.hint})" if c.hint else line)
    return "\n".join(lines)


# --- the support bundle ----------------------------------------------------------------------------------------
SECRET_OPTION_WORDS = ("token", "secret", "password", "key", "endpoint")  # k3s options whose value is a secret


def secrets_of(config: dict[str, Any]) -> list[str]:
    """The values of the node config's secret fields, as they could show up in a log: a scalar field's whole value;
    in a list of command-line arguments (k3s.args), the value of each option whose name says it is a secret
    (`--token=V` or `--token V`). Values under 8 characters are left alone: they would also match what is no
    secret (config.json has every secret field redacted whole anyway)."""
    found: list[str] = []
    for spec in nodeconfig.FIELDS:
        value = _get(config, spec.key) if spec.secret else None
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            items = [str(v) for v in value]
            for i, item in enumerate(items):
                option, sep, rest = item.partition("=")
                if option.startswith("--") and any(w in option for w in SECRET_OPTION_WORDS):
                    found.append(rest if sep else (items[i + 1] if i + 1 < len(items) else ""))
    return sorted({s for s in found if len(s) >= 8}, key=len, reverse=True)


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    for spec in nodeconfig.FIELDS:
        if spec.secret and _get(out, spec.key) not in (None, "", []):
            *parents, last = spec.key.split(".")
            node = out
            for p in parents:
                node = node[p]
            node[last] = REDACTED
    return out


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60)
        return (done.stdout + done.stderr).decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {exc}\n"


def bundle_files(dev: Device, config: dict[str, Any], checks: list[Check]) -> dict[str, str]:
    """What a support bundle holds, before scrubbing."""
    status = updater.status(dev) if dev.mode() == "disk" else {"mode": dev.mode()}
    return {
        "diag.json": json.dumps([asdict(c) for c in checks], indent=1),
        "status.json": json.dumps(status, indent=1),
        "config.json": json.dumps(redacted(config), indent=1),
        "os-release": _read(dev.os_release), "cmdline": dev.cmdline(), "mounts": _read(dev.proc_mounts),
        "dmesg.txt": _command(["dmesg"]), "log.txt": _command(["logread"]), "config.log": _read(Path(paths.CONFIG_LOG)),
        "nft.json": _command(["nft", "-j", "list", "ruleset"]), "ip.txt": _command(["ip", "addr"]) +
        _command(["ip", "route"]), "df.txt": _command(["df", "-k"]),
    }


def write_bundle(dev: Device, config: dict[str, Any], checks: list[Check], folder: Path) -> Path:
    """The support bundle in `folder` (0700), 0600; every secret value scrubbed from every file."""
    secrets = secrets_of(config)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"maculaos-diag-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target = folder / f"{name}.tar.gz"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for member, text in bundle_files(dev, config, checks).items():
            for secret in secrets:
                text = text.replace(secret, REDACTED)
            data = text.encode()
            info = tarfile.TarInfo(f"{name}/{member}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return target


def main(dev: Device, argv: list[str]) -> int:
    """Exit 0 when no check failed, 1 when one did (or the config does not validate), 2 on usage errors."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="maculaos diag", description="Check this node; --full: a support bundle.")
    ap.add_argument("areas", nargs="*", metavar="AREA", help=f"any of {', '.join(AREAS)} (default: all)")
    ap.add_argument("--json", action="store_true", help="the checks as a JSON list")
    ap.add_argument("--full", action="store_true", help=f"also write a support bundle under {paths.STATE}/diag")
    args = ap.parse_args(argv)
    if set(args.areas) - set(AREAS):
        ap.error(f"unknown area {sorted(set(args.areas) - set(AREAS))[0]!r}: choose from {', '.join(AREAS)}")
    try:
        config = nodeconfig.resolve(nodeconfig.sources(dev.config_root), dev.cmdline())
    except nodeconfig.ConfigError as exc:
        print(f"maculaos: the node config does not validate: {exc.problems[0]}", file=sys.stderr)
        return 1
    checks = run_checks(dev, config, tuple(dict.fromkeys(args.areas)) or AREAS)
    print(json.dumps([asdict(c) for c in checks]) if args.json else report(checks))
    if args.full:
        print(f"support bundle: {write_bundle(dev, config, checks, dev.state / 'diag')}", file=sys.stderr)
    return 1 if any(c.status == "fail" for c in checks) else 0
