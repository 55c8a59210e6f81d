"""A build, phase by phase: plan -> inputs (inputs.py) -> render (render.py) -> schedule (schedule.py) ->
export (export.py) -> record (record.py) -> evidence (evidence.py). Each phase is a module; the state they share
is one `Build` (state.py). This module only runs them in order."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from rich.markup import escape

from . import gc, ui
from .engine import Deadlines, Engine, connect
from .evidence import write_evidence
from .export import export_artifacts
from .inputs import resolve_inputs
from .locks import cache_lock
from .paths import cache_dir
from .plan import BuildPlan, make_plan
from .profile import Profile
from .record import previous_manifest, trim_cache, write_manifest
from .release import open_on_this_board
from .render import RenderedStage, render_plan
from .schedule import build_stages
from .state import Build, BuildOptions, BuildResult, StageResult

__all__ = ["BuildOptions", "BuildResult", "StageResult", "build_image"]


def build_image(profile: Profile, options: BuildOptions, engine: Engine | None = None) -> BuildResult:
    """Build every stage the profile needs and export its artifacts into `options.output`."""
    # Two builds (or dry runs) of one output take turns (they share its render folder and output files); builds of
    # different outputs run side by side and take turns only on the stages they share (schedule.build_stages).
    basename = make_plan(profile).basename
    with cache_lock(f"out-{basename}", f"the build of {basename}"):
        return _build_image(profile, options, engine)


def _build_image(profile: Profile, options: BuildOptions, engine: Engine | None) -> BuildResult:
    plan = make_plan(profile)
    gc.cache_max()  # a bad MACULAOS_SDK_CACHE_MAX or stage deadline stops the build before any stage
    Deadlines.for_stage(emulated=False)
    ui.info(f"[bold]MaculaOS[/] {profile.name} {profile.version} ({plan.arch}, {plan.board.name}), "
            f"{len(plan.stages)} stages, SOURCE_DATE_EPOCH={plan.sde}")
    inputs = resolve_inputs(plan, options, engine)
    if note := open_on_this_board(profile):
        ui.info(f"[yellow]note:[/] {escape(note)}")
    rendered = render_plan(plan, cache_dir() / "contexts" / plan.basename, inputs.public_key,
                           {**inputs.pinned, **inputs.image_files})
    if options.dry_run is not None:
        dest = options.dry_run.resolve()  # dry runs of other outputs may share it (out/dry-run): one at a time
        with cache_lock(f"dry-run-{hashlib.sha256(str(dest).encode()).hexdigest()[:16]}", f"a dry run into {dest}"):
            dry_run(plan, rendered, options.dry_run)
        return BuildResult(plan=plan)
    (options.output / "logs").mkdir(parents=True, exist_ok=True)
    if options.cache_registry is not None:
        options.cache_registry.check()  # a registry that is down: one line now, not a note per stage
    build = Build(plan, options, inputs, rendered, engine or Engine(connect()),
                  previous_manifest(options.output / f"{plan.basename}.manifest.json"))
    build.result.stages = build_stages(build)
    export_artifacts(build)
    build.result.evidence = write_evidence(build, write_manifest(build))
    trim_cache(build.engine, build.images)
    return build.result


def write_dry_run(rendered: list[RenderedStage], dest: Path) -> None:
    """Copy each rendered stage context (Dockerfile included) to `dest/<NN-stage>/`."""
    dest.mkdir(parents=True, exist_ok=True)
    for r in rendered:
        target = dest / r.label
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(r.context, target, symlinks=True)
        (target / "STAGE_ID").write_text(r.stage_id + "\n")


def dry_run(plan: BuildPlan, rendered: list[RenderedStage], dest: Path) -> None:
    write_dry_run(rendered, dest)
    for r in rendered:
        arch = f" ({r.planned.arch})" if plan.cross else ""
        ui.stage_line(r.key, "planned", None, f"{r.image}{arch}  <- {', '.join(k for _, k in r.planned.inputs) or '-'}")
    ui.info(f"rendered Dockerfiles written to {dest}")
