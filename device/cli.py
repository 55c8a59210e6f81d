"""`maculaos`: on-device management of a MaculaOS node.

    maculaos upgrade --status                          JSON: mode, version, booted, active, trial, tries,
                                                       rolledback, slots (a slot's version only once verified)
    maculaos upgrade --check [SOURCE]                  JSON: running vs. available version
    maculaos upgrade --apply [SOURCE] [--no-reboot] [--allow-downgrade]
    maculaos upgrade --rollback [--no-reboot] [--force]
    maculaos confirm                                   boot service: health checks, then commit a trial
    maculaos watchdog --arm                            boot service: reboot a trial not confirmed in time
    maculaos grow-data                                 boot service: data partition to the end of its disk
    maculaos factory-reset --confirm [--keep-data]
    maculaos install --device DEV|auto [--config FILE] [--yes] [--poweroff|--reboot]   (from the live ISO)
    maculaos config validate FILE... | show | get KEY | plan | apply
    maculaos diag [storage|network|update|mesh...] [--json] [--full]   a line per check; --full: a support bundle

SOURCE is a bundle folder: a local path (USB stick) or an https URL, as `maculaos-sdk build-image` writes
it. Without one, the node config's upgrade.url + upgrade.channel name it: `maculaos-sdk publish` writes
<url>/channels/<channel>/<profile>-<arch>.json -> {"bundle": "<folder under url>"}.
Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 usage."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from . import updater
from .system import Device, DeviceError, log

if TYPE_CHECKING:
    from .source import Source

def node_config(dev: Device) -> dict:
    from . import nodeconfig  # PyYAML: imported only by the commands that read the config

    try:
        return nodeconfig.resolve(nodeconfig.sources(dev.config_root), dev.cmdline())
    except nodeconfig.ConfigError as exc:
        raise DeviceError(f"the node config does not validate: {exc.problems[0]}") from None


def source_for(dev: Device, location: str | None) -> Source:
    """The bundle to use: the one given, else the one the configured channel points at."""
    from .source import Source  # urllib: imported only by the commands that fetch
    upgrade = node_config(dev)["upgrade"]
    allow_http = bool(upgrade.get("allow_http"))
    if location:
        return Source(location, allow_http)
    if not upgrade["url"]:
        raise DeviceError("no SOURCE given and no upgrade.url in the node config (maculaos config show)")
    server = Source(upgrade["url"], allow_http)
    rel = dev.release()
    name = f"channels/{upgrade['channel']}/{rel.get('VARIANT_ID')}-{rel.get('MACULAOS_ARCH')}.json"
    pointer = updater.verify_pointer(dev, server.read(name, 65536), server.read(name + ".minisig", 65536),
                                     upgrade["channel"], int(time.time()))
    return Source(server.where(pointer.bundle), allow_http, pinned=pointer)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="maculaos", description="Manage this MaculaOS node.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upgrade", help="A/B updates")
    action = up.add_mutually_exclusive_group(required=True)
    action.add_argument("--status", action="store_true")
    action.add_argument("--check", nargs="?", const="", metavar="SOURCE")
    action.add_argument("--apply", nargs="?", const="", metavar="SOURCE")
    action.add_argument("--rollback", action="store_true")
    up.add_argument("--no-reboot", action="store_true")
    up.add_argument("--allow-downgrade", action="store_true", help="apply a bundle that is not newer")
    up.add_argument("--force", action="store_true", help="roll back to the slot last rolled back from")
    sub.add_parser("confirm", help="commit a healthy trial slot (boot service)")
    wd = sub.add_parser("watchdog", help="reboot a trial slot not confirmed in time (boot service)")
    wd.add_argument("--arm", action="store_true", required=True)
    sub.add_parser("grow-data", help="grow the data partition to the end of its disk (boot service)")
    fr = sub.add_parser("factory-reset", help="wipe node state at the next boot")
    fr.add_argument("--confirm", action="store_true")
    fr.add_argument("--keep-data", action="store_true")
    ins = sub.add_parser("install", help="install to a disk (from the live ISO)")
    ins.add_argument("--device", required=True, help="whole disk, e.g. /dev/vda, or auto")
    ins.add_argument("--config", help="node config.yaml to install with")
    ins.add_argument("--yes", action="store_true")
    after = ins.add_mutually_exclusive_group()
    after.add_argument("--poweroff", action="store_true")
    after.add_argument("--reboot", action="store_true")
    return ap.parse_args(argv)


def arm_watchdog(dev: Device) -> None:
    """On a trial boot, a detached process reboots unless the trial is confirmed in time."""
    if not updater.trial_booted(dev):
        return
    seconds = updater.confirm_seconds(dev)
    log(f"trial slot {dev.booted()}: rebooting in {seconds} s unless it is confirmed")
    if os.fork() == 0:  # the child outlives the boot service: no lock, no inherited descriptors
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            console = os.open("/dev/console", os.O_WRONLY) if os.access("/dev/console", os.W_OK) else null
            os.dup2(console, 2)  # the reboot reason shows on the console
            os.closerange(3, 1024)
            time.sleep(seconds)
            updater.watchdog_expired(dev, seconds)
        finally:
            os._exit(0)


def run(dev: Device, args: argparse.Namespace) -> int:
    if args.cmd == "upgrade":
        if args.status:
            print(json.dumps(updater.status(dev)))
            return 0
        if args.check is not None:
            print(json.dumps(updater.check(dev, source_for(dev, args.check))))
            return 0
        if args.apply is not None:
            updater.apply(dev, source_for(dev, args.apply), allow_downgrade=args.allow_downgrade)
        else:
            updater.rollback(dev, force=args.force)
        if not args.no_reboot:
            dev.reboot()
        return 0
    if args.cmd == "confirm":
        updater.confirm(dev)
    elif args.cmd == "watchdog":
        arm_watchdog(dev)
    elif args.cmd == "grow-data":
        from . import installer

        installer.grow_data(dev)
    elif args.cmd == "factory-reset":
        if not args.confirm:
            raise DeviceError("factory-reset wipes node state: run 'maculaos factory-reset --confirm [--keep-data]'")
        from . import installer

        installer.factory_reset(dev, args.keep_data)
    elif args.cmd == "install":
        from . import installer

        installer.install(dev, args.device, args.config, args.yes)
        if args.poweroff or args.reboot:
            subprocess.run(["poweroff" if args.poweroff else "reboot"])
    return 0


def main(argv: list[str] | None = None, dev: Device | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dev = dev or Device()
    if argv[:1] == ["config"]:
        if argv[1:] == ["apply"]:
            from . import applyconfig

            return applyconfig.main()
        from . import nodeconfig

        return nodeconfig.main(argv[1:])
    if argv[:1] == ["diag"]:  # read-only: no lock (it may run beside an update)
        from . import diag

        return diag.main(dev, argv[1:])
    args = parse_args(argv)
    try:
        lock = dev.lock()
        try:
            return run(dev, args)
        finally:
            os.close(lock)
    except DeviceError as exc:
        print(f"maculaos: {exc}", file=sys.stderr)
        return 1
