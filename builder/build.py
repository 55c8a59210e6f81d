"""The orchestrator: plan -> render -> build each stage (or reuse it) -> export artifacts -> manifest."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from . import __version__, archive, artifacts, explain, gc, images, keys, ui
from .arch import Architecture
from .boards import Board, BootFlow
from .bootstrap import bootstrap
from .debian_index import check_packages
from .engine import LABEL_STAGE_ID, Deadlines, Engine, connect, read_text_from_image
from .errors import BadInput, BuildFailed
from .locks import cache_lock
from .paths import cache_dir
from .plan import BuildPlan, make_plan
from .profile import Profile
from .render import RenderedStage, bootstrap_params, render_stage


@dataclass
class BuildOptions:
    """How to build: where to write, whether to trust the cache, whether to only render."""

    output: Path = Path("out")
    no_cache: bool = False
    dry_run: Path | None = None
    signing_key: Path | None = None
    offline: bool = False  # pinned artifacts and preloaded images from the local caches only
    check_packages: bool = True  # look the package names up in Debian's index before building
    release: bool = False  # a release: a real signing key, no console autologin
    explain: bool = False  # say why each stage that is not cached is built
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)  # stages built at the same time


@dataclass
class StageResult:
    stage: RenderedStage
    cached: bool
    seconds: float


@dataclass
class BuildResult:
    """What a build produced."""

    plan: BuildPlan
    stages: list[StageResult] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    manifest: Path | None = None


def render_plan(plan: BuildPlan, workdir: Path, update_public_key: str = "",
                extra_files: dict[str, Path] | None = None) -> list[RenderedStage]:
    """Render every stage in plan order; each id folds in its inputs' ids."""
    done: dict[str, RenderedStage] = {}
    for planned in plan.stages:
        inputs = {name: done[key] for name, key in planned.inputs}
        done[planned.key] = render_stage(planned, plan, inputs, workdir, update_public_key, extra_files)
    return list(done.values())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_dry_run(rendered: list[RenderedStage], dest: Path) -> None:
    """Copy each rendered stage context (Dockerfile included) to `dest/<NN-stage>/`."""
    dest.mkdir(parents=True, exist_ok=True)
    for r in rendered:
        target = dest / r.label
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(r.context, target, symlinks=True)
        (target / "STAGE_ID").write_text(r.stage_id + "\n")


# Below LOW_SPACE free, a build first removes every SDK image the plan does not use; below MIN_SPACE it stops.
LOW_SPACE = 10 * 2**30
MIN_SPACE = 4 * 2**30


def ensure_space(engine: Engine, keep: set[str]) -> None:
    """Make room for a build on the engine's disk, or fail with how much is free and what to do."""
    free = gc.docker_free_bytes(engine.client)
    if free is None or free >= LOW_SPACE:
        return
    with ui.step(f"only {gc.human(free)} free for the docker engine: remove stage images this build does not use"):
        done = gc.collect(engine.client, keep, 0, dangling_older_than="0s")
    ui.info(f"  removed {len(done.removed)} stage image(s) and untagged build images, {gc.human(done.freed)} freed")
    free = gc.docker_free_bytes(engine.client) or 0
    if free < MIN_SPACE:
        raise BuildFailed(f"only {gc.human(free)} free on the docker engine's disk; a build needs about "
                          f"{gc.human(MIN_SPACE)}", "free space there (docker system df shows what holds it)")


