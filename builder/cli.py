"""The `maculaos-sdk` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, ui
from .errors import EXIT_INTERRUPTED, EXIT_OK, BadInput, BadInputs, SdkError
from .registry import ENV as REGISTRY_ENV
from .registry import StageRegistry


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-image", help="build MaculaOS images from a profile")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", "-p", default=None, help="profile name in profiles/ or a path (default: core)")
    src.add_argument("--config", "-c", default=None, help="a custom-image YAML file (same format as profiles)")
    p.add_argument("--arch", choices=["amd64", "arm64"], help="override the profile's architecture")
    p.add_argument("--board", help="override the profile's board (`maculaos-sdk profile keys` lists them)")
    p.add_argument("--outputs", type=lambda v: [o for o in v.split(",") if o], metavar="LIST",
                   help="override the profile's outputs, comma-separated (e.g. tar: the root filesystem only)")
    p.add_argument("--output", "-o", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--no-cache", action="store_true", help="rebuild every stage")
    p.add_argument("--jobs", "-j", type=_positive, default=None, metavar="N",
                   help="stages built at the same time (default: the number of CPUs)")
    p.add_argument("--explain", action="store_true", help="say, for every stage not reused from the cache, what "
                   "changed since this profile last built it (files, parent stages, arch, date); --debug too")
    p.add_argument("--signing-key", type=Path, help="minisign secret key for update bundles (its .pub goes into the "
                   "image; default: profile update.signing_key, else a per-checkout development key)")
    p.add_argument("--release", action="store_true", help="a release build: refuses the development signing key "
                   "and console autologin")
    p.add_argument("--dry-run", nargs="?", const=Path("out/dry-run"), type=Path, metavar="DIR",
                   help="print the plan and write rendered Dockerfiles to DIR (default out/dry-run); no build")
    p.add_argument("--cache-registry", metavar="URL", default=None,
                   help="an OCI registry shared by build machines: stages it holds are pulled instead of built, "
                   f"stages built or reused here are pushed (default: ${REGISTRY_ENV}; `docker login` for auth)")
    p.add_argument("--insecure-registry", action="store_true",
                   help="allow a plain http:// --cache-registry on another host (the engine must allow it too)")
    p.add_argument("--offline", action="store_true",
                   help="use only cached artifacts, images and package index; fail before building if one is missing")
    p.set_defaults(func=_cmd_build)


def _cache_registry(args: argparse.Namespace) -> StageRegistry | None:
    url = args.cache_registry or os.environ.get(REGISTRY_ENV, "")
    if not url:
        return None
    return StageRegistry.parse(url, args.insecure_registry, "--cache-registry" if args.cache_registry else REGISTRY_ENV)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import BuildOptions, build_image
    from .profile import load_profile

    profile = load_profile(args.config or args.profile or "core",
                           {"arch": args.arch, "board": args.board, "outputs": args.outputs})
    options = BuildOptions(output=args.output, no_cache=args.no_cache, dry_run=args.dry_run,
                           signing_key=args.signing_key, offline=args.offline, release=args.release,
                           explain=args.explain or getattr(args, "debug", False))
    if args.jobs:
        options.jobs = args.jobs
    options.cache_registry = _cache_registry(args)
    result = build_image(profile, options)
    for path in result.artifacts.values():
        ui.info(f"[bold green]→[/] {path}")
    if result.manifest:
        ui.info(f"  manifest: {result.manifest}")
    return EXIT_OK


def _add_vm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vm", help="run MaculaOS images in QEMU")
    vsub = p.add_subparsers(dest="vm_cmd", required=True)
    s = vsub.add_parser("start", help="boot an image (or a profile, built first) with the serial console in "
                        "this terminal; SSH, the k3s API and the console are forwarded to free host ports")
    s.add_argument("image", type=Path, nargs="?", help="an ISO or disk image (or use --profile)")
    s.add_argument("--profile", help="build this profile (what is cached stays cached) and boot its ISO, "
                   "else a copy-on-write disk over its disk image")
    s.add_argument("--arch", choices=["amd64", "arm64"], help="default: from the file name, else host")
    s.add_argument("--memory", default="1024", help="MiB of RAM (default 1024)")
    s.add_argument("--uefi", action="store_true", help="boot an ISO with UEFI firmware (OVMF) instead of BIOS; "
                   "disk images always boot UEFI")
    s.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    s.add_argument("--ssh-port", type=int, help="host port for the guest's SSH (default 2222 when free)")
    s.add_argument("--share", type=Path, help="a host folder the guest mounts at /mnt/host (9p)")
    s.add_argument("--no-dev", action="store_true", help="no forwards, no dev SSH key: boot the image as it is")
    s.add_argument("--disk", type=Path, action="append", default=[],
                   help="attach a disk (an install target); a missing .qcow2 is created with --disk-size")
    s.add_argument("--disk-size", default="8G", help="size of disks --disk creates (default 8G)")
    s.set_defaults(func=_cmd_vm_start)
    h = vsub.add_parser("ssh", help="log in to the dev VM started from this checkout, with its dev key")
    h.add_argument("--port", type=int, help="the host port of the VM's SSH (default: the last `vm start`)")
    h.add_argument("command", nargs=argparse.REMAINDER, help="a command to run instead of a shell")
    h.set_defaults(func=_cmd_vm_ssh)


def _cmd_vm_start(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from . import devvm
    from .vm import VmConfig, dev_forwards, qemu_command

    if (args.image is None) == (args.profile is None):
        raise BadInput("vm start: give an image or --profile, not both or neither",
                       "e.g. `maculaos-sdk vm start --profile core`")
    if args.share is not None and not args.share.is_dir():
        raise BadInput(f"--share {args.share}: no such folder", "name a folder on this host")
    image = devvm.image_for_profile(args.profile, args.arch) if args.profile else args.image
    for disk in args.disk:
        if not disk.exists():
            if disk.suffix != ".qcow2":
                raise BadInput(f"{disk}: no such disk", "name a .qcow2 file to have it created")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), args.disk_size], check=True)
            ui.info(f"created {disk} ({args.disk_size})")
    dev: dict = {}
    if not args.no_dev:
        forwards = dev_forwards(args.ssh_port)
        dev = {"forwards": forwards, "guest_config": devvm.guest_config(devvm.dev_ssh_key(), forwards)}
        devvm.save_forwards(forwards)
        for f in forwards:
            ui.info(f"  {f.name:8} guest :{f.guest:<5} -> 127.0.0.1:{f.host}")
        ui.info("  [bold]maculaos-sdk vm ssh[/] logs in with this checkout's dev key")
    cfg = VmConfig.for_image(image, arch=args.arch, memory=args.memory, uefi=args.uefi, accel=args.accel,
                             ssh_port=None if dev else args.ssh_port, disks=tuple(args.disk),
                             share=args.share.resolve() if args.share else None, **dev)
    cmd = qemu_command(cfg, interactive=True)
    ui.info(f"[dim]{' '.join(cmd)}[/]\n[bold]Ctrl-A X[/] quits QEMU.")
    os.execvp(cmd[0], cmd)
    return EXIT_OK  # not reached


def _cmd_vm_ssh(args: argparse.Namespace) -> int:
    import os

    from . import devvm

    port = args.port or devvm.saved_ssh_port()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cmd = devvm.ssh_command(port, devvm.dev_ssh_key(), command)
    os.execvp(cmd[0], cmd)
    return EXIT_OK  # not reached


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check what this host has for building and booting images")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import print_report, run_checks

    checks = run_checks()
    print_report(checks)
    return EXIT_OK if all(c.ok or not c.required for c in checks) else 1


def stages_markdown() -> str:
    from .stages import graph_markdown

    return graph_markdown()


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="inspect profiles")
    psub = p.add_subparsers(dest="profile_cmd", required=True)
    s = psub.add_parser("show", help="print the fully resolved profile and where each value came from")
    s.add_argument("name")
    s.set_defaults(func=_cmd_profile_show)
    g = psub.add_parser("stages", help="print the stage graph from stages/*/stage.yaml (markdown)")
    g.set_defaults(func=lambda args: print(stages_markdown(), end="") or EXIT_OK)
    k = psub.add_parser("keys", help="print every profile key with its default (markdown)")
    k.set_defaults(func=_cmd_profile_keys)


def _cmd_profile_keys(args: argparse.Namespace) -> int:
    from .stages import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def _cmd_profile_show(args: argparse.Namespace) -> int:
    import yaml

    from .profile import _flatten, load_profile

    profile = load_profile(args.name)
    print(yaml.safe_dump(profile.data, sort_keys=False).rstrip())
    board = profile.board
    print(f"\n# board {board.name}: {board.description}")
    print(f"#   boot: {board.boot_flow(profile.arch).value}, outputs: {', '.join(board.outputs(profile.arch))}, "
          f"serial: {board.serial_console(profile.arch)}")
    print("\n# where values came from")
    for key, _ in _flatten(profile.data):
        origin = profile.origins.get(key)
        print(f"#   {key}: {f'{origin[0]}:{origin[1]}' if origin else 'default'}")
    return EXIT_OK


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="update-bundle signing keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    g = ksub.add_parser("generate", help="create a minisign (ed25519) key pair: NAME.key + NAME.pub")
    g.add_argument("--out", type=Path, default=Path("keys/maculaos.key"), help="secret key path (default: %(default)s)")
    g.add_argument("--force", action="store_true", help="replace an existing key")
    g.set_defaults(func=_cmd_keys_generate)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from .keys import generate

    public = generate(args.out, force=args.force)
    ui.info(f"secret key {args.out} (keep it off build machines you do not trust), public key {public}")
    ui.info(f"build with: maculaos-sdk build-image --signing-key {args.out} ...")
    return EXIT_OK


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="copy signed bundles to an update-server folder; point a channel at them")
    p.add_argument("bundles", type=Path, nargs="+", help="bundle folders (out/maculaos-*.bundle)")
    p.add_argument("--to", type=Path, required=True, dest="dest", help="the folder your update server serves")
    p.add_argument("--channel", default="stable", help="channel to point at the bundles (default stable)")
    p.add_argument("--public-key", type=Path, help="verify each bundle's signature with this key first "
                   "(default: the .pub of --signing-key, else the development key)")
    p.add_argument("--signing-key", type=Path, help="the secret key the bundles were signed with; it signs the "
                   "channel pointer too (default: the development key)")
    p.add_argument("--valid-days", type=int, default=30, help="days devices trust the pointer (default 30): "
                   "publish again before then")
    p.set_defaults(func=_cmd_publish)


def _cmd_publish(args: argparse.Namespace) -> int:
    from .keys import public_key_path, signing_key
    from .publish import publish

    if not 1 <= args.valid_days <= 3650:
        raise BadInput(f"--valid-days {args.valid_days}: out of range", "give 1 to 3650 days")
    secret = signing_key("", args.signing_key)
    assert secret is not None, "signing_key() creates the development key when none is given"
    public = args.public_key or public_key_path(secret)
    for item in publish(args.bundles, args.dest, args.channel, public, signing_key=secret,
                        valid_days=args.valid_days):
        ui.info(f"[green]✓[/] {args.channel}: {item.pointer.relative_to(args.dest)} -> {item.bundle.name}")
    return EXIT_OK


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a build's or a release's signed sums, SBOMs and provenance")
    p.add_argument("folder", type=Path, help="the output folder (holding <basename>.SHA256SUMS)")
    p.add_argument("--public-key", type=Path, help="the key the release was signed with (default: the .pub of "
                   "--signing-key, else this checkout's development key)")
    p.add_argument("--signing-key", type=Path, help="a secret key whose .pub to verify with")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .keys import public_key_path, signing_key
    from .verify import VerifyFailed, verify_folder

    public = args.public_key
    if public is None:
        secret = signing_key("", args.signing_key, create=False)
        if secret is None:
            raise BadInput("no key to verify with: this checkout has no development key", "give --public-key NAME.pub")
        public = public_key_path(secret)
    if not public.is_file():
        raise BadInput(f"--public-key {public}: no such file", "give the release's public key (NAME.pub)")
    try:
        done = verify_folder(args.folder, public)
    except VerifyFailed as exc:
        print(f"maculaos-sdk verify: {exc}", file=sys.stderr)
        return 1
    ui.info(f"[green]✓[/] {args.folder}: {done.files} file(s) of {done.builds} build(s) match their signed sums, "
            f"SBOMs and provenance ({public})")
    return EXIT_OK


def _add_artifacts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("artifacts", help="pinned downloads (artifacts.lock.yaml): fetch, list, import")
    asub = p.add_subparsers(dest="artifacts_cmd", required=True)
    f = asub.add_parser("fetch", help="download and verify artifacts into the cache")
    f.add_argument("names", nargs="*", help="artifact names (default: all)")
    f.add_argument("--arch", action="append", choices=["amd64", "arm64"], help="default: every pinned arch")
    f.set_defaults(func=_cmd_artifacts_fetch)
    ls = asub.add_parser("list", help="every pinned artifact, per arch, and whether it is cached")
    ls.set_defaults(func=_cmd_artifacts_list)
    i = asub.add_parser("import", help="add files from a folder (USB stick, ...) whose sha256 matches the lock")
    i.add_argument("folder", type=Path)
    i.set_defaults(func=_cmd_artifacts_import)


def _cmd_artifacts_fetch(args: argparse.Namespace) -> int:
    from . import artifacts

    lock = artifacts.load_lock()
    for name in args.names or sorted(lock):
        if name not in lock:
            raise BadInput(f"artifacts fetch: {name!r} is not in {artifacts.lock_path().name}",
                           f"known: {', '.join(sorted(lock))}")
        for a in sorted(lock[name].values(), key=lambda a: a.arch):
            if args.arch and a.arch not in args.arch:
                continue
            path = artifacts.fetch(a, progress=ui.download_progress(a))
            ui.info(f"[green]✓[/] {a.name} {a.version} {a.arch}: {path}")
    return EXIT_OK


def _cmd_artifacts_list(args: argparse.Namespace) -> int:
    from . import artifacts

    for name, arches in sorted(artifacts.load_lock().items()):
        for arch, a in sorted(arches.items()):
            state = "[green]cached[/]" if a.is_cached() else "[yellow]missing[/]"
            print_line = f"{name:<20} {a.version:<16} {arch:<6} {state}  {a.install}  {a.url}"
            ui.info(print_line)
    return EXIT_OK


def _cmd_artifacts_import(args: argparse.Namespace) -> int:
    from . import artifacts

    imported = artifacts.import_dir(args.folder, artifacts.load_lock())
    for a in imported:
        ui.info(f"[green]✓[/] imported {a.name} {a.version} {a.arch}")
    if not imported:
        ui.info(f"nothing new in {args.folder} matches a sha256 in {artifacts.lock_path().name}")
    return EXIT_OK


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="node config.yaml: validate (same schema as `maculaos config` on the device)")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    v = csub.add_parser("validate", help="check config files; every problem on its own line, exit 2 if any")
    v.add_argument("files", type=Path, nargs="+")
    v.set_defaults(func=_cmd_config_validate)
    r = csub.add_parser("reference", help="print the config.yaml reference (markdown)")
    r.set_defaults(func=_cmd_config_reference)


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from maculaos_device import nodeconfig

    from .profile import config_errors

    problems = nodeconfig.validate_files(args.files)
    if problems:
        raise BadInputs(config_errors(problems))
    ui.info(f"[green]✓[/] {', '.join(map(str, args.files))}: valid")
    return EXIT_OK


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from maculaos_device import nodeconfig

    print(nodeconfig.reference_markdown(), end="")
    return EXIT_OK


def _add_gc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="remove the least recently used stage images until the rest fit the cache limit")
    p.add_argument("--max", default=None, metavar="SIZE",
                   help="cache limit, like 20G or 0 (default: MACULAOS_SDK_CACHE_MAX, else 20G)")
    p.add_argument("--all", action="store_true", help="remove every stage image (the next build starts cold)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.set_defaults(func=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    from . import gc
    from .engine import connect

    limit = 0 if args.all else gc.parse_size(args.max, "--max") if args.max else gc.cache_max()
    client = connect()
    done = gc.collect(client, set(), limit, dry_run=args.dry_run, dangling_older_than="0s")
    verb = "would remove" if args.dry_run else "removed"
    for image in done.removed:
        ui.info(f"  {verb} {image.ref}  {gc.human(image.size)}")
    ui.info(f"{verb} {len(done.removed)} stage image(s): {gc.human(done.freed)}; "
            f"{gc.human(done.kept_bytes)} of stage images kept (limit {gc.human(limit)})")
    if done.prune_refused:
        ui.info(f"untagged build images were not pruned: {done.prune_refused}")
    return EXIT_OK


def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="run the test suites (unit, and QEMU boot tests with --target qemu)")
    p.add_argument("--target", choices=["unit", "qemu", "all"], default="all")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    p.set_defaults(func=_cmd_test)


def _cmd_test(args: argparse.Namespace) -> int:
    import subprocess

    from .paths import sdk_root

    root = sdk_root()
    paths = {"unit": ["tests", "--ignore=tests/qemu"], "qemu": ["tests/qemu"], "all": ["tests"]}[args.target]
    parallel = ["-n", "auto", "--dist", "worksteal"] if args.target != "unit" else []  # one worker per core
    cmd = [sys.executable, "-m", "pytest", *parallel, *paths, *args.pytest_args]
    return subprocess.call(cmd, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maculaos-sdk", description="Build and test MaculaOS images.")
    parser.add_argument("--version", action="version", version=f"maculaos-sdk {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_vm, _add_doctor, _add_profile, _add_keys, _add_publish, _add_verify, _add_artifacts,
                _add_config, _add_gc, _add_test):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps errors to exit codes (0 ok, 1 build failed, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SdkError as exc:
        if args.debug:
            raise
        for line in exc.render().splitlines():
            ui.error(line)
        return exc.exit_code
    except KeyboardInterrupt:
        ui.error("interrupted; finished stages stay cached, the next build resumes from them")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
