"""Phase 3: build each stage whose image is not cached, as many at once as `--jobs` allows, each as soon as the
stages it reads are done; reuse the rest. The engine's disk is checked first."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path

from rich.markup import escape

from . import explain, gc, registry, ui
from .bootstrap import bootstrap
from .engine import LABEL_STAGE_ID, Engine
from .errors import BuildFailed
from .locks import cache_lock
from .paths import cache_dir
from .render import RenderedStage, bootstrap_params
from .state import Build, StageResult

# Below LOW_SPACE free, a build first removes every SDK image the plan does not use; below MIN_SPACE it stops.
LOW_SPACE = 10 * 2**30
MIN_SPACE = 4 * 2**30

Finished = queue.Queue[tuple[str, StageResult | BaseException]]


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


def build_stages(build: Build) -> list[StageResult]:
    """Build or reuse every stage. A stage another build is building right now (same id) is waited for, then
    reused. After a failure no new stage starts; the ones running finish (and stay cached), then it is raised."""
    engine, options, rendered = build.engine, build.options, build.rendered
    if any(options.no_cache or not engine.has_image(r.image) for r in rendered):
        ensure_space(engine, build.images)
    needs = {r.key: {key for _, key in r.planned.inputs} for r in rendered}
    waiting, results = list(rendered), dict[str, StageResult]()
    finished: Finished = queue.Queue()
    running: set[str] = set()
    failure: BaseException | None = None
    with ui.Activity() as activity:
        while waiting or running:
            ready = [r for r in waiting if needs[r.key] <= results.keys()] if failure is None else []
            for r in ready[:max(0, options.jobs - len(running))]:
                waiting.remove(r)
                running.add(r.key)
                threading.Thread(target=_stage_worker, daemon=True, name=f"stage-{r.key}",
                                 args=(build, r, activity, finished)).start()
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


def _stage_worker(build: Build, r: RenderedStage, activity: ui.Activity, finished: Finished) -> None:
    try:
        with cache_lock(f"stage-{r.stage_id[:32]}", f"another build's {r.key} stage"):
            finished.put((r.key, _build_or_reuse(build, r, activity)))
    except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which raises it
        finished.put((r.key, exc))


def _build_or_reuse(build: Build, r: RenderedStage, activity: ui.Activity) -> StageResult:
    t0, options, basename = time.monotonic(), build.options, build.plan.basename
    if not options.no_cache and build.engine.has_image(r.image):
        _share(build, r)
        ui.stage_line(r.key, "cached", 0.0, r.image)
        gc.mark_used([r.image])
        explain.remember(basename, [r])
        return StageResult(r, True, 0.0)
    if not options.no_cache and options.cache_registry is not None and registry.pull(
            build.engine.client, options.cache_registry, r.image, r.stage_id, r.platform):
        ui.stage_line(r.key, "pulled", time.monotonic() - t0, options.cache_registry.remote(r.image))
        gc.mark_used([r.image])
        explain.remember(basename, [r])
        return StageResult(r, True, time.monotonic() - t0, pulled=True)
    if options.explain:
        ui.info(f"  {r.key:<10} [dim]rebuilds: {escape(explain.why(basename, r, options.no_cache))}[/]")
    log_path = build.logs / f"{r.label}.log"
    try:
        with activity.building(r.key, log_path):
            _build_stage(build, r, log_path)
    except BuildFailed as exc:
        ui.stage_line(r.key, "failed", time.monotonic() - t0, str(log_path))
        exc.message = f"stage {r.key}: {exc.message}"
        exc.hint = f"{exc.hint}; full log: {log_path}" if exc.hint else f"full log: {log_path}"
        raise
    seconds = time.monotonic() - t0
    gc.mark_used([r.image])
    explain.remember(basename, [r])
    ui.stage_line(r.key, "done", seconds, r.image)
    _share(build, r)
    return StageResult(r, False, seconds)


def _share(build: Build, r: RenderedStage) -> None:
    """Push the stage's image to the stage cache registry (a no-op transfer when it has it already)."""
    if build.options.cache_registry is None:
        return
    failed = registry.push(build.engine.client, build.options.cache_registry, r.image)
    if failed:
        ui.info(f"[yellow]note:[/] stage {r.key} not pushed to {build.options.cache_registry.url}: {escape(failed)}")


def _build_stage(build: Build, r: RenderedStage, log_path: Path) -> None:
    engine, no_cache, profile = build.engine, build.options.no_cache, build.plan.profile
    with log_path.open("w") as log:
        log.write(f"# stage {r.key} id {r.stage_id}\n# image {r.image}\n")
        if r.meta.bootstrap and not profile.settings.base_image:
            # keyed by what mmdebstrap is asked for, so an edit to the base Dockerfile reuses the tarball
            params = bootstrap_params(profile, r.planned.arch, build.plan.sde)
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