def _build_stage(engine: Engine, r: RenderedStage, plan: BuildPlan, log_path: Path, no_cache: bool) -> None:
    with log_path.open("w") as log:
        log.write(f"# stage {r.key} id {r.stage_id}\n# image {r.image}\n")
        if r.meta.bootstrap and not plan.profile.settings.base_image:
            # keyed by what mmdebstrap is asked for, so an edit to the base Dockerfile reuses the tarball
            params = bootstrap_params(plan.profile, r.planned.arch, plan.sde)
            key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
            tarball = cache_dir() / "bootstrap" / f"{key}.tar"
            if no_cache or not tarball.exists():
                bootstrap(params, tarball, log)
            os.link(tarball, r.context / "rootfs.tar")
        replaced = engine.image_id(r.image)  # --no-cache rebuilds a present tag; the old image loses it
        steps = engine.build(r.context, r.image, log, platform=r.platform, emulated=r.emulated,
                             no_cache=no_cache,
                             labels={LABEL_STAGE_ID: r.stage_id, gc.LABEL_STAGE: r.meta.name})
    # A multi-stage build leaves its earlier stages as untagged images that no later build reuses
    # (stage ids change with any input); only the tagged image and its own layers are the cache.
    gc.remove_untagged(engine.client, [replaced, *steps] if replaced else steps)


def _previous_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Inputs:
    """What a build needs besides the stage folders, resolved before the first stage runs."""

    secret: Path | None  # the bundle signing key (None in a dry run that would have to generate one)
    public_key: str  # built into the image as /usr/share/maculaos/update.pub (read-only root)
    pinned: dict[str, Path]  # image path -> cached pinned artifact
    image_files: dict[str, Path]  # image path -> saved preloaded container image
    image_records: list[dict[str, Any]]


# Services that only test images run: the QEMU test channel is a root shell on a virtio console.
TEST_ONLY_SERVICES = ("maculaos-testchannel",)


def is_release(options: BuildOptions, secret: Path | None) -> bool:
    """A release is asked for (--release), or implied by the key: anything signed with a key other than this
    checkout's development key is something devices will trust, so it gets a release's checks."""
    return options.release or (secret is not None and not keys.is_development_key(secret))


def check_release(profile: Profile, secret: Path | None, asked: bool = True) -> None:
    """A release: signed with a real key, no console autologin, a GRUB that cannot be edited freely, no test
    channel, no plain-http updates, no secret baked into the image, every preloaded image pinned by digest."""
    why = "--release" if asked else f"signed with {secret} (not the development key), this build is a release"
    if secret is None or keys.is_development_key(secret):
        raise BadInput(f"{why}: bundles would be signed with this checkout's development key",
                       "pass --signing-key KEY (or set update.signing_key); `maculaos-sdk keys generate` makes one")
    where = profile.files[0]
    if profile.settings.console.autologin:
        raise BadInput(f"{profile.origins['console.autologin'][0]}: console.autologin: {why}: a release image must "
                       "not log root in", "drop console.autologin from the profile (it is for test images)")
    if not profile.settings.console.grub_password:
        raise BadInput(f"{where}: console.grub_password: {why}: a release needs a GRUB password (anyone at the "
                       "console could edit the kernel line or open Recovery)",
                       "set it to the output of `grub-mkpasswd-pbkdf2`")
    for i, service in enumerate(profile.settings.services):
        if service in TEST_ONLY_SERVICES:
            raise BadInput(f"{profile.origins.get('services', (where, 0))[0]}: services[{i}]: {why}: {service} is a "
                           "root shell for tests", "build releases from a profile that does not extend `test`")
    config = profile.settings.config
    origin = profile.origins.get("config", (where, 0))[0]
    if (config.get("upgrade") or {}).get("allow_http"):
        raise BadInput(f"{origin}: config.upgrade.allow_http: {why}: plain-http updates let anyone on the path "
                       "hold updates back", "serve updates over https")
    secrets = [k for k, v in (("wifi.psk", (config.get("wifi") or {}).get("psk")),
                              ("k3s.args", [a for a in (config.get("k3s") or {}).get("args") or []
                                            if str(a).startswith(("--token", "-t", "--agent-token"))])) if v]
    if secrets:
        raise BadInput(f"{origin}: config.{secrets[0]}: {why}: a secret baked into an image is readable by anyone "
                       "holding the image", "give it to each node in its own config.yaml (data partition)")
    for i, ref in enumerate(profile.settings.images):
        if not ref.endswith((".tar", ".tar.gz", ".tgz")) and "@sha256:" not in ref:
            raise BadInput(f"{profile.origins.get('images', (where, 0))[0]}: images[{i}]: {why}: {ref} is not "
                           "pinned by digest", f"name it as {ref.split('@')[0]}@sha256:<digest>")


def resolve_inputs(plan: BuildPlan, options: BuildOptions, engine: Engine | None) -> Inputs:
    """Everything that can fail for want of an input fails here, before the first stage."""
    profile, dry = plan.profile, options.dry_run is not None
    secret = keys.signing_key(profile.settings.update.signing_key, options.signing_key, create=not dry)
    if is_release(options, secret):
        check_release(profile, secret, asked=options.release)
    public = keys.public_key_path(secret).read_text() if secret else "(development key, generated by the build)\n"
    if options.check_packages and not dry:
        with ui.step("check package names against Debian's index"):
            check_packages(profile, offline=options.offline)
    where = str(profile.files[0])
    pinned = artifacts.files_for(profile.settings.artifacts, plan.arch.value, where, offline=options.offline or dry,
                                 progress_factory=ui.download_progress, missing_ok=dry)
    image_files: dict[str, Path] = {}
    image_records: list[dict[str, Any]] = []
    if profile.settings.images and not dry:
        with ui.step(f"preload {len(profile.settings.images)} container image(s)"):
            image_files, image_records = images.preload(profile.settings.images, profile.files[0].parent,
                                                        (engine or Engine(connect())).client,
                                                        offline=options.offline, where=where)
    return Inputs(secret, public, pinned, image_files, image_records)


def build_stages(engine: Engine, rendered: list[RenderedStage], options: BuildOptions, logs: Path,
                 plan: BuildPlan) -> list[StageResult]:
    """Build each stage whose image is not cached, up to `options.jobs` at once, each as soon as the stages
    it reads are done. A stage another build is building right now (same id) is waited for, then reused.
    After a failure no new stage starts; the ones running finish (and stay cached), then the failure is raised."""
    if any(options.no_cache or not engine.has_image(r.image) for r in rendered):
        ensure_space(engine, {r.image for r in rendered})
    needs = {r.key: {key for _, key in r.planned.inputs} for r in rendered}
    waiting, results = list(rendered), {}
    finished: queue.Queue[tuple[str, StageResult | BaseException]] = queue.Queue()
    running: set[str] = set()
    failure: BaseException | None = None
    with ui.Activity() as activity:
        while waiting or running:
            ready = [r for r in waiting if needs[r.key] <= results.keys()] if failure is None else []
            for r in ready[:max(0, options.jobs - len(running))]:
                waiting.remove(r)
                running.add(r.key)
                threading.Thread(target=_stage_worker, daemon=True, name=f"stage-{r.key}",
                                 args=(engine, r, options, logs, plan, activity, finished)).start()
            if not running:
                break
            key, outcome = finished.get()
            running.discard(key)
            if isinstance(outcome, StageResult):
                results[key] = outcome
            elif failure is None:
                failure = outcome
    if failure is not None:
        raise failure
    return [results[r.key] for r in rendered]


def _stage_worker(engine: Engine, r: RenderedStage, options: BuildOptions, logs: Path, plan: BuildPlan,
                  activity: ui.Activity, finished: queue.Queue[tuple[str, StageResult | BaseException]]) -> None:
    try:
        with cache_lock(f"stage-{r.stage_id[:32]}", f"another build's {r.key} stage"):
            finished.put((r.key, _build_or_reuse(engine, r, options, logs, plan, activity)))
    except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which raises it
        finished.put((r.key, exc))


def _build_or_reuse(engine: Engine, r: RenderedStage, options: BuildOptions, logs: Path, plan: BuildPlan,
                    activity: ui.Activity) -> StageResult:
    t0 = time.monotonic()
    if not options.no_cache and engine.has_image(r.image):
        ui.stage_line(r.key, "cached", 0.0, r.image)
        gc.mark_used([r.image])
        explain.remember(plan.basename, [r])
        return StageResult(r, True, 0.0)
    if options.explain:
        ui.info(f"  {r.key:<10} [dim]rebuilds: {escape(explain.why(plan.basename, r, options.no_cache))}[/]")
    log_path = logs / f"{r.label}.log"
    try:
        with activity.building(r.key, log_path):
            _build_stage(engine, r, plan, log_path, options.no_cache)
    except BuildFailed as exc:
        ui.stage_line(r.key, "failed", time.monotonic() - t0, str(log_path))
        exc.message = f"stage {r.key}: {exc.message}"
        exc.hint = f"{exc.hint}; full log: {log_path}" if exc.hint else f"full log: {log_path}"
        raise
    seconds = time.monotonic() - t0
    gc.mark_used([r.image])
    explain.remember(plan.basename, [r])
    ui.stage_line(r.key, "done", seconds, r.image)
    return StageResult(r, False, seconds)


def export_artifacts(engine: Engine, rendered: list[RenderedStage], plan: BuildPlan, secret: Path, out: Path,
                     previous: dict[str, Any], result: BuildResult) -> dict[str, Any]:
    """Copy each stage's exports out of its image (unless the last export is intact); their manifest entries."""
    exported: dict[str, Any] = {}
    for r in rendered:
        for src, pattern in sorted(r.meta.exports.items()):
            dest = out / pattern.format(basename=plan.basename).rstrip("/")
            old = previous.get("artifacts", {}).get(dest.name, {})
            if old.get("stage_id") == r.stage_id and _artifact_intact(dest, old):
                exported.update({k: v for k, v in previous["artifacts"].items()
                                  if k == dest.name or v.get("derived_from") == dest.name})
                result.artifacts[dest.name] = dest
                continue
            with ui.step(f"export {dest}"):
                if src.endswith("/"):
                    engine.export_tree(r.image, f"/out/{src}", dest)
                else:
                    engine.export(r.image, f"/out/{src}", dest)
            exported.update(_finish_artifact(dest, r, plan.profile, secret))
            result.artifacts[dest.name] = dest
            _check_size(dest, plan.profile.settings.size.iso_max_mb, plan.board, plan.arch)
    return exported


def _check_size(dest: Path, limit_mb: int, board: Board, arch: Architecture = Architecture.amd64) -> None:
    """size.iso_max_mb, plus what the board's firmware and the arch's kernel are allowed to add."""
    if not (dest.suffix == ".iso" and limit_mb):
        return
    allowed = limit_mb + board.image_extra_mb + arch.image_extra_mb
    if dest.stat().st_size > allowed * 1024 * 1024:
        extra = f" + {board.image_extra_mb} for {board.name}'s firmware" if board.image_extra_mb else ""
        extra += f" + {arch.image_extra_mb} for the {arch} kernel" if arch.image_extra_mb else ""
        raise BuildFailed(f"{dest} is {dest.stat().st_size / 2**20:.0f} MiB, over size.iso_max_mb={limit_mb}{extra}",
                          "prune kernel modules or packages, or raise the limit")


def manifest(plan: BuildPlan, result: BuildResult, inputs: Inputs, exported: dict[str, Any], engine: Engine,
             previous: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The build's record: what was built from what, and how long it took."""
    profile = plan.profile
    by_key = {s.stage.key: s for s in result.stages}
    rootfs = by_key.get("rootfs")
    return {
        "profile": profile.name,
        "version": profile.version,
        "arch": plan.arch.value,
        "board": plan.board.name,
        "outputs": list(plan.outputs),
        "source_date_epoch": plan.sde,
        "signing_key_id": keys.key_id(inputs.public_key),
        "sdk_version": __version__,
        "profile_files": [str(p) for p in profile.files],
        "stages": {s.stage.key: {"id": s.stage.stage_id, "image": s.stage.image, "cached": s.cached,
                                 "seconds": round(s.seconds, 1)} for s in result.stages},
        "artifacts": exported,
        "pinned_artifacts": {dest: {"sha256": path.name} for dest, path in sorted(inputs.pinned.items())},
        "images": inputs.image_records,
        "kernel": _kernel_info(engine, by_key.get("kernel"), previous),
        **archive.rootfs_pins(engine, rootfs and rootfs.stage.image, _unchanged(rootfs, previous), previous),
        "build_seconds": round(seconds, 1),
    }


def trim_cache(engine: Engine, keep: set[str]) -> None:
    """Keep the engine's stage images within the cache limit (never the ones this plan uses). Housekeeping:
    an engine error here (another build removing images meanwhile) is said, never fails the finished build."""
    limit = gc.cache_max()
    try:
        done = gc.collect(engine.client, keep, limit, dangling_older_than="6h")
    except Exception as err:  # docker.errors.APIError and the like; the SDK's import stays lazy
        ui.info(f"  cache: not trimmed this time ({str(err).splitlines()[0][:200]}); `maculaos-sdk gc` does it")
        return
    what = [f"{len(done.removed)} stage image(s) no recent build used"] if done.removed else []
    what += ["untagged images killed builds left"] if done.dangling_bytes else []
    if what:
        ui.info(f"  cache: removed {' and '.join(what)}, {gc.human(done.freed)} freed; {gc.human(done.kept_bytes)} "
                f"kept (limit {gc.human(limit)}: MACULAOS_SDK_CACHE_MAX)")
    if done.prune_refused:
        ui.info(f"  cache: the engine refused to prune untagged images ({done.prune_refused}); "
                "`maculaos-sdk gc` tries again")


def dry_run(plan: BuildPlan, rendered: list[RenderedStage], dest: Path) -> None:
    write_dry_run(rendered, dest)
    for r in rendered:
        arch = f" ({r.planned.arch})" if plan.cross else ""
        ui.stage_line(r.key, "planned", None, f"{r.image}{arch}  <- {', '.join(k for _, k in r.planned.inputs) or '-'}")
    ui.info(f"rendered Dockerfiles written to {dest}")


def build_image(profile: Profile, options: BuildOptions, engine: Engine | None = None) -> BuildResult:
    """Build every stage the profile needs and export its artifacts into `options.output`."""
    if options.dry_run is not None:
        return _build_image(profile, options, engine)
    # Two builds of one output take turns (they share its render folder and output files); builds of
    # different outputs run side by side and take turns only on the stages they share (build_stages).
    basename = make_plan(profile).basename
    with cache_lock(f"out-{basename}", f"the build of {basename}"):
        return _build_image(profile, options, engine)


def open_on_this_board(profile: Profile) -> str | None:
    """What a locked image still leaves open on its board, said at build time (the README's security section)."""
    if profile.board.boot_flow(profile.arch) is not BootFlow.rpi_firmware:
        return None
    uboot = ("U-Boot boots without stopping for a key (overlays/maculaos-locked.dtbo)" if
             profile.settings.console.grub_password else
             "U-Boot's autoboot can be interrupted on the UART or a USB keyboard (console.grub_password locks it)")
    return (f"{profile.board.name}: {uboot}; the Pi firmware reads config.txt, the device trees and U-Boot from the "
            "card's FAT partition unsigned, so whoever holds the card can change them, and the data partition is "
            "not encrypted")


def _build_image(profile: Profile, options: BuildOptions, engine: Engine | None) -> BuildResult:
    plan = make_plan(profile)
    gc.cache_max()  # a bad MACULAOS_SDK_CACHE_MAX or stage deadline stops the build before any stage
    Deadlines.for_stage(emulated=False)
    ui.info(f"[bold]MaculaOS[/] {profile.name} {profile.version} ({plan.arch}, {plan.board.name}), "
            f"{len(plan.stages)} stages, SOURCE_DATE_EPOCH={plan.sde}")
    inputs = resolve_inputs(plan, options, engine)
    if note := open_on_this_board(profile):
        ui.info(f"[yellow]note:[/] {escape(note)}")
    workdir = cache_dir() / "contexts" / plan.basename
    rendered = render_plan(plan, workdir, inputs.public_key, {**inputs.pinned, **inputs.image_files})
    result = BuildResult(plan=plan)
    if options.dry_run is not None:
        dry_run(plan, rendered, options.dry_run)
        return result
    assert inputs.secret is not None
    engine = engine or Engine(connect())
    out = options.output
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result.stages = build_stages(engine, rendered, options, out / "logs", plan)
    result.manifest = out / f"{plan.basename}.manifest.json"
    previous = _previous_manifest(result.manifest)
    exported = export_artifacts(engine, rendered, plan, inputs.secret, out, previous, result)
    record = manifest(plan, result, inputs, exported, engine, previous, time.monotonic() - started)
    if note := archive.moved(previous, record):
        ui.info(f"[yellow]note:[/] {escape(note)}")
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    result.manifest.write_text(text)
    (out / "manifest.json").write_text(text)
    trim_cache(engine, {r.image for r in rendered})
    return result


def _artifact_intact(dest: Path, recorded: dict[str, Any]) -> bool:
    """True when an exported artifact is still what the manifest says (cheap checks only)."""
    if dest.is_dir():
        return (dest / "manifest.json.minisig").is_file() and recorded.get("size") == _size(dest)
    return dest.is_file() and dest.stat().st_size == recorded.get("size") and \
        dest.with_name(dest.name + ".sha256").is_file()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _write_sha256(path: Path) -> str:
    digest = _sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def _finish_artifact(dest: Path, r: RenderedStage, profile: Profile, secret: Path) -> dict[str, Any]:
    """Checksums (and signature, raw conversion) for a freshly exported artifact; its manifest entries."""
    entry: dict[str, Any] = {"stage": r.meta.name, "stage_id": r.stage_id}
    if dest.is_dir():  # an update bundle: sign its manifest
        keys.sign(dest / "manifest.json", secret,
                  f"maculaos {profile.name} {profile.version} {profile.arch} key:{keys.public_key_path(secret).name}")
        entry.update(size=_size(dest), sha256=_sha256(dest / "manifest.json"))
        return {dest.name: entry}
    entry.update(size=dest.stat().st_size, sha256=_write_sha256(dest))
    entries = {dest.name: entry}
    if dest.suffix == ".qcow2":  # also the raw image, for dd to a disk
        raw = dest.with_suffix(".img")
        if shutil.which("qemu-img") is None:
            raise BuildFailed("qemu-img is not installed", "run `make setup` (apt-get install qemu-utils)")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(dest), str(raw)], check=True)
        entries[raw.name] = {"stage": r.meta.name, "stage_id": r.stage_id, "derived_from": dest.name,
                             "size": raw.stat().st_size, "sha256": _write_sha256(raw)}
    return entries


def _unchanged(s: StageResult | None, previous: dict[str, Any]) -> bool:
    """True when the stage's image is the one the previous manifest recorded, reused from the cache: what was read
    from it then still holds. A rebuild with the same id (--no-cache) may have installed other versions."""
    return s is not None and s.cached and previous.get("stages", {}).get(s.stage.key, {}).get("id") == s.stage.stage_id


def _kernel_info(engine: Engine, s: StageResult | None, previous: dict[str, Any]) -> dict[str, str]:
    if s is None:
        return {}
    if _unchanged(s, previous) and previous.get("kernel"):
        return previous["kernel"]
    package, version = read_text_from_image(engine, s.stage.image, "/out/kernel-package.tsv").split()[:2]
    release = read_text_from_image(engine, s.stage.image, "/out/kernel-version").strip()
    return {"package": package, "version": version, "release": release}
